"""Which datasets exist, and loading one by name.

Every dataset lives in one file of `depthcut.data.datasets` that calls `register` with its
`DatasetSpec`: the option value, its true name, where its files are expected, its kind and its
loader. Nothing else names a dataset: the CLI's choices, the reports' names and the text
presets all ask this registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from depthcut.data.arrays import KINDS, ArrayDataset, ImageDataset
from depthcut.data.errors import DatasetNotFoundError
from depthcut.data.normalization import normalized
from depthcut.data.recipes import get_recipe
from depthcut.errors import ConfigError


class Loader(Protocol):
    """Reads a dataset from its data root (a folder, or a file where `spec.root_is_file`, that
    exists or not: say what is missing with `spec.not_found`); `cache_dir` and `progress`
    serve loaders that decode and cache. A loader that takes more gets them as keywords: the
    run settings its spec names in `settings` (e.g. "text_field"), the `load_dataset` options
    it names in `load_options` (`image_size`, `skip_unreadable`)."""

    def __call__(self, spec: DatasetSpec, root: Path, *, cache_dir: str | Path | None,
                 progress: bool, **options: Any) -> ArrayDataset: ...


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset, as the registry knows it.

    `layouts(root)` lists every place the loader looks, in order, and `hint` how to get the
    files: both go into the message of a missing dataset. `sample_shape` is one input's shape,
    (C, H, W) or (T,), where the format fixes it (None where the files decide).
    """

    key: str  # the option value, e.g. "cifar10"
    display_name: str  # the dataset's true name, for messages and reports: "CIFAR-10"
    kind: str  # "images" (an ImageDataset) or "tokens" (a TokenDataset)
    sample_shape: tuple[int, ...] | None
    layouts: Callable[[Path], list[str]]
    hint: str
    loader: Loader
    # Per preset, the settings this data needs beyond the preset itself (a text dataset: the
    # byte-level transformer and its training); the config file and flags still win.
    presets: Mapping[str, Mapping[str, object]] = field(default_factory=dict)
    # The class count where the format fixes it (None where the files decide): a model and its
    # weights are checked against it before any file is decoded.
    num_classes: int | None = None
    # The data root is one file (a user's JSONL or CSV), not a folder.
    root_is_file: bool = False
    # The run's settings (ExperimentConfig fields, e.g. "text_field") the loader takes as
    # keywords: how to read the files, where one format has several spellings.
    settings: tuple[str, ...] = ()
    # The settings of `load_dataset` its loader takes as keywords (`LOAD_OPTIONS`).
    load_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.key != normalize_name(self.key):
            raise ValueError(f"dataset key {self.key!r} must be lower case with '-' for '_'")
        unknown = set(self.load_options) - set(LOAD_OPTIONS)
        if unknown:
            raise ValueError(f"dataset {self.key!r}: unknown load options {sorted(unknown)}; "
                             f"known: {LOAD_OPTIONS}")
        if self.kind not in KINDS:
            raise ValueError(f"dataset {self.key!r}: kind must be one of {KINDS}, "
                             f"got {self.kind!r}")

    def layout_text(self, root: Path, problems: Sequence[str] = ()) -> str:
        lines = ["Expected one of these layouts:"]
        lines += [f"  - {layout}" for layout in self.layouts(root)]
        lines += [f"Found: {problem}" for problem in problems]
        lines.append(f"Hint: {self.hint}")
        return "\n".join(lines)

    def not_found(self, root: Path, problems: Sequence[str] = ()) -> DatasetNotFoundError:
        """The error for files missing under `root`; `problems` says what was found instead."""
        return DatasetNotFoundError(
            f"{self.display_name} dataset not found under data root {root}.\n"
            f"{self.layout_text(root, problems)}"
        )


_SPECS: dict[str, DatasetSpec] = {}
# Loading settings a dataset may take, with the flag that sets them (for messages).
LOAD_OPTIONS = {"image_size": "--image-size", "skip_unreadable": "--skip-unreadable"}


def normalize_name(name: str) -> str:
    """The registry key a user's spelling means: "Fashion_MNIST" -> "fashion-mnist"."""
    return name.strip().lower().replace("_", "-")


def register(spec: DatasetSpec) -> DatasetSpec:
    """Add a dataset (once per key); returns `spec`, for a module-level name."""
    if spec.key in _SPECS:
        raise ValueError(f"dataset {spec.key!r} is registered twice")
    _SPECS[spec.key] = spec
    return spec


def unregister(key: str) -> None:
    """Remove a dataset (tests that register their own)."""
    del _SPECS[key]


