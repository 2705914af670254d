"""The small modules depthcut puts into models: stand-ins for removed rectifier sites, and the
convolution with a bias map that `fold` makes for an exact merge.

They live below everything that reads graphs (`graph`, `sites`, `fold`), so each can name them
without importing the others: torch.fx keeps each as one call, and `fold` reads them.
"""

from __future__ import annotations

import torch
from torch import nn

from depthcut.errors import DepthcutError


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
        return x * self.scale.to(dtype=x.dtype, device=x.device).view(shape)


class InputSizeError(DepthcutError, ValueError):
    """A folded model that holds bias maps was run on an input of another spatial size."""


class BiasMapConv2d(nn.Conv2d):
    """conv(x) + bias_map: a convolution plus a fixed per-position bias (out, H, W).

    `fold` makes it for a merge whose one convolution computes the chain's linear part exactly
    but not its bias at the border: where an inner op zero-pads, the original chain sees zeros
    and the merged conv sees the composed bias. The difference, original(0) - merged(0), does
    not depend on the input; it is computed once, for inputs of `input_size` (H, W), and added
    here. On any other size it would be wrong, so the forward refuses other sizes.
    `folded_at` is the model input shape the fold was made at (for the message).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int], groups: int,
                 bias_map: torch.Tensor, input_size: tuple[int, int],
                 folded_at: tuple[int, ...] | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, groups=groups,
                         bias=False)
        self.register_buffer("bias_map", bias_map.detach().clone().reshape(
            1, out_channels, *bias_map.shape[-2:]))
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.folded_at = tuple(folded_at) if folded_at is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.input_size:
            h, w = self.input_size
            at = (f" (the model was folded at input shape "
                  f"{'x'.join(map(str, self.folded_at))})" if self.folded_at else "")
            raise InputSizeError(
                f"this folded model holds a bias map computed for {h}x{w} feature maps here"
                f"{at}, but got {'x'.join(map(str, x.shape[-2:]))}: a bias map corrects the "
                "border for one input size only. Fold the model again at the new input size."
            )
        return super().forward(x) + self.bias_map.to(x.dtype)

    def extra_repr(self) -> str:
        h, w = self.input_size
        return f"{super().extra_repr()}, bias_map for {h}x{w} inputs"


# Modules torch.fx keeps as one call, which `fold` reads: the stand-ins for removed sites, and
# the bias-map convolution (its size check cannot be traced).
STAND_IN_TYPES: tuple[type[nn.Module], ...] = (Zero, ChannelScale, BiasMapConv2d)
