"""Fashion-MNIST from the original IDX files, gzipped or not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from depthcut.data.arrays import IMAGES, ImageDataset
from depthcut.data.errors import DatasetError
from depthcut.data.readers.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from depthcut.data.registry import DatasetSpec, register

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
    "Ankle boot",
]
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)

_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _folders(root: Path) -> list[Path]:
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", root]


def _layouts(root: Path) -> list[str]:
    names = ", ".join(f"{n}[.gz]" for n in _FILES.values())
    return [f"{folder}/{{{names}}}" for folder in _folders(root)]


def load_fashion_mnist(spec: DatasetSpec, root: Path, *, cache_dir: str | Path | None = None,
                       progress: bool = True) -> ImageDataset:
    problems = []
    found: dict[str, Path] | None = None
    for folder in _folders(root):
        if not folder.is_dir():
            continue
        paths = {}
        for key, stem in _FILES.items():
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    paths[key] = candidate
                    break
        if len(paths) == len(_FILES):
            found = paths
            break
        if paths:
            missing = [_FILES[k] for k in _FILES if k not in paths]
            problems.append(f"{folder} lacks {', '.join(missing)}")
    if found is None:
        raise spec.not_found(root, problems)

    arrays = {}
    for split in ("train", "test"):
        images = read_idx(found[f"{split}_images"], IMAGES_MAGIC)
        labels = read_idx(found[f"{split}_labels"], LABELS_MAGIC).astype(np.int64)
        if len(images) != len(labels):
            raise DatasetError(
                f"{found[f'{split}_images']} has {len(images)} images but "
                f"{found[f'{split}_labels']} has {len(labels)} labels"
            )
        if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise DatasetError(f"{found[f'{split}_labels']}: labels outside [0, 10)")
        arrays[f"{split}_inputs"] = torch.from_numpy(images[:, None])
        arrays[f"{split}_labels"] = torch.from_numpy(labels)
    return ImageDataset(
        name=spec.display_name,
        classes=FASHION_MNIST_CLASSES,
        mean=FASHION_MNIST_MEAN,
        std=FASHION_MNIST_STD,
        crop_padding=2,
        flip=True,
        **arrays,
    )


SPEC = register(DatasetSpec(
    key="fashion-mnist",
    display_name="Fashion-MNIST",
    kind=IMAGES,
    sample_shape=(1, 28, 28),
    layouts=_layouts,
    hint=(
        "torchvision.datasets.FashionMNIST(root, download=True) creates root/FashionMNIST/raw/ "
        "on a machine with internet (or download the four IDX files from "
        "https://github.com/zalandoresearch/fashion-mnist into root/fashion-mnist/)."
    ),
    loader=load_fashion_mnist,
    num_classes=10,
))
