"""Flat settings: presets, config files and flags, mapped onto the config dataclasses.

Every setting is one flat key (`depthcut.options.Option`), declared beside the dataclass it
sets: the data, model and dense-training settings in `depthcut.experiment`, the settings of
every training in `depthcut.train`, each method's in its file (`MethodSpec.options`). A preset
is the union of the values each of them declares for it (`EXPERIMENT_PRESETS`, each
`MethodSpec.presets`, a dataset's own overlay), plus the paper learning rate of the model
(`depthcut.models.paper_lr`). The same functions serve the CLI and the Python API:

    settings = resolve("paper", flags={"model": "swin-t"})
    easier = build_config(EasierConfig, settings)
    experiment = experiment_config(settings)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from depthcut.data import dataset_presets
from depthcut.errors import ConfigError
from depthcut.experiment import (
    DATA_MODEL_OPTIONS,
    DENSE_TRAINING_OPTIONS,
    EXPERIMENT_PRESETS,
    ExperimentConfig,
)
from depthcut.memory_format import normalize_setting
from depthcut.methods import compare_defaults, methods
from depthcut.models import paper_lr
from depthcut.options import Option
from depthcut.train import TRAIN_OPTIONS, TrainConfig


def declared_options() -> Iterator[tuple[type, Option]]:
    """Every option with the config class it is declared for."""
    for option in (*DATA_MODEL_OPTIONS, *DENSE_TRAINING_OPTIONS):
        yield ExperimentConfig, option
    for option in TRAIN_OPTIONS:
        yield TrainConfig, option
    for spec in methods():
        for option in (*spec.options, *(spec.compare_options or ()), *spec.training_options):
            yield spec.config, option


def _has_field(cls: type, path: str) -> bool:
    return any(f.name == path.split(".")[0] for f in dataclasses.fields(cls))


def fields_table() -> dict[str, tuple[tuple[type, str], ...]]:
    """Each setting and the config dataclass fields it sets, as (dataclass, "field" or
    "train_field.field"). (TrainConfig, "field") sets that field of every TrainConfig of a run:
    dense training, finetuning and slope training. A method without the field (Layer Folding
    counts no entropy) ignores the setting."""
    table: dict[str, list[tuple[type, str]]] = {}
    for cls, option in declared_options():
        owner = option.owner or cls
        target = (owner, option.field_path)
        if _has_field(owner, option.field_path) and target not in table.get(option.key, []):
            table.setdefault(option.key, []).append(target)
    return {key: tuple(targets) for key, targets in table.items()}


def field_default(cls: type, path: str) -> Any:
    """The default of `cls`'s field at `path` ("field" or "train_field.field")."""
    head, _, rest = path.partition(".")
    item = next(f for f in dataclasses.fields(cls) if f.name == head)
    value = item.default if item.default is not dataclasses.MISSING else item.default_factory()
    for name in rest.split(".") if rest else ():
        value = getattr(value, name)
    return value


def _plain(value: Any) -> Any:
    """A default as a --config file would hold it (tuples as JSON lists)."""
    return list(value) if isinstance(value, tuple) else value


def defaults() -> dict[str, Any]:
    """Every setting's default: its first field's dataclass default (tests check that the
    others agree); compare's methods: every method but the variants."""
    values = {key: _plain(field_default(*targets[0])) for key, targets in fields_table().items()}
    values["methods"] = compare_defaults()
    return values


def presets() -> dict[str, dict[str, Any]]:
    """Each preset's values: the experiment's, then every method's (which must agree where
    they share a setting)."""
    table = {name: dict(values) for name, values in EXPERIMENT_PRESETS.items()}
    for spec in methods():
        for name, values in spec.presets.items():
            preset = table.setdefault(name, {})
            for key, value in values.items():
                if key in preset and preset[key] != value:
                    raise ConfigError(f"preset {name!r}: {spec.name} sets {key}={value!r}, "
                                      f"another part sets {preset[key]!r}")
                preset[key] = value
    return table


