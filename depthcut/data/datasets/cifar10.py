"""CIFAR-10 from torchvision's python pickle batches (``cifar-10-batches-py/``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from depthcut.data.arrays import IMAGES, ImageDataset
from depthcut.data.errors import DatasetError
from depthcut.data.readers.cifar_batches import read_batch, read_label_names
from depthcut.data.registry import DatasetSpec, register

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_FOLDER = "cifar-10-batches-py"
_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _layouts(root: Path) -> list[str]:
    files = ", ".join([*_TRAIN_BATCHES, "test_batch", "batches.meta"])
    return [f"{root / _FOLDER}/{{{files}}}", f"{root}/{{{files}}}"]


def load_cifar10(spec: DatasetSpec, root: Path, *, cache_dir: str | Path | None = None,
                 progress: bool = True) -> ImageDataset:
    """Read torchvision's layout; root may be the data root or the batches folder itself."""
    required = [*_TRAIN_BATCHES, "test_batch"]
    problems = []
    folder = None
    for candidate in (root / _FOLDER, root):
        if not candidate.is_dir():
            continue
        missing = [f for f in required if not (candidate / f).is_file()]
        if not missing:
            folder = candidate
            break
        if len(missing) < len(required):  # a partial copy: say what is missing
            problems.append(f"{candidate} lacks {', '.join(missing)}")
    if folder is None:
        raise spec.not_found(root, problems)

    train = [read_batch(folder / f) for f in _TRAIN_BATCHES]
    test_images, test_labels = read_batch(folder / "test_batch")
    classes = CIFAR10_CLASSES
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        classes = read_label_names(meta_path)
    train_images = np.concatenate([images for images, _ in train])
    train_labels = np.concatenate([labels for _, labels in train])
    for path, labels in ((folder, train_labels), (folder / "test_batch", test_labels)):
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise DatasetError(f"{path}: labels outside [0, {len(classes)})")
    return ImageDataset(
        name=spec.display_name,
        train_inputs=torch.from_numpy(train_images),
        train_labels=torch.from_numpy(train_labels),
        test_inputs=torch.from_numpy(test_images),
        test_labels=torch.from_numpy(test_labels),
        classes=classes,
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        crop_padding=4,
        flip=True,
    )


SPEC = register(DatasetSpec(
    key="cifar10",
    display_name="CIFAR-10",
    kind=IMAGES,
    sample_shape=(3, 32, 32),
    layouts=_layouts,
    hint=(
        "torchvision.datasets.CIFAR10(root, download=True) creates this layout on a machine with "
        "internet (or extract cifar-10-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html into root)."
    ),
    loader=load_cifar10,
    num_classes=10,
))
