"""The small modules depthcut puts into models in place of removed rectifier sites.

They live below everything that reads graphs (`graph`, `sites`, `fold`), so each can name them
without importing the others: torch.fx keeps each as one call, and `fold` reads them.
"""

from __future__ import annotations

import torch
from torch import nn


class Zero(nn.Module):
    """Stands in for an always-OFF rectifier: outputs zeros shaped like its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def default_channel_dim(rank: int) -> int:
    """Neuron axis: dim 1 of (N, C, H, W) maps, the last dim of (N, C) and (N, T, C) tensors."""
    return 1 if rank >= 4 else rank - 1


class ChannelScale(nn.Module):
    """y = x * scale per channel: what a zero-entropy site computes on the data it was measured
    on (1 for an always-ON neuron, the negative-side slope for an always-OFF one). `fold`
    merges it into a neighbouring linear op like a BatchNorm."""

    def __init__(self, scale: torch.Tensor, dim: int | None = None) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float())
        self.dim = dim  # None: `default_channel_dim` of the input's rank

    def channel_dim(self, rank: int) -> int:
        return default_channel_dim(rank) if self.dim is None else self.dim % rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim(x.dim())] = -1
        return x * self.scale.to(x.dtype).view(shape)


# Modules that stand in for removed sites: torch.fx keeps each as one call (fold reads them).
STAND_IN_TYPES: tuple[type[nn.Module], ...] = (Zero, ChannelScale)
