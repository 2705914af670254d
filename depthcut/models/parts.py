"""What the papers' CIFAR architectures share: one activation module per site, width-scaled
channel counts, and the family of a named architecture (how a spec calls its constructor).

Every architecture takes `num_classes`, `in_channels`, a `width` multiplier and an `activation`
kind, and gives every rectifier site its own module (so each can be measured and linearized
alone). Image models expect 32x32 inputs; `transformer` expects (batch, seq) int64 token ids.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from depthcut.errors import ConfigError
from depthcut.models.registry import ModelFamily, ModelSpec

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "prelu": lambda: nn.PReLU(),
    "gelu": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(inplace=True),
}
SEQUENCE_FIELDS = ("vocab_size", "max_len", "pad_id")  # the spec's fields for token models


def make_activation(kind: str) -> nn.Module:
    """A fresh activation module: every site owns its module, so each can be linearized alone."""
    if kind not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {kind!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[kind]()


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def architecture_family(name: str, constructor: Callable[..., nn.Module],
                        paper_lr: float | None = None, reads_tokens: bool = False) -> ModelFamily:
    """The family of one architecture class: built with the spec's classes, channels, width and
    activation (None: the constructor's default), plus the sequence fields when it
    `reads_tokens`. `paper_lr`: EASIER Table 4's learning rate, where it has one."""

    def build(spec: ModelSpec) -> nn.Module:
        if not spec.width > 0:
            raise ConfigError(f"width multiplier must be positive, got {spec.width}")
        chosen = {} if spec.activation is None else {"activation": spec.activation}
        sequence = {key: getattr(spec, key) for key in SEQUENCE_FIELDS
                    if getattr(spec, key) is not None}
        if sequence and not reads_tokens:
            raise ConfigError(f"model {spec.name!r} reads images, not token ids "
                              f"({', '.join(sequence)} given): use model 'transformer'")
        chosen.update(sequence)
        return constructor(num_classes=spec.num_classes, in_channels=spec.in_channels,
                           width=spec.width, **chosen)

    parameter = inspect.signature(constructor).parameters.get("activation")
    return ModelFamily(name=name, build=build, paper_lr=paper_lr, constructor=constructor,
                       default_activation=None if parameter is None else parameter.default)
