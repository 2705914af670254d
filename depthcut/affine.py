"""Linear operators in one shape (`Affine`) and their algebra: compose, chains, parallel sums.

`fold` reads every mergeable op (conv2d, linear, eval-mode BatchNorm, ChannelScale, a
`layers.BiasMapConv2d`) as an `Affine` in float64 and merges them here:

- `compose(a, b)`: the one op computing b(a(x)) when both are plain ops, and whether it is exact
  as one plain op everywhere (not only in the interior);
- `compose_chain(ops, size)`: the one op computing a whole chain, exact where it can be (see
  below), with a per-position bias map when the border needs one;
- `add_parallel(a, b)`: the one op computing a(x) + b(x) (exact; RepVGG-style).

Exactness of a merged chain (METHODS section 6). Each op of a chain zero-pads its own input;
the merged conv zero-pads only the chain's input, so where an inner op read zero padding, the
merged conv computes that op's predecessor one step beyond its output's border. Both sides are
affine in x: original(x) = L_o x + c_o and merged(x) = L_m x + c_m (c_o varies by position).
L_o == L_m exactly when every value an inner op reads from padding has a zero linear part in the
merged conv too, that is when no op after the chain's first op with a kernel > 1 pads: ops
before it are 1x1, and a 1x1 evaluated beyond its output's border reads only the (zero) padding
of its own input, whatever its stride. Then original(x) = merged(x) + (c_o - c_m) exactly, and
c_o - c_m = original(0) - merged(0) is a fixed map for one input size: the bias map. It is
all zero (no map needed) unless a bias reaches a padded position, e.g. a 1x1 conv (or a BN) with
a bias before a zero-padded spatial conv. A chain with an op that pads after a spatial op is
border-approximate: its error depends on the input (spatial after spatial).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depthcut.layers import BiasMapConv2d, ChannelScale

# A bias map whose largest entry is below this fraction of the chain's zero-input output is
# float64 rounding of equal sums (interior positions), not a border effect: no map is kept.
NEGLIGIBLE_MAP = 1e-12


@dataclass
class Affine:
    """A conv2d (weight (out, in/groups, kh, kw)) or a linear (weight (out, in)) with its bias.

    A conv may carry `bias_map` (out, H, W), added to its output at every position; it holds for
    inputs of spatial size `input_size` only (see `layers.BiasMapConv2d`).
    """

    kind: str
    weight: Tensor
    bias: Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1
    bias_map: Tensor | None = None
    input_size: tuple[int, int] | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:]) if self.kind == "conv" else (1, 1)

    @property
    def is_depthwise(self) -> bool:
        """One input channel per output channel (a depthwise conv, BatchNorm, ChannelScale)."""
        return (self.kind == "conv" and self.groups > 1
                and self.groups == self.out_features == self.in_features)

    @property
    def is_diagonal(self) -> bool:
        """A per-channel scale (BatchNorm, depthwise 1x1): it fits inside any grouping."""
        if self.kind == "linear":
            w = self.weight
            return w.shape[0] == w.shape[1] and torch.equal(w, torch.diag(torch.diagonal(w)))
        return (
            self.kind == "conv"
            and self.kernel == (1, 1)
            and self.stride == (1, 1)
            and self.padding == (0, 0)
            and self.groups == self.out_features == self.in_features
            and self.bias_map is None
        )

    def plain(self) -> Affine:
        """The same op without its bias map."""
        return dataclasses.replace(self, bias_map=None, input_size=None)

    def dense(self) -> Tensor:
        """The weight with groups expanded to a block-diagonal (out, in, kh, kw) tensor."""
        if self.kind == "linear" or self.groups == 1:
            return self.weight
        out_g, in_g = self.out_features // self.groups, self.weight.shape[1]
        full = self.weight.new_zeros(self.out_features, self.in_features, *self.kernel)
        for g in range(self.groups):
            full[g * out_g:(g + 1) * out_g, g * in_g:(g + 1) * in_g] = self.weight[
                g * out_g:(g + 1) * out_g
            ]
        return full

    def macs(self, out_shape: torch.Size) -> int:
        """Multiply-adds to produce an output of `out_shape` (a bias map adds no MACs)."""
        positions = math.prod(out_shape[:-1]) if self.kind == "linear" else (
            out_shape[0] * out_shape[2] * out_shape[3]
        )
        per_position = self.weight[0].numel() * self.out_features
        return int(positions * per_position)

    def apply(self, x: Tensor) -> Tensor:
        """This op on `x` (float64 maths, for bias maps and checks)."""
        if self.kind == "linear":
            return F.linear(x, self.weight, self.bias)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, 1, self.groups)
        return y if self.bias_map is None else y + self.bias_map

    def to_module(self, like: Tensor, folded_at: tuple[int, ...] | None = None) -> nn.Module:
        """The op as a torch module in `like`'s dtype and device (a `BiasMapConv2d` when it
        carries a bias map; its per-channel bias then goes into the map: one add)."""
        if self.bias_map is not None:
            module: nn.Module = BiasMapConv2d(
                self.in_features, self.out_features, self.kernel, self.stride, self.padding,
                self.groups, self.bias_map + self.bias[:, None, None], self.input_size,
                folded_at)
            bias = False
        elif self.kind == "linear":
            bias = bool(self.bias.any())
            # skip_init: no random init of a weight overwritten at once (a VGG classifier's
            # 25088x4096 costs a second of kaiming_uniform_).
            module = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features,
                                        bias=bias, device=like.device, dtype=like.dtype)
        else:
            bias = bool(self.bias.any())
            module = nn.utils.skip_init(
                nn.Conv2d, self.in_features, self.out_features, self.kernel, self.stride,
                self.padding, groups=self.groups, bias=bias, device=like.device,
                dtype=like.dtype)
        module = module.to(device=like.device, dtype=like.dtype)
        with torch.no_grad():
            module.weight.copy_(self.weight)
            if bias:
                module.bias.copy_(self.bias)
        return module.eval()


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _regroup(full: Tensor, groups: int) -> Tensor:
    """Keep the diagonal blocks of a dense (out, in, kh, kw) weight for `groups` groups."""
    if groups == 1:
        return full
    out_g, in_g = full.shape[0] // groups, full.shape[1] // groups
    blocks = [full[g * out_g:(g + 1) * out_g, g * in_g:(g + 1) * in_g] for g in range(groups)]
    return torch.cat(blocks)


def _common_groups(a: Affine, b: Affine) -> int:
    if b.is_diagonal:
        return a.groups
    if a.is_diagonal:
        return b.groups
    return a.groups if a.groups == b.groups else 1


def affine_of(module: nn.Module, input_rank: int) -> Affine | None:
    """Read a module as an Affine in float64, or None if it is not a linear op we can merge."""
    f64 = torch.float64
    if isinstance(module, nn.Conv2d):
        if _pair(module.dilation) != (1, 1) or module.padding_mode != "zeros":
            return None
        padding = module.padding
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0, 0)
            elif _pair(module.stride) == (1, 1) and all(k % 2 for k in module.kernel_size):
                padding = tuple(k // 2 for k in module.kernel_size)
            else:
                return None
        weight = module.weight.detach().to(f64, copy=True)
        bias = (module.bias.detach().to(f64, copy=True) if module.bias is not None
                else weight.new_zeros(weight.shape[0]))
        op = Affine("conv", weight, bias, _pair(module.stride), _pair(padding),
                    module.groups)
        if isinstance(module, BiasMapConv2d):
            op.bias_map = module.bias_map.detach().to(f64)[0].clone()
            op.input_size = module.input_size
        return op
    if isinstance(module, nn.Linear):
        # One float64 copy (a VGG classifier's first weight is 822 MB in float64).
        weight = module.weight.detach().to(f64, copy=True)
        bias = (module.bias.detach().to(f64, copy=True) if module.bias is not None
                else weight.new_zeros(weight.shape[0]))
        return Affine("linear", weight, bias)
    if isinstance(module, ChannelScale):
        scale = module.scale.detach().to(f64)
        dim = module.channel_dim(input_rank)
        if input_rank == 4 and dim == 1:
            return Affine("conv", scale.view(-1, 1, 1, 1), scale.new_zeros(scale.numel()),
                          groups=scale.numel())
        if input_rank >= 2 and dim == input_rank - 1:
            return Affine("linear", torch.diag(scale), scale.new_zeros(scale.numel()))
        return None
    if isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
        if module.training or module.running_mean is None:
            return None
        scale = torch.rsqrt(module.running_var.detach().to(f64) + module.eps)
        if module.weight is not None:
            scale = scale * module.weight.detach().to(f64)
        shift = -module.running_mean.detach().to(f64) * scale
        if module.bias is not None:
            shift = shift + module.bias.detach().to(f64)
        if isinstance(module, nn.BatchNorm2d) and input_rank == 4:
            return Affine("conv", scale.view(-1, 1, 1, 1), shift, groups=scale.numel())
        if isinstance(module, nn.BatchNorm1d) and input_rank == 2:
            return Affine("linear", torch.diag(scale), shift)
    return None


def _tap_product(b: Affine, i: int, j: int, a: Affine) -> Tensor:
    """B's tap (i, j) as a dense (out_b, out_a) matrix times A's dense weight: (out_b, in_a,
    ka0, ka1). Depthwise operands are not expanded (a 960-channel depthwise would be 66 MB)."""
    if b.is_depthwise:
        return b.weight[:, 0, i, j][:, None, None, None] * a.dense()
    tap = b.dense()[:, :, i, j]
    if a.is_depthwise:
        return tap[:, :, None, None] * a.weight[:, 0][None]
    return torch.einsum("om,mikl->oikl", tap, a.dense())


def compose(a: Affine, b: Affine) -> tuple[Affine, bool] | None:
    """The op computing b(a(x)), and whether it is exact everywhere (not only in the interior)
    as one plain op. Bias maps are not read here: `compose_chain` handles them."""
    if a.kind != b.kind or a.out_features != b.in_features:
        return None
    if a.kind == "linear":
        return Affine("linear", b.weight @ a.weight, b.weight @ a.bias + b.bias), True
    (ka0, ka1), (kb0, kb1), (sa0, sa1) = a.kernel, b.kernel, a.stride
    if (kb0, kb1) == (1, 1):  # one tap: the product is the weight (no zeros, no second copy)
        weight = _tap_product(b, 0, 0, a)
    else:
        weight = a.weight.new_zeros(b.out_features, a.in_features, ka0 + (kb0 - 1) * sa0,
                                    ka1 + (kb1 - 1) * sa1)
        for i in range(kb0):
            for j in range(kb1):
                weight[:, :, i * sa0:i * sa0 + ka0, j * sa1:j * sa1 + ka1] += _tap_product(
                    b, i, j, a)
    if b.is_depthwise:
        bias = b.bias + b.weight[:, 0].sum((1, 2)) * a.bias
    else:
        bias = b.bias + torch.einsum("omij,m->o", b.dense(), a.bias)
    groups = _common_groups(a, b)
    merged = Affine(
        "conv", _regroup(weight, groups), bias,
        (a.stride[0] * b.stride[0], a.stride[1] * b.stride[1]),
        (a.padding[0] + b.padding[0] * sa0, a.padding[1] + b.padding[1] * sa1), groups,
    )
    # B's zero padding of A's output is reproduced only if B does not pad, or if A read at a
    # padded position gives zero too (a 1x1 without padding and without bias).
    exact = b.padding == (0, 0) or (a.kernel == (1, 1) and a.padding == (0, 0)
                                    and not bool(a.bias.any()))
    return merged, exact


def compose_shape(a: Affine, b: Affine) -> Affine | None:
    """What `compose(a, b)` gives, in shape only (weights on the meta device, no arithmetic):
    kernel, stride, padding, groups and MACs, to price a merge before computing it (a product
    of a VGG classifier's 25088x4096 and 4096x4096 matrices is 4e11 multiply-adds: pricing must
    not compute it)."""
    if a.kind != b.kind or a.out_features != b.in_features:
        return None
    if a.kind == "linear":
        return Affine("linear", torch.empty(b.out_features, a.in_features, device="meta"),
                      torch.empty(b.out_features, device="meta"))
    (ka0, ka1), (kb0, kb1), (sa0, sa1) = a.kernel, b.kernel, a.stride
    groups = _common_groups(a, b)
    weight = torch.empty(b.out_features, a.in_features // groups, ka0 + (kb0 - 1) * sa0,
                         ka1 + (kb1 - 1) * sa1, device="meta")
    return Affine("conv", weight, torch.empty(b.out_features, device="meta"),
                  (a.stride[0] * b.stride[0], a.stride[1] * b.stride[1]),
                  (a.padding[0] + b.padding[0] * sa0, a.padding[1] + b.padding[1] * sa1), groups)


def linear_parts_agree(ops: list[Affine]) -> bool:
    """Whether one conv computes the chain's linear part exactly, border included: no op after
    the first op with a kernel > 1 pads (see the module docstring)."""
    spatial = False
    for op in ops:
        if spatial and op.padding != (0, 0):
            return False
        spatial = spatial or op.kernel != (1, 1)
    return True


def compose_chain(ops: list[Affine], input_size: tuple[int, int] | None = None
                  ) -> tuple[Affine, bool] | None:
    """The one op computing ops[-1](...ops[0](x)), and whether it is exact; None if they cannot
    be one op. `input_size` is the chain input's (H, W) (needed for convs).

    Exact when the linear parts agree (`linear_parts_agree`): the bias the border needs is then
    a bias map original(0) - merged(0) for inputs of `input_size`. Otherwise border-approximate:
    the merged conv computes the inner ops beyond their borders (as `compose` does); bias maps
    the ops already carry are still accounted exactly (the same zero-input correction), so the
    error left is the input-dependent part only.
    """
    if all(op.kind == "linear" for op in ops):
        return compose_linear_chain(ops), True
    merged = ops[0].plain()
    for op in ops[1:]:
        result = compose(merged, op.plain())
        if result is None:
            return None
        merged = result[0]
    if merged.kind == "linear":
        return merged, True
    exact = linear_parts_agree(ops)
    carries_map = any(op.bias_map is not None for op in ops)
    if len(ops) == 1 and not carries_map:
        return merged, True
    if input_size is None:
        raise ValueError("compose_chain needs the input size (H, W) of a chain of convs")
    if exact or carries_map:
        size = (int(input_size[0]), int(input_size[1]))
        original = merged.weight.new_zeros(1, ops[0].in_features, *size)
        for op in ops:
            if op.bias_map is not None and tuple(op.input_size) != tuple(original.shape[2:]):
                return None  # a map made for another size
            original = op.apply(original)
        bias_map = original[0] - merged.bias[:, None, None]
        scale = max(float(original.abs().max()), 1.0)
        if float(bias_map.abs().max()) > NEGLIGIBLE_MAP * scale:
            merged.bias_map, merged.input_size = bias_map, size
    return merged, exact


def _product_order(dims: list[int]) -> dict[tuple[int, int], int]:
    """Matrix-chain ordering: for matrices i..j (matrix k is dims[k] x dims[k + 1]), the split
    of least multiply-adds, for every i < j (dynamic programming over the chain)."""
    n = len(dims) - 1
    cost = {(i, i): 0 for i in range(n)}
    split: dict[tuple[int, int], int] = {}
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length - 1
            cost[i, j], split[i, j] = min(
                (cost[i, k] + cost[k + 1, j] + dims[i] * dims[k + 1] * dims[j + 1], k)
                for k in range(i, j))
    return split


def compose_linear_chain(ops: list[Affine]) -> Affine:
    """The one linear op computing ops[-1](...ops[0](x)): the weight product in the order of
    least multiply-adds (a VGG classifier, 25088 -> 4096 -> 4096 -> 1000, costs 1.2e11
    multiply-adds right to left against 5.2e11 left to right), the bias as matrix-vector
    products, all in the ops' dtype (float64 in fold)."""
    matrices = [op.weight for op in reversed(ops)]  # the product's factors, left to right
    split = _product_order([m.shape[0] for m in matrices] + [matrices[-1].shape[1]])

    def product(i: int, j: int) -> Tensor:
        if i == j:
            return matrices[i]
        k = split[i, j]
        return product(i, k) @ product(k + 1, j)

    bias = ops[0].bias
    for op in ops[1:]:
        bias = op.weight @ bias + op.bias
    return Affine("linear", product(0, len(matrices) - 1), bias)


