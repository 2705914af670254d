"""Model names -> families -> modules: the seam where every model family plugs in.

A family says which names it builds (one exact name, e.g. "resnet18", or every name after a
prefix, e.g. "timm:"), how it builds a module from a `ModelSpec`, the learning rate EASIER's
Table 4 trains it with (where the table has one) and its default activation. Each family
registers itself in its own file (`resnet.py`, `timm.py`, ...); `ModelSpec.build`, the
presets and the CLI only ask this registry, so a new family is one new file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from torch import nn

from depthcut.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model from a checkpoint.

    `activation=None` means the architecture's own default (ReLU for resnet18 and vgg16, ReLU6
    for mobilenetv2, GELU for swin-t and transformer); a stored None rebuilds the same model.
    `in_channels` is ignored by `transformer`, which reads token ids; `vocab_size`, `max_len`
    and `pad_id` are the transformer's (set from a text dataset; None: the constructor's
    defaults, as in checkpoints written before they existed).
    """

    name: str = "resnet18"
    num_classes: int = 10
    in_channels: int = 3
    width: float = 1.0
    activation: str | None = None
    vocab_size: int | None = None
    max_len: int | None = None
    pad_id: int | None = None
    image_size: int | None = None  # torchvision:/timm: models only (None: 32, as before)

    def build(self) -> nn.Module:
        return find_family(self.name).build(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelFamily:
    """How one family of models is named and built.

    `prefix=None`: the family is the one model called `name`; else it builds every name that
    starts with `prefix` (e.g. "timm:" for "timm:resnet18"). `constructor` is the class of a
    named architecture (listed in `MODELS`). `takes_image_size`: the spec carries the dataset's
    image size (library models are built for it). `usage` names a prefix family in the
    unknown-model message (e.g. "timm:NAME"; None: not listed). `accepts`: a family whose
    names follow a pattern rather than a prefix (the user's `file.py:factory`) says which it
    builds; it is asked after the exact names and prefixes. `canonical` turns a name into the
    one a checkpoint records (a relative file path made absolute). `takes_width=False`: the
    width multiplier means nothing to the model (the spec records 1.0).
    """

    name: str
    build: Callable[[ModelSpec], nn.Module]
    prefix: str | None = None
    paper_lr: float | None = None
    default_activation: str | None = None
    takes_image_size: bool = False
    constructor: Callable[..., nn.Module] | None = None
    usage: str | None = None
    accepts: Callable[[str], bool] | None = None
    canonical: Callable[[str], str] | None = None
    takes_width: bool = True

    def matches(self, name: str) -> bool:
        if self.accepts is not None:
            return self.accepts(name)
        return name.startswith(self.prefix) if self.prefix else name == self.name


FAMILIES: dict[str, ModelFamily] = {}
# The named architectures, name -> class, in registration order (kept in step by the registry).
MODELS: dict[str, Callable[..., nn.Module]] = {}
# EASIER Table 4 learning rates (the paper preset's lr), from the families that have one. Table 4
# gives none for the sequence transformer or for torchvision:/timm: models: they get
# PAPER_LR_OTHER (the ResNet-18 value).
PAPER_LR: dict[str, float] = {}
PAPER_LR_OTHER = 0.1


def register_family(family: ModelFamily) -> ModelFamily:
    """Add `family`; its name (and prefix) must be new."""
    clash = [f.name for f in FAMILIES.values() if f.name == family.name
             or (family.prefix is not None and f.prefix == family.prefix)]
    if clash:
        raise ConfigError(f"model family {family.name!r} is registered already ({clash[0]!r})")
    FAMILIES[family.name] = family
    if family.prefix is None and family.accepts is None:
        MODELS[family.name] = family.constructor or family.build
        if family.paper_lr is not None:
            PAPER_LR[family.name] = family.paper_lr
    return family


def unregister_family(name: str) -> None:
    """Remove the family called `name` (tests, or a user replacing one)."""
    FAMILIES.pop(name, None)
    MODELS.pop(name, None)
    PAPER_LR.pop(name, None)


def match_family(name: str) -> ModelFamily | None:
    """The family building model `name` (an exact name before any prefix), or None."""
    if name in FAMILIES and FAMILIES[name].prefix is None and FAMILIES[name].accepts is None:
        return FAMILIES[name]
    prefixed = next((f for f in FAMILIES.values() if f.prefix and f.matches(name)), None)
    if prefixed is not None:
        return prefixed
    return next((f for f in FAMILIES.values() if f.accepts and f.matches(name)), None)


def find_family(name: str) -> ModelFamily:
    """The family building model `name`; ConfigError naming the choices if none does."""
    family = match_family(name)
    if family is None:
        usages = " / ".join(f.usage for f in FAMILIES.values() if f.prefix and f.usage)
        libraries = f", or {usages} when those are installed" if usages else ""
        patterns = " or ".join(f.usage for f in FAMILIES.values() if f.accepts and f.usage)
        own = f", or your own model as {patterns}" if patterns else ""
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}"
                          f"{libraries}{own}")
    return family


def paper_lr(name: str) -> float:
    """The learning rate EASIER's Table 4 trains `name` with."""
    family = match_family(name)
    return PAPER_LR_OTHER if family is None or family.paper_lr is None else family.paper_lr


def default_activation(name: str) -> str | None:
    """The activation an architecture uses when none is asked for (its constructor default)."""
    family = match_family(name)
    return None if family is None else family.default_activation


def takes_image_size(name: str) -> bool:
    """Whether model `name` is built for the dataset's image size (`ModelSpec.image_size`)."""
    family = match_family(name)
    return family is not None and family.takes_image_size


def canonical_name(name: str) -> str:
    """The name a spec and its checkpoints record for model `name` (the same name for every
    family but those that resolve it, e.g. a model file's absolute path); ConfigError for an
    unknown model."""
    family = find_family(name)
    return name if family.canonical is None else family.canonical(name)


def takes_width(name: str) -> bool:
    """Whether the width multiplier scales model `name` (else the spec records 1.0)."""
    family = match_family(name)
    return family is None or family.takes_width


def build_model(name: str = "resnet18", **kwargs) -> nn.Module:
    return ModelSpec(name=name, **kwargs).build()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
