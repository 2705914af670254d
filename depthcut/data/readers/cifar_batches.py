"""The CIFAR python pickle batches (torchvision's ``cifar-10-batches-py/`` files)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from depthcut.data.errors import DatasetError

PIXELS = 3 * 32 * 32  # one row of a batch: the R, G and B planes of a 32x32 image


def unpickle(path: Path) -> dict:
    # Pickle can run code: only load files the user put there (torchvision does the same).
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as error:
        raise DatasetError(f"{path}: not a readable CIFAR-10 pickle batch ({error})") from error
    if not isinstance(content, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(content).__name__}")
    return content


def pick(content: dict, key: str, path: Path) -> Any:
    """Python 2 pickles (the official files) have bytes keys; accept str keys too."""
    for candidate in (key.encode(), key):
        if candidate in content:
            return content[candidate]
    raise DatasetError(f"{path}: no {key!r} entry (keys: {sorted(map(str, content))})")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: uint8 (N, 3, 32, 32) images and int64 labels."""
    content = unpickle(path)
    data = np.asarray(pick(content, "data", path))
    labels = np.asarray(pick(content, "labels", path), dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        raise DatasetError(f"{path}: data must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (len(data),):
        raise DatasetError(f"{path}: {len(labels)} labels for {len(data)} images")
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32)), labels


def read_label_names(path: Path) -> list[str]:
    """The class names of a ``batches.meta`` file."""
    names = pick(unpickle(path), "label_names", path)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]
