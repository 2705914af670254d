"""Per-channel normalisation chosen by name: the data's own statistics, ImageNet's, or given.

``--normalize data`` computes the mean and standard deviation of every channel over the
training split (chunk by chunk, so it works on images on disk); ``imagenet`` is the usual
(0.485, 0.456, 0.406) / (0.229, 0.224, 0.225); ``m1,m2,m3:s1,s2,s3`` gives them. Without the
setting a dataset keeps its own (CIFAR-10's published values, an image folder's data statistics).
"""

from __future__ import annotations

import dataclasses

import torch

from depthcut.data.arrays import ImageDataset
from depthcut.data.disk_images import DiskImages
from depthcut.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZE_HELP = ("per-channel normalisation: data (the training split's mean and std), "
                  "imagenet, or MEAN:STD as m1,m2,m3:s1,s2,s3; default: the dataset's own")


def channel_stats(images: torch.Tensor | DiskImages, chunk: int = 1024
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and standard deviation of each channel of uint8 (N, C, H, W) images, on [0, 1]."""
    if len(images) == 0:
        raise ConfigError("cannot compute normalisation statistics of no images")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        rows = torch.arange(start, min(start + chunk, len(images)))
        batch = images[rows].to(torch.float64) / 255.0
        total += batch.sum(dim=(0, 2, 3))
        squares += (batch * batch).sum(dim=(0, 2, 3))
    count = len(images) * images.shape[2] * images.shape[3]
    mean = total / count
    std = (squares / count - mean * mean).clamp(min=1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def parse_given(text: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    try:
        means, stds = text.split(":")
        mean = tuple(float(v) for v in means.split(","))
        std = tuple(float(v) for v in stds.split(","))
    except ValueError:
        raise ConfigError(f"--normalize {text!r}: expected data, imagenet or "
                          "m1,m2,m3:s1,s2,s3") from None
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise ConfigError(f"--normalize {text!r}: needs {channels} mean(s) and {channels} "
                          "positive std(s)")
    return mean, std


def normalized(dataset: ImageDataset, how: str | None) -> ImageDataset:
    """`dataset` with the normalisation `how` (None: unchanged)."""
    if how is None:
        return dataset
    if how == "data":
        mean, std = dataset.data_stats or channel_stats(dataset.train_inputs)
    elif how == "imagenet":
        if dataset.in_channels != 3:
            raise ConfigError(f"--normalize imagenet needs 3 channels; {dataset.name} has "
                              f"{dataset.in_channels}")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = parse_given(how, dataset.in_channels)
    return dataclasses.replace(dataset, mean=mean, std=std)
