"""Datasets held whole in memory as tensors: one base, two kinds.

`ArrayDataset` is what every consumer may rely on (inputs and int64 labels per split, class
names, the dataset's true name, its `kind`); `ImageDataset` (uint8 (N, C, H, W) images,
normalised and augmented by the loaders) and `TokenDataset` (int64 (N, T) token ids, served as
they are) add what only their kind has. Each validates its arrays once, on construction, so no
consumer has to check the layout again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from depthcut.data.disk_images import is_on_disk
from depthcut.data.errors import DatasetError

IMAGES = "images"
TOKENS = "tokens"
KINDS = (IMAGES, TOKENS)


@dataclass(eq=False, repr=False)
class ArrayDataset:
    """A whole dataset in memory: inputs and int64 labels for the train and test splits."""

    kind: ClassVar[str]

    name: str
    train_inputs: torch.Tensor
    train_labels: torch.Tensor
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def batch_options(self, *, train: bool) -> dict[str, Any]:
        """The `BatchLoader` keywords this kind fixes (normalisation; augmentation when
        `train`): the loaders ask the dataset instead of asking which kind it is."""
        raise NotImplementedError

    def _check_labels(self, split: str, inputs: torch.Tensor, labels: torch.Tensor,
                      noun: str) -> None:
        if labels.dim() != 1 or len(labels) != len(inputs):
            raise DatasetError(
                f"{self.name}: {split} labels must be 1-D with one label per {noun}, "
                f"got {tuple(labels.shape)} for {len(inputs)} {noun}s"
            )


@dataclass(eq=False, repr=False)
class ImageDataset(ArrayDataset):
    """uint8 (N, C, H, W) images, and how to treat them: per-channel `mean`/`std` for
    normalisation, `crop_padding` and `flip` for training augmentation, or a named
    `augmentation` recipe (`depthcut.data.recipes`) instead of them.

    The images are tensors in memory, or `DiskImages` (a decoded cache on disk, read a batch at
    a time) for data larger than memory."""

    kind: ClassVar[str] = IMAGES

    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_padding: int
    flip: bool
    augmentation: str | None = None
    # The training split's own per-channel (mean, std), when the loader computed them anyway
    # (an image folder, while decoding): `--normalize data` then needs no pass over the images.
    data_stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    skipped: list[str] = field(default_factory=list)  # unreadable files left out, and why

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_inputs")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4:
                raise DatasetError(
                    f"{self.name}: {split} images must be uint8 (N, C, H, W), "
                    f"got {images.dtype} {tuple(images.shape)}"
                )
            self._check_labels(split, images, labels, "image")
            if not is_on_disk(images):
                setattr(self, f"{split}_inputs", images.contiguous())
            setattr(self, f"{split}_labels", labels.to(torch.int64).contiguous())
        if self.train_inputs.shape[1:] != self.test_inputs.shape[1:]:
            raise DatasetError(
                f"{self.name}: train and test images differ in shape: "
                f"{tuple(self.train_inputs.shape[1:])} vs {tuple(self.test_inputs.shape[1:])}"
            )
        self.classes = list(self.classes)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise DatasetError(
                f"{self.name}: mean/std need {self.in_channels} value(s), "
                f"got {len(self.mean)} and {len(self.std)}"
            )

    @property
    def in_channels(self) -> int:
        return int(self.train_inputs.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_inputs.shape[2])

    def batch_options(self, *, train: bool) -> dict[str, Any]:
        options: dict[str, Any] = {"mean": self.mean, "std": self.std}
        if train and self.augmentation is not None:
            options.update(recipe=self.augmentation)
        elif train:
            options.update(crop_padding=self.crop_padding, flip=self.flip)
        return options

    def __repr__(self) -> str:
        # The default dataclass repr would print tensor contents; shapes say what matters.
        shape = "x".join(str(s) for s in self.train_inputs.shape[1:])
        return (
            f"ImageDataset(name={self.name!r}, train={len(self.train_inputs)}, "
            f"test={len(self.test_inputs)}, shape={shape}, classes={self.num_classes})"
        )


@dataclass(eq=False, repr=False)
class TokenDataset(ArrayDataset):
    """int64 (N, T) token ids in [0, `vocab_size`), `pad_id` after the end of short sequences;
    no normalisation or augmentation applies. `stats` says what reading skipped or changed."""

    kind: ClassVar[str] = TOKENS

    vocab_size: int
    pad_id: int
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            tokens = getattr(self, f"{split}_inputs")
            labels = getattr(self, f"{split}_labels")
            if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
                raise DatasetError(f"{self.name}: {split} tokens must be integer (N, T), got "
                                   f"{tokens.dtype} {tuple(tokens.shape)}")
            self._check_labels(split, tokens, labels, "text")
            if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
                raise DatasetError(f"{self.name}: {split} token ids outside [0, "
                                   f"{self.vocab_size})")
            setattr(self, f"{split}_inputs", tokens.to(torch.int64).contiguous())
            setattr(self, f"{split}_labels", labels.to(torch.int64).contiguous())
        if self.train_inputs.shape[1] != self.test_inputs.shape[1]:
            raise DatasetError(f"{self.name}: train and test sequences differ in length: "
                               f"{self.train_inputs.shape[1]} vs {self.test_inputs.shape[1]}")
        self.classes = list(self.classes)

    @property
    def seq_len(self) -> int:
        return int(self.train_inputs.shape[1])

    def batch_options(self, *, train: bool) -> dict[str, Any]:
        return {}  # token ids are served as they are

    def __repr__(self) -> str:
        return (f"TokenDataset(name={self.name!r}, train={len(self.train_inputs)}, "
                f"test={len(self.test_inputs)}, seq_len={self.seq_len}, "
                f"classes={self.num_classes})")
