"""CIFAR-10 re-encoded as JPEG in an ImageFolder layout, as ``cifar10-jpeg.tar.gz`` (read in
place) or an extracted folder; decoded once, then cached."""

from __future__ import annotations

from pathlib import Path

import torch

from depthcut.data.arrays import IMAGES, ImageDataset
from depthcut.data.datasets.cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD
from depthcut.data.readers.image_folder import find_source, read_image_folder
from depthcut.data.registry import DatasetSpec, register

_ARCHIVE = "cifar10-jpeg.tar.gz"
_FOLDER = "cifar10-jpeg"


def _layouts(root: Path) -> list[str]:
    return [
        f"{root / _ARCHIVE} (train/<class>/*.jpg and test/<class>/*.jpg inside)",
        f"{root / _FOLDER}/train/<class>/*.jpg and .../test/<class>/*.jpg",
        f"{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg",
    ]


def load_cifar10_jpeg(spec: DatasetSpec, root: Path, *, cache_dir: str | Path | None = None,
                      progress: bool = True) -> ImageDataset:
    """Decode the JPEGs once and cache the arrays, keyed by the source's content."""
    source = find_source(root, _ARCHIVE, _FOLDER)
    if source is None:
        raise spec.not_found(root)
    arrays = read_image_folder(source, cache_name=spec.key, display_name=spec.display_name,
                               cache_dir=cache_dir, progress=progress)
    return ImageDataset(
        name=spec.display_name,
        train_inputs=torch.from_numpy(arrays["train_images"]),
        train_labels=torch.from_numpy(arrays["train_labels"]),
        test_inputs=torch.from_numpy(arrays["test_images"]),
        test_labels=torch.from_numpy(arrays["test_labels"]),
        classes=[str(c) for c in arrays["classes"]],
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        crop_padding=4,
        flip=True,
    )


SPEC = register(DatasetSpec(
    key="cifar10-jpeg",
    display_name="CIFAR-10 (JPEG)",
    kind=IMAGES,
    sample_shape=None,  # whatever size the JPEGs have (32x32 in the real archive)
    layouts=_layouts,
    hint=(
        f"put {_ARCHIVE} (ImageFolder layout, classes {', '.join(CIFAR10_CLASSES)}) in root, "
        "or extract it there; use dataset 'cifar10' for torchvision's original CIFAR-10 files."
    ),
    loader=load_cifar10_jpeg,
    num_classes=10,
))
