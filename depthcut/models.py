"""The papers' CIFAR architectures (METHODS section 8), built from a small serialisable spec.

Every architecture takes `num_classes`, `in_channels`, a `width` multiplier and an `activation`
kind, and gives every rectifier site its own module (so each can be measured and linearized
alone). Image models expect 32x32 inputs; `transformer` expects (batch, seq) int64 token ids.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from depthcut.errors import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "prelu": lambda: nn.PReLU(),
    "gelu": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(inplace=True),
}


def make_activation(kind: str) -> nn.Module:
    """A fresh activation module: every site owns its module, so each can be linearized alone."""
    if kind not in ACTIVATIONS:
        raise ConfigError(f"unknown activation {kind!r}; choose one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[kind]()


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class BasicBlock(nn.Module):
    """ResNet basic block with its own two activation sites: after bn1, and after the add."""

    def __init__(self, in_channels: int, channels: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.act2 = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 as in the EASIER/EGP papers: 3x3 stride-1 stem, max-pool, 17 sites."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        activation: str = "relu",
        maxpool: bool = True,
    ) -> None:
        super().__init__()
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act = make_activation(activation)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if maxpool else nn.Identity()
        layers, channels_in = [], stem
        for index, (channels, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            channels = scaled(channels, width)
            blocks = nn.Sequential(
                BasicBlock(channels_in, channels, stride, activation),
                BasicBlock(channels, channels, 1, activation),
            )
            layers.append((f"layer{index + 1}", blocks))
            channels_in = channels
        for name, blocks in layers:
            self.add_module(name, blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG16(nn.Module):
    """VGG-16 with BatchNorm, CIFAR variant: 13 conv3x3-BN-act sites + 2 classifier sites = 15.

    Five 2x2 max-pools take 32x32 to 1x1, so the classifier reads 512w features. Dropout after
    each hidden classifier activation is optional (`dropout`, off by default); in eval mode it
    is a no-op that `fold` drops.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out = scaled(int(item), width)
            layers += [nn.Conv2d(channels, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out),
                       make_activation(activation)]
            channels = out
        self.features = nn.Sequential(*layers)
        hidden = scaled(512, width)
        head: list[nn.Module] = []
        for features_in in (channels, hidden):
            head += [nn.Linear(features_in, hidden), make_activation(activation)]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, num_classes))
        self.classifier = nn.Sequential(*head)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


class ConvBNAct(nn.Sequential):
    """conv-BN-activation with named children, so a site reads as e.g. `blocks.3.depthwise.act`."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int,
                 activation: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = make_activation(activation)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when t = 1), 3x3 depthwise, linear 1x1 project.

    Sites: `expand.act` (when t != 1) and `depthwise.act`; the projection has no activation
    (linear bottleneck). The residual is taken when stride is 1 and the width does not change.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, activation: str) -> None:
        super().__init__()
        hidden = c_in * expand
        self.expand: nn.Module = (
            ConvBNAct(c_in, hidden, 1, 1, 1, activation) if expand != 1 else nn.Identity()
        )
        self.depthwise = ConvBNAct(hidden, hidden, 3, stride, hidden, activation)
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False),
                                     nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


# (expansion t, channels c, blocks n, stride s). The ImageNet table with the stem stride and
# the first stride-2 stage (c = 24) set to stride 1, as in the CIFAR implementations the EASIER
# authors use: 32x32 -> 32 -> 32 -> 16 -> 8 -> 8 -> 4 -> 4, so the last map is 4x4.
MOBILENETV2_CIFAR: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2, CIFAR variant (stride-1 stem): 35 sites, ReLU6 by default.

    Sites: stem 1 + 17 blocks (the t = 1 block has only its depthwise site, the other 16 have
    two) + the final 1x1 conv to 1280w = 35. The final conv scales with width (the EASIER
    authors' code keeps 1280 for width < 1). Dropout 0.2 before the classifier as in that code
    (a no-op in eval, and dropped by `fold`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        activation: str = "relu6",
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        channels = scaled(32, width)
        self.stem = ConvBNAct(in_channels, channels, 3, 1, 1, activation)
        blocks: list[nn.Module] = []
        for expand, c, n, s in MOBILENETV2_CIFAR:
            for index in range(n):
                out = scaled(c, width)
                blocks.append(InvertedResidual(channels, out, s if index == 0 else 1, expand,
                                               activation))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        last = scaled(1280, width)
        self.last = ConvBNAct(channels, last, 1, 1, 1, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.fc(self.dropout(self.pool(x).flatten(1)))


def _init_transformer_weights(module: nn.Module) -> None:
    """Truncated-normal(0.02) linears and embeddings, unit LayerNorms: the usual ViT/Swin start."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


