"""Datasets held whole in memory, the registry that names them, splits and batch loaders.

The public API the rest of depthcut uses; the pieces live in their own modules:

- `arrays`: `ArrayDataset` and its two kinds, `ImageDataset` and `TokenDataset`.
- `registry`: `DatasetSpec`, `register`, `load_dataset` and the lookups by name.
- `datasets/`: one file per dataset, each registering its spec (importing this package loads
  them all).
- `readers/`: the file formats (CIFAR pickle batches, ImageFolder archives and folders, IDX,
  the fortunes archive).
- `cache`: the cache of decoded arrays.
- `loaders`: `split_indices`, `augment`, `BatchLoader`, `DataSplits`, `make_splits`.
"""

from depthcut.data.arrays import ArrayDataset, ImageDataset, TokenDataset
from depthcut.data.datasets import DATASET_MODULES
from depthcut.data.errors import DatasetError, DatasetNotFoundError
from depthcut.data.loaders import BatchLoader, DataSplits, augment, make_splits, split_indices
from depthcut.data.registry import (
    DatasetSpec,
    dataset_names,
    dataset_presets,
    dataset_settings,
    dataset_spec,
    display_name,
    load_dataset,
    register,
    unregister,
)

__all__ = [
    "DATASET_MODULES",
    "ArrayDataset",
    "BatchLoader",
    "DataSplits",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "ImageDataset",
    "TokenDataset",
    "augment",
    "dataset_names",
    "dataset_presets",
    "dataset_settings",
    "dataset_spec",
    "display_name",
    "load_dataset",
    "make_splits",
    "register",
    "split_indices",
    "unregister",
]