def build_config(cls: type, settings: Mapping[str, Any], **extra: Any) -> Any:
    """A `cls` (ExperimentConfig, TrainConfig or a method's config) from flat settings; fields
    no setting names keep their dataclass defaults; `extra` sets fields of `cls` directly."""
    values: dict[str, Any] = {}
    trainings = [f.name for f in dataclasses.fields(cls)
                 if isinstance(field_default(cls, f.name), TrainConfig)]
    for key, targets in fields_table().items():
        if key not in settings:
            continue
        for owner, path in targets:
            if owner is cls:
                paths = [path]
            elif owner is TrainConfig:  # a shared training setting: every training of cls
                paths = [f"{name}.{path}" for name in trainings]
            else:
                continue
            for target in paths:
                head, _, rest = target.partition(".")
                if rest:
                    values.setdefault(head, {})[rest] = settings[key]
                else:
                    values[head] = settings[key]
    for name in trainings:
        if name in values:
            values[name] = TrainConfig(**values[name])
    return cls(**values, **extra)


def experiment_config(settings: Mapping[str, Any], progress: bool = True) -> ExperimentConfig:
    return build_config(ExperimentConfig, settings, progress=progress)


def setting_type(key: str) -> Any:
    """The type a setting's value must have: its dataclass field's annotation (None too where
    a preset uses None: "same as lr", "Table 4's rate")."""
    if key == "methods":
        return list[str]
    owner, path = fields_table()[key][0]
    *parents, name = path.split(".")
    cls = owner
    for parent in parents:
        cls = type(field_default(cls, parent))
    hint = typing.get_type_hints(cls)[name]
    if any(key in preset and preset[key] is None for preset in presets().values()):
        hint = hint | None
    return hint


def _accepts(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_accepts(option, value) for option in typing.get_args(hint))
    if origin in (tuple, list):
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(hint)[0]).split()[-1]}s"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(settings: Mapping[str, Any], source: object) -> None:
    """Raise ConfigError for a setting from `source` (a --config file) of the wrong type."""
    for key, value in settings.items():
        hint = setting_type(key)
        if not _accepts(hint, value):
            raise ConfigError(f"{source}: {key} must be {_type_name(hint)}, got {value!r}")


def resolve(preset: str = "quick", config: Mapping[str, Any] | None = None,
            flags: Mapping[str, Any] | None = None, *, source: object = "settings"
            ) -> dict[str, Any]:
    """The settings of a run: `preset` (with its dataset's overlay, e.g. the text datasets'
    model and training), then `config` (a --config file's values, named `source` in errors),
    then `flags`. A learning rate left None means the paper rate of the model (`lr`) or the
    same as `lr` (every other `*_lr`)."""
    table = presets()
    if preset not in table:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(table)}")
    settings = {**defaults(), **table[preset]}
    loaded = dict(config or {})
    flags = dict(flags or {})
    unknown = sorted(set(loaded) - set(settings))
    if unknown:
        raise ConfigError(f"unknown keys in {source}: {', '.join(unknown)}; known: "
                          f"{', '.join(sorted(settings))}")
    check_types(loaded, source)
    unknown = sorted(set(flags) - set(settings))
    if unknown:
        raise ConfigError(f"unknown settings {', '.join(unknown)}")
    dataset = flags.get("dataset") or loaded.get("dataset", settings["dataset"])
    settings.update(dataset_presets(dataset, preset))  # part of the preset: files, flags win
    settings.update(loaded)
    settings.update(flags)
    # Older config files wrote channels_last as true / false / null.
    settings["channels_last"] = normalize_setting(settings["channels_last"])
    if settings["lr"] is None:  # the paper preset: Table 4's rate for this architecture
        settings["lr"] = paper_lr(settings["model"])
    for key in settings:
        if key.endswith("_lr") and settings[key] is None:
            settings[key] = settings["lr"]
    return settings