MASKED_SCORE = -1e4  # attention score of a padding key (fits float16 and bfloat16 too)


def _split_heads(x: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """(B, T, 3C) from a qkv linear -> q, k, v each (B, heads, T, C / heads); no shape reads."""
    qkv = x.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def _merge_heads(x: Tensor) -> Tensor:
    """(B, heads, T, C / heads) -> (B, T, C)."""
    return x.transpose(1, 2).flatten(2)


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
        q, k, v = _split_heads(self.qkv(x), heads)
        bias = self.bias_table[self.bias_index].view(n, n, heads).permute(2, 0, 1)
        scores = (q * self.scale) @ k.transpose(-2, -1) + bias
        if self.shifted:
            scores = scores.view(-1, self.windows, heads, n, n) + self.mask.unsqueeze(1)
            scores = scores.view(-1, heads, n, n)
        return self.proj(_merge_heads(scores.softmax(dim=-1) @ v))


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
        self.apply(_init_transformer_weights)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed_norm(self.patch_embed(x).flatten(2).transpose(1, 2))
        for index, stage in enumerate(self.stages):
            if index:
                x = self.merges[index - 1](x)
            x = stage(x)
        return self.head(self.norm(x).mean(dim=1))


class SelfAttention(nn.Module):
    """Plain multi-head self-attention over (B, T, C) tokens, scores written out."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, padded: Tensor | None = None) -> Tensor:
        """`padded`: bool (B, 1, 1, T), True at padding keys, which then get no attention: their
        score becomes `MASKED_SCORE` (finite, so a row of padding only stays finite; exp of it
        underflows to 0 next to any real score)."""
        q, k, v = _split_heads(self.qkv(x), self.heads)
        scores = (q * self.scale) @ k.transpose(-2, -1)
        if padded is not None:
            scores = scores.masked_fill(padded, MASKED_SCORE)
        return self.proj(_merge_heads(scores.softmax(dim=-1) @ v))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + fc2(act(fc1(LN(x)))) (one site)."""

    def __init__(self, dim: int, heads: int, activation: str, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = make_activation(activation)
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x: Tensor, padded: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), padded)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TransformerEncoder(nn.Module):
    """Sequence classifier: token + learned position embeddings, pre-norm blocks, mean pool.

    Input: (batch, seq) int64 token ids with seq <= max_len. One site per block (its MLP
    activation, GELU by default); its input is (B, T, 4C), so entropy is counted per hidden
    feature over every token. `in_channels` is accepted for the common ModelSpec interface and
    ignored. Width scales the model dim (128 * width, rounded to a multiple of the heads).

    Padding: with `pad_id` set (text datasets: 0), tokens equal to it are padding. They get no
    attention (as keys) and are left out of the mean pooling, with tensor ops only (a mask
    `tokens == pad_id`, no data-dependent branch), so the model traces and folds as before;
    `depthcut.entropy.count_states` reads the same `pad_id` attribute and counts a site's
    states over the real tokens only. `pad_id=None` (default): every token is real.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        activation: str = "gelu",
        vocab_size: int = 1000,
        max_len: int = 64,
        depth: int = 4,
        heads: int = 4,
        dim: int = 128,
        pad_id: int | None = None,
    ) -> None:
        super().__init__()
        del in_channels  # token ids have no channels
        self.pad_id = pad_id
        dim = heads * max(1, round(dim * width / heads))
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(1, max_len, dim))
        self.blocks = nn.Sequential(*(EncoderBlock(dim, heads, activation) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_transformer_weights)
        nn.init.trunc_normal_(self.position, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens) + self.position[:, : tokens.shape[1]]
        if self.pad_id is None:
            return self.head(self.norm(self.blocks(x)).mean(dim=1))
        padded = tokens == self.pad_id  # (B, T)
        for block in self.blocks:
            x = block(x, padded[:, None, None, :])
        keep = (~padded).unsqueeze(-1).type_as(x)  # (B, T, 1)
        pooled = (self.norm(x) * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return self.head(pooled)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": ResNet18,
    "vgg16": VGG16,
    "mobilenetv2": MobileNetV2,
    "swin-t": SwinT,
    "transformer": TransformerEncoder,
}

# EASIER Table 4 learning rates (the paper preset's lr). Table 4 gives none for the sequence
# transformer or for torchvision:/timm: models: they get PAPER_LR_OTHER (the ResNet-18 value).
PAPER_LR: dict[str, float] = {"resnet18": 0.1, "mobilenetv2": 0.1, "vgg16": 0.01, "swin-t": 0.001}
PAPER_LR_OTHER = 0.1


def paper_lr(name: str) -> float:
    """The learning rate EASIER's Table 4 trains `name` with."""
    return PAPER_LR.get(name, PAPER_LR_OTHER)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model from a checkpoint.

    `activation=None` means the architecture's own default (ReLU for resnet18 and vgg16, ReLU6
    for mobilenetv2, GELU for swin-t and transformer); a stored None rebuilds the same model.
    `in_channels` is ignored by `transformer`, which reads token ids; `vocab_size`, `max_len`
    and `pad_id` are the transformer's (set from a text dataset; None: the constructor's
    defaults, as in checkpoints written before they existed).
    """

    name: str = "resnet18"
    num_classes: int = 10
    in_channels: int = 3
    width: float = 1.0
    activation: str | None = None
    vocab_size: int | None = None
    max_len: int | None = None
    pad_id: int | None = None
    image_size: int | None = None  # torchvision:/timm: models only (None: 32, as before)

    def build(self) -> nn.Module:
        from depthcut.external import build_external, is_external

        if is_external(self.name):
            return build_external(self.name, self.num_classes, self.in_channels,
                                  image_size=self.image_size)
        if self.name not in MODELS:
            raise ConfigError(f"unknown model {self.name!r}; choose one of {', '.join(MODELS)}, "
                             "or torchvision:NAME / timm:NAME when those are installed")
        if not self.width > 0:
            raise ConfigError(f"width multiplier must be positive, got {self.width}")
        chosen = {} if self.activation is None else {"activation": self.activation}
        sequence = {key: getattr(self, key) for key in ("vocab_size", "max_len", "pad_id")
                    if getattr(self, key) is not None}
        if sequence and self.name != "transformer":
            raise ConfigError(f"model {self.name!r} reads images, not token ids "
                              f"({', '.join(sequence)} given): use model 'transformer'")
        chosen.update(sequence)
        return MODELS[self.name](
            num_classes=self.num_classes,
            in_channels=self.in_channels,
            width=self.width,
            **chosen,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def default_activation(name: str) -> str | None:
    """The activation an architecture uses when none is asked for (its constructor default)."""
    import inspect

    if name not in MODELS:
        return None
    parameter = inspect.signature(MODELS[name]).parameters.get("activation")
    return None if parameter is None else parameter.default


def build_model(name: str = "resnet18", **kwargs) -> nn.Module:
    return ModelSpec(name=name, **kwargs).build()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