def dataset_names(kind: str | None = None) -> tuple[str, ...]:
    """The registered keys, in registration order; only those of `kind` when given."""
    return tuple(key for key, spec in _SPECS.items() if kind is None or spec.kind == kind)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec of dataset `name` (any case, '_' for '-'); ConfigError when unknown."""
    spec = _SPECS.get(normalize_name(name))
    if spec is None:
        raise ConfigError(
            f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}"
        )
    return spec


def dataset_presets(name: str, preset: str) -> dict[str, object]:
    """The settings dataset `name` adds to `preset` ({} for an unknown name: the run's own
    check reports it)."""
    spec = _SPECS.get(normalize_name(name))
    return dict(spec.presets.get(preset, {})) if spec is not None else {}


def display_name(key: str) -> str:
    """The true name of dataset `key`, or `key` itself when none is registered under it."""
    spec = _SPECS.get(key)
    return spec.display_name if spec is not None else key


def dataset_settings(name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a run's `settings` that dataset `name` reads ({} for an unknown name)."""
    spec = _SPECS.get(normalize_name(name))
    keys = spec.settings if spec is not None else ()
    return {key: settings[key] for key in keys if key in settings}


def load_dataset(
    name: str,
    root: str | Path,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    settings: Mapping[str, Any] | None = None,
    *,
    image_size: int | None = None,
    skip_unreadable: bool = False,
    augment: str | None = None,
    normalize: str | None = None,
) -> ArrayDataset:
    """Load dataset `name` from the data root `root` (into memory, or a cache on disk).

    `cache_dir` is used by datasets that decode their files once and cache the arrays; it
    defaults to ``$DEPTHCUT_CACHE`` or ``~/.cache/depthcut``. `settings`: the run's settings;
    the loader gets those its spec names (`DatasetSpec.settings`), the others are ignored.
    `image_size` and `skip_unreadable` go to datasets that take them
    (`DatasetSpec.load_options`; a dataset of a fixed size accepts its own size). `augment` (a
    recipe of `depthcut.data.recipes`) and `normalize` (`depthcut.data.normalization`)
    replace an image dataset's own; None keeps it.
    """
    spec = dataset_spec(name)
    asked = {"image_size": image_size, "skip_unreadable": skip_unreadable}
    options = {key: value for key, value in asked.items() if key in spec.load_options}
    root = Path(root).expanduser()
    if root.exists() and root.is_dir() == spec.root_is_file:
        found, expected = ("a folder", "a file") if spec.root_is_file else ("a file", "a folder")
        raise DatasetNotFoundError(
            f"{spec.display_name} dataset: the data root {root} is {found}, not {expected}.\n"
            f"{spec.layout_text(root)}"
        )
    if skip_unreadable and "skip_unreadable" not in options:
        raise ConfigError(f"--skip-unreadable applies to datasets of image files "
                          f"({', '.join(_taking('skip_unreadable'))}), not {spec.key}")
    dataset = spec.loader(spec, root, cache_dir=cache_dir, progress=progress, **options,
                          **dataset_settings(name, settings or {}))
    if not isinstance(dataset, ArrayDataset) or dataset.kind != spec.kind:
        raise TypeError(f"dataset {spec.key!r} is registered as {spec.kind}, its loader "
                        f"returned {type(dataset).__name__}")
    return image_treatment(dataset, image_size=image_size, augment=augment,
                           normalize=normalize)


def _taking(option: str) -> list[str]:
    return [key for key, spec in _SPECS.items() if option in spec.load_options]


def image_treatment(dataset: ArrayDataset, *, image_size: int | None, augment: str | None,
                    normalize: str | None) -> ArrayDataset:
    """Check `image_size` against a fixed-size dataset; set the augmentation recipe and the
    normalisation asked for."""
    if not isinstance(dataset, ImageDataset):
        asked = [flag for flag, value in (("--image-size", image_size), ("--augment", augment),
                                          ("--normalize", normalize)) if value is not None]
        if asked:
            raise ConfigError(f"{', '.join(asked)} apply to images; {dataset.name} holds "
                              f"{dataset.kind}")
        return dataset
    if image_size is not None and image_size != dataset.image_size:
        raise ConfigError(
            f"{dataset.name} has {dataset.image_size} px images and is not resized; "
            f"--image-size {image_size} applies to datasets of image files "
            f"({', '.join(_taking('image_size'))})")
    if augment is not None:
        get_recipe(augment)  # a ConfigError naming the recipes when unknown
        dataset = dataclasses.replace(dataset, augmentation=augment)
    return normalized(dataset, normalize)
