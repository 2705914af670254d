"""Datasets held whole in memory, the registry that names them, splits and batch loaders.

The public API the rest of depthcut uses; the pieces live in their own modules:

- `arrays`: `ArrayDataset` and its two kinds, `ImageDataset` and `TokenDataset`.
- `registry`: `DatasetSpec`, `register`, `load_dataset` and the lookups by name.
- `datasets/`: one file per dataset, each registering its spec (importing this package loads
  them all).
- `readers/`: the file formats (CIFAR pickle batches, ImageFolder archives and folders, IDX,
  the fortunes archive).
- `cache`: the cache of decoded arrays.
- `disk_images`: `DiskImages`, decoded images on disk read a batch at a time (data larger
  than memory), and the row writer that fills them.
- `recipes`: training augmentation recipes by name (`cifar`, `domainbed`, `flowers`, `none`).
- `normalization`: per-channel normalisation by name (`data`, `imagenet`, given values).
- `provenance`: what runs and checkpoints record about their data (true name, input shape),
  and the check that a checkpoint matches the data it is used on.
- `loaders`: `split_indices`, `augment`, `BatchLoader`, `DataSplits`, `make_splits`.
"""

from depthcut.data.arrays import ArrayDataset, ImageDataset, TokenDataset
from depthcut.data.datasets import DATASET_MODULES
from depthcut.data.disk_images import DiskImages
from depthcut.data.errors import DatasetError, DatasetNotFoundError
from depthcut.data.loaders import BatchLoader, DataSplits, augment, make_splits, split_indices
from depthcut.data.normalization import NORMALIZE_HELP
from depthcut.data.provenance import data_origin, data_record, input_shape_mismatch
from depthcut.data.recipes import recipe_names
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
    "DiskImages",
    "NORMALIZE_HELP",
    "ImageDataset",
    "TokenDataset",
    "augment",
    "data_origin",
    "data_record",
    "input_shape_mismatch",
    "dataset_names",
    "dataset_presets",
    "dataset_settings",
    "dataset_spec",
    "display_name",
    "load_dataset",
    "make_splits",
    "recipe_names",
    "register",
    "split_indices",
    "unregister",
]
