"""Splits and batch loaders over datasets held in (device) memory or on disk.

A small dataset's split lives in memory and every batch is cut, augmented and normalised with
tensor ops: no worker processes, no per-sample Python, the same code on CPU and GPU. A dataset
larger than memory keeps its decoded images on disk (`DiskImages`): each batch's rows are read
by a background thread while the previous batch trains, then augmented and normalised the
same way. Integer (N, T) token ids are served as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from depthcut import distributed
from depthcut.data.arrays import ArrayDataset
from depthcut.data.disk_images import DiskImages, is_on_disk
from depthcut.data.recipes import augment, get_recipe
from depthcut.errors import ConfigError

__all__ = ["BatchLoader", "DataSplits", "augment", "make_splits", "split_indices"]


def split_indices(
    n: int, val_fraction: float, seed: int, subset: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) index split of range(n); the last round(n * val_fraction) go to val.

    `subset` keeps only the first `subset` training indices (a random subset, since the order is a
    random permutation), for quick runs on part of the data.
    """
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    permutation = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * val_fraction)
    train, val = permutation[: n - n_val], permutation[n - n_val :]
    if n > 0 and len(train) == 0:
        raise ConfigError(f"val_fraction {val_fraction} of {n} samples leaves none for training")
    if subset is not None:
        if subset < 1:
            raise ConfigError(f"subset must be >= 1, got {subset}")
        if subset > len(train):
            raise ConfigError(
                f"subset {subset} is larger than the {len(train)} training samples available "
                f"({n} samples, val_fraction {val_fraction})"
            )
        train = train[:subset]
    return train, val


def _make_generator(device: torch.device) -> torch.Generator:
    """A generator on `device` when the backend has one, else on CPU (augment copies over)."""
    try:
        return torch.Generator(device=device)
    except RuntimeError:
        return torch.Generator()


_AUGMENT_SEED_OFFSET = 0x9E3779B9  # keeps the augmentation stream apart from the shuffle stream


class BatchLoader:
    """Iterates (inputs, targets) batches from tensors already in memory: normalisation and
    augmentation done on tensors, on `device`.

    uint8 (N, C, H, W) images are moved to `device` once, as uint8; each batch is converted to
    float32 there. Epoch `e` (the e-th call of ``iter``) shuffles with seed ``seed + e`` and
    augments from a stream seeded from the same, so a run is reproducible batch for batch.

    Integer (N, T) token ids are served as they are, int64: no normalisation, augmentation or
    memory format applies to them (`mean`, `std`, `augment`, `channels_last` are ignored).
    A dataset says which keywords its kind needs: ``dataset.batch_options(train=...)``.

    `recipe` names an augmentation recipe (`depthcut.data.recipes`) used instead of
    `crop_padding`/`flip`. Images on disk (`DiskImages`) stay there: each batch is read (one
    batch ahead, in a thread) and moved to `device`, so memory holds two batches, not the split.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int,
        mean: Sequence[float] = (),
        std: Sequence[float] = (),
        shuffle: bool = False,
        augment: bool = False,
        crop_padding: int = 0,
        flip: bool = False,
        recipe: str | None = None,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        self.tokens = inputs.dim() == 2 and inputs.dtype in (torch.int16, torch.int32,
                                                             torch.int64)
        if self.tokens:
            inputs, mean, std, augment, channels_last = inputs.long(), (), (), False, False
        elif inputs.dim() != 4 or inputs.dtype != torch.uint8:
            raise ConfigError(
                f"images must be uint8 (N, C, H, W) or integer (N, T) token ids, got "
                f"{inputs.dtype} {tuple(inputs.shape)}"
            )
        if labels.shape != (len(inputs),):
            raise ConfigError(f"need one label per image: {tuple(labels.shape)} for {len(inputs)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if crop_padding < 0:
            raise ConfigError(f"crop_padding must be >= 0, got {crop_padding}")
        channels = 0 if self.tokens else inputs.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ConfigError(f"mean and std need {channels} value(s) each, got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {std}")
        self.device = torch.device(device)
        self.on_disk = is_on_disk(inputs)
        self.inputs = inputs if self.on_disk else inputs.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = flip
        self.recipe = get_recipe(recipe) if recipe is not None else None
        self.drop_last = drop_last
        self.channels_last = channels_last
        self.seed = seed
        self.shard = shard  # (rank, world size): this process reads every world-th sample
        self.epoch = 0  # advanced by each __iter__ call; settable to resume a run
        shape = (1, channels, 1, 1)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape)
        self._augment_generator = _make_generator(self.device)

    @property
    def num_samples(self) -> int:
        rank, world = self.shard
        return len(range(rank, len(self.inputs), world))

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Advance the epoch now, not lazily at the first batch, so each iter() call is one epoch.
        epoch_seed = self.seed + self.epoch
        self.epoch += 1
        order = None
        if self.shuffle:
            generator = torch.Generator().manual_seed(epoch_seed)
            order = torch.randperm(len(self.inputs), generator=generator).to(self.device)
        rank, world = self.shard
        if world > 1:  # every rank draws the same permutation and keeps its own slice
            if order is None:
                order = torch.arange(len(self.inputs), device=self.device)
            order = order[rank::world]
        if self.augment:
            self._augment_generator.manual_seed(epoch_seed + _AUGMENT_SEED_OFFSET)
        return self._batches(order)

    def _batches(
        self, order: torch.Tensor | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for batch, labels in self._rows(order):
            if self.tokens:
                yield batch, labels
                continue
            if self.augment and self.recipe is not None:
                batch = self.recipe(batch, self._augment_generator)
            elif self.augment:  # on uint8: a quarter of the bytes to gather
                batch = augment(
                    batch, self.crop_padding, self.flip, generator=self._augment_generator
                )
            inputs = batch.to(dtype=torch.float32, memory_format=memory_format)
            inputs = inputs.div_(255.0).sub_(self._mean).div_(self._std)
            yield inputs, labels


    def _rows(self, order: torch.Tensor | None
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Each batch's inputs and labels, before augmentation, in order."""
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        if not self.on_disk:
            for start in starts:
                if order is None:
                    yield (self.inputs[start : start + self.batch_size],
                           self.labels[start : start + self.batch_size])
                else:
                    index = order[start : start + self.batch_size]
                    yield self.inputs[index], self.labels[index]
            return
        if order is None:
            order = torch.arange(len(self.inputs))
        order = order.cpu()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="depthcut-read") as reader:
            pending: Future | None = None
            for number, start in enumerate(starts):
                index = order[start : start + self.batch_size]
                if pending is None:
                    pending = reader.submit(self.inputs.read, index)
                batch = pending.result()
                pending = None
                if number + 1 < len(starts):  # read the next batch while this one trains
                    ahead = order[start + self.batch_size : start + 2 * self.batch_size]
                    pending = reader.submit(self.inputs.read, ahead)
                yield (batch.to(self.device, non_blocking=True),
                       self.labels[index.to(self.labels.device)])


