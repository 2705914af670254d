"""A user's own images in class folders (torchvision's ImageFolder layout), at any size.

``--dataset imagefolder --data-root DIR``: DIR holds ``train/<class>/*`` and ``test/<class>/*``
(or ``val/<class>/*``), or only ``train/<class>/*``, or the class folders themselves; where no
test split exists, a stratified 20% of each class is held out with seed 0 (fixed, so runs with
different seeds test on the same images). Any number of classes (at least 2), images of any
size and mode, resized and centre-cropped to ``--image-size`` (default: the first training
image's shorter side) and decoded once into a cache on disk that the loaders read a batch at a
time, so the data may be larger than memory. The dataset is named after DIR; the classes after
its folders. Normalisation: the training split's own statistics; augmentation: the ``cifar``
recipe (``--normalize`` and ``--augment`` choose others).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from depthcut.data.arrays import IMAGES, ImageDataset
from depthcut.data.errors import DatasetError
from depthcut.data.readers.folder_cache import (
    IMAGE_SUFFIXES,
    TEST,
    TRAIN,
    FolderCache,
    find_layout,
    first_image_side,
    list_images,
    open_folder_cache,
)
from depthcut.data.registry import DatasetSpec, register
from depthcut.errors import ConfigError

HELD_OUT_FRACTION = 0.2
HELD_OUT_SEED = 0


def _layouts(root: Path) -> list[str]:
    return [
        f"{root}/train/<class>/<image> and {root}/test/<class>/<image> (or val/)",
        f"{root}/train/<class>/<image> only (20% of each class held out as the test split)",
        f"{root}/<class>/<image> (20% of each class held out as the test split)",
    ]


def held_out_split(labels: np.ndarray, fraction: float = HELD_OUT_FRACTION,
                   seed: int = HELD_OUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Positions (train, test) into `labels`: `fraction` of each class to test (at least one
    image where a class has two or more), chosen by `seed`."""
    generator = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[generator.permutation(len(members))]
        n_test = min(max(round(len(members) * fraction), 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _split_rows(cache: FolderCache, has_test: bool) -> tuple[np.ndarray, np.ndarray]:
    """File rows of the train and test splits, readable images only."""
    readable = np.flatnonzero(cache.readable)
    if has_test:
        splits = cache.splits[readable]
        return readable[splits == TRAIN], readable[splits == TEST]
    train, test = held_out_split(cache.labels[readable])
    return readable[train], readable[test]


def _data_stats(cache: FolderCache, rows: np.ndarray, pixels: int
                ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    count = len(rows) * pixels
    mean = cache.pixel_sums[rows].sum(axis=0) / count
    variance = cache.pixel_squares[rows].sum(axis=0) / count - mean * mean
    std = np.sqrt(np.maximum(variance, 1e-12))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def load_image_folder(spec: DatasetSpec, root: Path, *, cache_dir: str | Path | None = None,
                      progress: bool = True, image_size: int | None = None,
                      skip_unreadable: bool = False) -> ImageDataset:
    layout = find_layout(root)
    if layout is None:
        problems = [f"{root} holds no class folders with images"] if root.is_dir() else []
        raise spec.not_found(root, problems)
    if image_size is not None and image_size < 8:
        raise ConfigError(f"--image-size must be at least 8, got {image_size}")
    images = list_images(layout)
    size = image_size or first_image_side(images)
    name = root.resolve().name or str(root)
    cache = open_folder_cache(images, size, cache_dir=cache_dir, progress=progress,
                              description=f"decoding {name} at {size} px",
                              skip_unreadable=skip_unreadable)
    train_rows, test_rows = _split_rows(cache, layout.test is not None)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        present = set(cache.labels[rows].tolist())
        if len(present) < 2:
            raise DatasetError(f"{root}: the readable {split} images cover "
                               f"{len(present)} class(es); at least 2 are needed")
    stats = _data_stats(cache, train_rows, size * size)
    return ImageDataset(
        name=name,
        train_inputs=cache.images.subset(torch.from_numpy(train_rows)),
        train_labels=torch.from_numpy(cache.labels[train_rows]),
        test_inputs=cache.images.subset(torch.from_numpy(test_rows)),
        test_labels=torch.from_numpy(cache.labels[test_rows]),
        classes=images.classes,
        mean=stats[0],
        std=stats[1],
        crop_padding=max(1, round(size / 8)),
        flip=True,
        augmentation="cifar",
        data_stats=stats,
        skipped=[error for error in cache.errors] if skip_unreadable else [],
    )


SPEC = register(DatasetSpec(
    key="imagefolder",
    display_name="Image folder",
    kind=IMAGES,
    sample_shape=None,  # (3, S, S) for --image-size S
    layouts=_layouts,
    hint=(f"put one folder per class (at least 2) of images ({', '.join(IMAGE_SUFFIXES)}) "
          "under train/ (and test/ or val/) in the data root; the dataset takes the root's "
          "name, the classes the folders' names."),
    loader=load_image_folder,
    load_options=("image_size", "skip_unreadable"),
))