def identity_affine(channels: int, kind: str, like: Tensor) -> Affine:
    if kind == "linear":
        eye = torch.eye(channels, dtype=like.dtype, device=like.device)
        return Affine("linear", eye, like.new_zeros(channels))
    return Affine("conv", like.new_ones(channels, 1, 1, 1), like.new_zeros(channels),
                  groups=channels)


def add_parallel(a: Affine, b: Affine) -> Affine | None:
    """The op computing a(x) + b(x) (exact), or None if their shapes cannot share one op."""
    if (a.kind != b.kind or a.in_features != b.in_features
            or a.out_features != b.out_features or a.stride != b.stride):
        return None
    maps = [op for op in (a, b) if op.bias_map is not None]
    if len(maps) == 2 and (a.input_size != b.input_size
                           or a.bias_map.shape != b.bias_map.shape):
        return None
    bias_map = sum(op.bias_map for op in maps) if maps else None
    input_size = maps[0].input_size if maps else None
    if a.kind == "linear":
        return Affine("linear", a.weight + b.weight, a.bias + b.bias)
    pad = (max(a.padding[0], b.padding[0]), max(a.padding[1], b.padding[1]))
    offsets = [(pad[0] - op.padding[0], pad[1] - op.padding[1]) for op in (a, b)]
    size = tuple(max(off[d] + op.kernel[d] for off, op in zip(offsets, (a, b), strict=True))
                 for d in (0, 1))
    weight = a.weight.new_zeros(a.out_features, a.in_features, *size)
    for (d0, d1), op in zip(offsets, (a, b), strict=True):
        weight[:, :, d0:d0 + op.kernel[0], d1:d1 + op.kernel[1]] += op.dense()
    groups = _common_groups(a, b)
    return Affine("conv", _regroup(weight, groups), a.bias + b.bias, a.stride, pad, groups,
                  bias_map, input_size)