def select_rows(images: torch.Tensor | DiskImages, indices: torch.Tensor,
                device: torch.device) -> torch.Tensor | DiskImages:
    """Rows `indices` of a split: copied onto `device` when in memory, a lazy view on disk."""
    if is_on_disk(images):
        return images.subset(indices)
    return images[indices].to(device)


def default_eval_batch_size(dataset: ArrayDataset, batch_size: int) -> int:
    """512 for images up to 32x32 (and token ids); fewer for larger images, so that an
    evaluation batch holds about as many pixels as 512 CIFAR images (never fewer images than a
    training batch): 32 at 224 px, whose 512 would need gigabytes of activations."""
    shape = dataset.train_inputs.shape
    if len(shape) != 4:
        return 512
    return min(512, max(batch_size, 512 * 32 * 32 // (shape[2] * shape[3])))


@dataclass(eq=False)
class DataSplits:
    """The loaders one experiment needs, all built from one seeded split."""

    dataset: ArrayDataset
    train: BatchLoader
    train_eval: BatchLoader
    val: BatchLoader | None
    test: BatchLoader
    train_indices: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0))
    val_indices: torch.Tensor = field(repr=False, default_factory=lambda: torch.empty(0))


def make_splits(
    dataset: ArrayDataset,
    *,
    val_fraction: float = 0.1,
    train_subset: int | None = None,
    batch_size: int = 128,
    eval_batch_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> DataSplits:
    """Split the training set into train / val and build the loaders on `device`.

    The training loader drops its last partial batch when there is at least one full batch: a
    batch of one sample would break BatchNorm in training mode, and reshuffling each epoch means
    no sample is always left out.
    """
    if eval_batch_size is None:
        eval_batch_size = default_eval_batch_size(dataset, batch_size)
    train_idx, val_idx = split_indices(
        len(dataset.train_inputs), val_fraction, seed, subset=train_subset
    )
    device = torch.device(device)
    place = {"device": device, "channels_last": channels_last}
    norm = {**dataset.batch_options(train=False), **place}  # the evaluation loaders' options
    # One device copy of the training subset, shared by the training and train-eval loaders.
    train_inputs = select_rows(dataset.train_inputs, train_idx, device)
    train_labels = dataset.train_labels[train_idx].to(device)
    # Under torch.distributed each rank trains and counts entropy on its shard (batch_size is
    # per process); validation and test run whole on every rank.
    shard = (distributed.rank(), distributed.world_size())
    train = BatchLoader(
        train_inputs, train_labels, batch_size=batch_size, shuffle=True, augment=True,
        drop_last=len(train_idx) >= batch_size * shard[1], seed=seed, shard=shard,
        **dataset.batch_options(train=True), **place,
    )
    train_eval = BatchLoader(train_inputs, train_labels, batch_size=eval_batch_size,
                             shard=shard, **norm)
    val = None
    if len(val_idx):
        val = BatchLoader(
            select_rows(dataset.train_inputs, val_idx, device), dataset.train_labels[val_idx],
            batch_size=eval_batch_size, **norm,
        )
    test = BatchLoader(
        dataset.test_inputs, dataset.test_labels, batch_size=eval_batch_size, **norm
    )
    return DataSplits(
        dataset=dataset, train=train, train_eval=train_eval, val=val, test=test,
        train_indices=train_idx, val_indices=val_idx,
    )
