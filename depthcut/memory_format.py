"""Which memory format a model runs in: channels_last where it is fast and safe, else contiguous.

channels_last makes convolutions 7-65% faster on CPU here, but oneDNN's backward-weights kernel
for a strided 1x1 convolution in channels_last (NHWC) is broken when the convolution has fewer
input channels than the kernel's channel block (oneDNN issue 6035: "1x1 convolution
backward_weights writes past the rtus workspace (nhwc, IC < ic_block)"). Measured with torch
2.13 on AVX2 (block 8): with one thread the process dies ("double free or corruption"), with two
it silently returns weight gradients off by 0.5% to 99%. The block is 16 channels on AVX-512
CPUs, and which kernel runs depends on the CPU, so the rule below does not ask the CPU: any
strided 1x1 conv2d with fewer than 16 input channels per group makes the whole model run
contiguous (the data loaders follow, since one channels_last input is enough to pick the NHWC
kernel). GPUs are not affected, and `auto` leaves them contiguous as before.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from depthcut.errors import ConfigError

SETTINGS = ("auto", "on", "off")
SAFE_INPUT_CHANNELS = 16  # oneDNN's largest channel block (AVX-512); AVX2 uses 8


@dataclass
class MemoryFormat:
    """The format a run uses and why; written to the run's config.json."""

    channels_last: bool
    setting: str
    reason: str
    risky_convs: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def normalize_setting(value: str | bool | None) -> str:
    """Accept "auto"/"on"/"off" and, from older configs, None/True/False."""
    if value is None:
        return "auto"
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in SETTINGS:
        raise ConfigError(f"channels_last must be one of {', '.join(SETTINGS)}, got {value!r}")
    return value


def risky_convs(model: nn.Module) -> list[str]:
    """Strided 1x1 conv2d modules with fewer than 16 input channels per group."""
    return [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
        and tuple(module.kernel_size) == (1, 1)
        and tuple(module.stride) != (1, 1)
        and module.in_channels // module.groups < SAFE_INPUT_CHANNELS
    ]


def choose_memory_format(model: nn.Module, device: torch.device,
                         setting: str | bool | None = "auto") -> MemoryFormat:
    """`auto`: channels_last on CPU unless the model has a strided 1x1 conv with few input
    channels or no 2-D convolution at all (the transformer); contiguous on GPUs. `on`/`off`
    force it (on: with a warning where it is unsafe)."""
    setting = normalize_setting(setting)
    risky = risky_convs(model) if device.type == "cpu" else []
    if setting == "off":
        return MemoryFormat(False, setting, "--channels-last off", risky)
    if setting == "on":
        if risky:
            warnings.warn(
                f"channels_last forced on although {', '.join(risky)} are strided 1x1 convs with "
                f"fewer than {SAFE_INPUT_CHANNELS} input channels: on some CPUs oneDNN then "
                "computes wrong weight gradients or crashes (oneDNN issue 6035). Use "
                "--channels-last auto.", RuntimeWarning, stacklevel=2)
        return MemoryFormat(True, setting, "--channels-last on", risky)
    if device.type != "cpu":
        return MemoryFormat(False, setting, f"contiguous on {device.type}", risky)
    if risky:
        return MemoryFormat(
            False, setting,
            f"contiguous: strided 1x1 conv(s) with < {SAFE_INPUT_CHANNELS} input channels "
            "(oneDNN channels_last backward bug, issue 6035)", risky)
    if not any(isinstance(module, nn.Conv2d) for module in model.modules()):
        # channels_last only changes 4-D tensors: a sequence model (token ids) has none.
        return MemoryFormat(False, setting, "contiguous: no 2-D convolution", risky)
    return MemoryFormat(True, setting, "channels_last: faster on CPU, no risky conv", risky)
