"""Swin-T for 32x32 images (METHODS section 8): 12 GELU sites, EASIER Table 4 lr 0.001."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from depthcut.errors import ConfigError
from depthcut.models.attention import init_transformer_weights, merge_heads, split_heads
from depthcut.models.parts import architecture_family, make_activation
from depthcut.models.registry import register_family


class WindowAttention(nn.Module):
    """Multi-head self-attention inside (shifted) windows, with a relative position bias.

    Input (batch * windows, N, C) with N = window^2 tokens per window. The relative-position
    index and, for a shifted block, the mask keeping tokens of different image regions apart
    are buffers computed in __init__, so forward has no shape- or value-dependent branches and
    torch.fx traces it. Scores are written out (no fused kernel) so the flop counter sees them.
    """

    def __init__(self, dim: int, heads: int, window: int, resolution: int, shift: int) -> None:
        super().__init__()
        self.heads = heads
        self.tokens = window * window
        self.windows = (resolution // window) ** 2
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.bias_table, std=0.02)
        grid = torch.arange(window)
        coords = torch.stack(torch.meshgrid(grid, grid, indexing="ij")).flatten(1)  # (2, N)
        offsets = coords[:, :, None] - coords[:, None, :] + window - 1  # (2, N, N), >= 0
        index = offsets[0] * (2 * window - 1) + offsets[1]
        self.register_buffer("bias_index", index.flatten(), persistent=False)
        self.shifted = shift > 0  # fixed at construction: a static branch for torch.fx
        if self.shifted:
            self.register_buffer("mask", _shift_mask(resolution, window, shift), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        n, heads = self.tokens, self.heads
        q, k, v = split_heads(self.qkv(x), heads)
        bias = self.bias_table[self.bias_index].view(n, n, heads).permute(2, 0, 1)
        scores = (q * self.scale) @ k.transpose(-2, -1) + bias
        if self.shifted:
            scores = scores.view(-1, self.windows, heads, n, n) + self.mask.unsqueeze(1)
            scores = scores.view(-1, heads, n, n)
        return self.proj(merge_heads(scores.softmax(dim=-1) @ v))


def _partition(x: Tensor, resolution: int, window: int, dim: int) -> Tensor:
    """(B, H, W, C) -> (B * windows, window^2, C), windows in row-major order per image."""
    x = x.view(-1, resolution // window, window, resolution // window, window, dim)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, dim)


def _unpartition(x: Tensor, resolution: int, window: int, dim: int) -> Tensor:
    """Inverse of `_partition`: (B * windows, window^2, C) -> (B, H, W, C)."""
    x = x.view(-1, resolution // window, resolution // window, window, window, dim)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, resolution, resolution, dim)


def _shift_mask(resolution: int, window: int, shift: int) -> Tensor:
    """(windows, N, N): 0 between tokens of one region of the rolled map, -100 across regions."""
    regions = torch.zeros(1, resolution, resolution, 1)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for label, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
        regions[:, rows, cols] = label
    per_window = _partition(regions, resolution, window, 1).squeeze(-1)  # (windows, N)
    different = per_window.unsqueeze(1) != per_window.unsqueeze(2)
    return different.float() * -100.0


class SwinBlock(nn.Module):
    """Swin block on (B, L, C) tokens: (shifted) window attention, then an MLP with one site.

    Tokens stay 3-D between blocks, so the MLP site's input is (B, L, 4C) and entropy counts
    per hidden feature (the last dim) over every token, as METHODS section 1 asks.
    """

    def __init__(self, dim: int, heads: int, resolution: int, window: int, shift: int,
                 activation: str, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.dim, self.resolution, self.window, self.shift = dim, resolution, window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, resolution, shift)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        r, w, s, c = self.resolution, self.window, self.shift, self.dim
        h = self.norm1(x).view(-1, r, r, c)
        if s:  # static: fixed at construction
            h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
        h = _unpartition(self.attn(_partition(h, r, w, c)), r, w, c)
        if s:
            h = torch.roll(h, shifts=(s, s), dims=(1, 2))
        x = x + h.reshape(-1, r * r, c)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class PatchMerging(nn.Module):
    """2x2 neighbouring tokens concatenated (4C), normalised, projected to 2C: half the map."""

    def __init__(self, dim: int, resolution: int) -> None:
        super().__init__()
        self.dim, self.resolution = dim, resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        r, c = self.resolution, self.dim
        x = x.view(-1, r, r, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.reduction(self.norm(x.view(-1, (r // 2) ** 2, 4 * c)))


class SwinT(nn.Module):
    """Swin-T for 32x32 images: depths (2, 2, 6, 2), heads (3, 6, 12, 24), 12 GELU sites.

    Small-image configuration chosen here: patch size 2 (a 2x2 stride-2 conv embeds 32x32 into
    16x16 tokens), so the four stages see 16x16, 8x8, 4x4 and 2x2 maps; patch merging between
    stages. Window 4 everywhere, clipped to the map size (stage 4: 2); the second block of each
    stage is shifted by window // 2 only where the window is smaller than the map (stages 1 and
    2); where one window covers the whole map there is nothing to shift (stages 3 and 4), as in
    the reference Swin code. Embed dim 96 * width, rounded to a multiple of 3 heads (then every
    stage's dim is a multiple of its head count). MLP ratio 4, relative position bias, no
    absolute position embedding, no stochastic depth. Sites: one MLP activation per block.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        activation: str = "gelu",
        image_size: int = 32,
        patch_size: int = 2,
        window: int = 4,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        heads: tuple[int, ...] = (3, 6, 12, 24),
    ) -> None:
        super().__init__()
        resolution = image_size // patch_size
        if image_size % patch_size or resolution % 2 ** (len(depths) - 1):
            raise ConfigError(f"image size {image_size} with patch {patch_size} cannot be halved "
                             f"{len(depths) - 1} times")
        dim = heads[0] * max(1, round(96 * width / heads[0]))
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.embed_norm = nn.LayerNorm(dim)
        self.merges = nn.ModuleList()
        self.stages = nn.ModuleList()
        for index, (depth, n_heads) in enumerate(zip(depths, heads, strict=True)):
            if index:
                self.merges.append(PatchMerging(dim, resolution))
                dim, resolution = 2 * dim, resolution // 2
            if dim % n_heads:
                raise ConfigError(f"stage {index + 1}: dim {dim} is not a multiple of {n_heads}")
            size = min(window, resolution)
            if resolution % size:
                raise ConfigError(f"stage {index + 1}: window {size} does not tile {resolution}")
            shift = size // 2 if size < resolution else 0
            self.stages.append(nn.Sequential(*(
                SwinBlock(dim, n_heads, resolution, size, shift if block % 2 else 0, activation)
                for block in range(depth)
            )))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(init_transformer_weights)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        for index, stage in enumerate(self.stages):
            if index:
                x = self.merges[index - 1](x)
            x = stage(x)
        return self.head(self.norm(x).mean(dim=1))


register_family(architecture_family("swin-t", SwinT, paper_lr=0.001))
