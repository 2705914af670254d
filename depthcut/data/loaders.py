"""Splits, tensor augmentation and batch loaders over datasets held in (device) memory.

The datasets here are small, so a whole split lives in memory and every batch is cut, augmented
and normalised with tensor ops: no worker processes, no per-sample Python, the same code on CPU
and GPU. Integer (N, T) token ids are served as they are.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from depthcut import distributed
from depthcut.data.arrays import ArrayDataset
from depthcut.errors import ConfigError


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


def augment(
    images: torch.Tensor,
    padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample random crop (from the zero-padded image) and horizontal flip, vectorised.

    Offsets are uniform in [0, 2 * padding] per sample and axis; each sample is flipped with
    probability 0.5. Everything is one gather with advanced indexing, so it costs the same on GPU
    as a copy. Random numbers come from `generator` (on its device), or the global RNG of the
    images' device. With padding 0 and no flip the input itself is returned.
    """
    if images.dim() != 4:
        raise ConfigError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if padding < 0:
        raise ConfigError(f"padding must be >= 0, got {padding}")
    if padding == 0 and not flip:
        return images
    n, c, h, w = images.shape
    device = images.device
    rng_device = generator.device if generator is not None else device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    source = images
    if padding > 0:
        size = (n,)
        dy = torch.randint(0, 2 * padding + 1, size, generator=generator, device=rng_device)
        dx = torch.randint(0, 2 * padding + 1, size, generator=generator, device=rng_device)
        rows = rows + dy.to(device)[:, None]
        cols = cols + dx.to(device)[:, None]
        source = F.pad(images, (padding, padding, padding, padding))
    if flip:
        flipped = torch.randint(0, 2, (n,), generator=generator, device=rng_device).bool()
        cols = torch.where(flipped.to(device)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return source[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


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
        self.inputs = inputs.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = flip
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
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            if order is None:
                batch = self.inputs[start : start + self.batch_size]
                labels = self.labels[start : start + self.batch_size]
            else:
                index = order[start : start + self.batch_size]
                batch, labels = self.inputs[index], self.labels[index]
            if self.tokens:
                yield batch, labels
                continue
            if self.augment:  # on uint8: a quarter of the bytes to gather
                batch = augment(
                    batch, self.crop_padding, self.flip, generator=self._augment_generator
                )
            inputs = batch.to(dtype=torch.float32, memory_format=memory_format)
            inputs = inputs.div_(255.0).sub_(self._mean).div_(self._std)
            yield inputs, labels


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
    eval_batch_size: int = 512,
    seed: int = 0,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> DataSplits:
    """Split the training set into train / val and build the loaders on `device`.

    The training loader drops its last partial batch when there is at least one full batch: a
    batch of one sample would break BatchNorm in training mode, and reshuffling each epoch means
    no sample is always left out.
    """
    train_idx, val_idx = split_indices(
        len(dataset.train_inputs), val_fraction, seed, subset=train_subset
    )
    device = torch.device(device)
    place = {"device": device, "channels_last": channels_last}
    norm = {**dataset.batch_options(train=False), **place}  # the evaluation loaders' options
    # One device copy of the training subset, shared by the training and train-eval loaders.
    train_inputs = dataset.train_inputs[train_idx].to(device)
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
            dataset.train_inputs[val_idx], dataset.train_labels[val_idx],
            batch_size=eval_batch_size, **norm,
        )
    test = BatchLoader(
        dataset.test_inputs, dataset.test_labels, batch_size=eval_batch_size, **norm
    )
    return DataSplits(
        dataset=dataset, train=train, train_eval=train_eval, val=val, test=test,
        train_indices=train_idx, val_indices=val_idx,
    )
