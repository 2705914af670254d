"""Depth-reduction methods: each file holds only what makes its method; the loop is shared.

Every method's file ends by registering its `MethodSpec`: its name, settings class, runner,
label, the record fields it adds, its command-line options and preset values, and whether it
gets a cost table. The CLI, `depthcut.experiment` and `depthcut.reports` loop over `methods()`
and never name a method, so a new method is one new file here (and its test). A method defined
elsewhere (a user's, a test's) registers the same way before the CLI is built.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from depthcut.errors import ConfigError
from depthcut.options import Option
from depthcut.stages import MethodResult, place_extras

# A method's runner: (model, splits, its config, *, dense_record, history, on_stage, progress,
# snapshots, metric, teacher) -> MethodResult, as `depthcut.stages.run_stages` takes them.
Runner = Callable[..., MethodResult]


@dataclass(frozen=True)
class MethodSpec:
    """What the rest of depthcut needs to know about one method."""

    name: str  # written as "method" in records and config.json ("layer_folding")
    config: type  # its settings dataclass
    runner: Runner
    label: str  # how tables and plots name it
    help: str = ""  # the command's one-line help; "" = no command of its own
    title: str = ""  # heading of its options in --help (default: label)
    options: tuple[Option, ...] = ()  # its command-line settings (see depthcut.options)
    # Finetune settings it shares with other methods: shown in its group, and once under
    # "finetuning (every method)" in `compare`.
    training_options: tuple[Option, ...] = ()
    compare_options: tuple[Option, ...] | None = None  # in `compare` (default: `options`)
    compare_title: str = ""  # heading of its options in `compare --help` (default: title)
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # preset -> values
    record_fields: Mapping[str, str] = field(default_factory=dict)  # extra -> written before
    cost_table: bool = True  # reports fold and time every stage (Table 3)
    comparable: bool = True  # `compare` can run it
    compare_default: bool = True  # ... and does when --methods is not given
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # compare names
    reference: bool = False  # the fair-compute reference (no site removed), not a method
    depth_reference: bool = False  # its answer's site count is the comparison's common depth
    order: int = 100  # place in listings, compare and tables
    # Settings checked against the model's site count before anything is written.
    check: Callable[[Any, int], None] | None = None
    # The config to run in `compare` given the depth reference's answer (sites removed).
    with_depth: Callable[[Any, int], Any] | None = None
    # A run's label from its config.json settings (default: `label`).
    label_of: Callable[[Mapping[str, Any]], str] | None = None
    # The CLI's closing lines about a finished run (after the stage table).
    describe: Callable[[MethodResult], str] | None = None

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")

    def settings_or_defaults(self, settings: object | None) -> Any:
        """`settings` if it is this method's config (None: the config's defaults)."""
        if settings is None:
            return self.config()
        if not isinstance(settings, self.config):
            raise ConfigError(f"{self.label} takes a {self.config.__name__}, got "
                              f"{type(settings).__name__}")
        return settings

    def run_label(self, settings: Mapping[str, Any]) -> str:
        return self.label_of(settings) if self.label_of else self.label


_REGISTRY: dict[str, MethodSpec] = {}
_DISCOVERED = False


def register(spec: MethodSpec) -> MethodSpec:
    """Add `spec` (replacing one of the same name); its record fields get their places."""
    _REGISTRY[spec.name] = spec
    place_extras(spec.record_fields)
    return spec


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _discover() -> None:
    """Import every module of this package once: each registers its method."""
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")


def methods() -> list[MethodSpec]:
    """Every registered method, in listing order."""
    _discover()
    return sorted(_REGISTRY.values(), key=lambda spec: (spec.order, spec.name))


def get_method(name: str) -> MethodSpec:
    """The method named `name` (records' name, "layer_folding", or its command,
    "layer-folding")."""
    for spec in methods():
        if name in (spec.name, spec.command):
            return spec
    raise ConfigError(f"unknown method {name!r}; known: "
                      f"{', '.join(spec.command for spec in methods())}")


def comparable() -> dict[str, tuple[MethodSpec, Mapping[str, Any]]]:
    """What `compare --methods` accepts: each method's command and its variants, with the
    settings a variant replaces."""
    names: dict[str, tuple[MethodSpec, Mapping[str, Any]]] = {}
    for spec in methods():
        if spec.comparable:
            names[spec.command] = (spec, {})
            names.update({variant: (spec, values) for variant, values in spec.variants.items()})
    return names


def compare_defaults() -> list[str]:
    return [spec.command for spec in methods() if spec.comparable and spec.compare_default]


def reference_method() -> MethodSpec | None:
    return next((spec for spec in methods() if spec.reference), None)
