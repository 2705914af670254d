"""Folding: merge the linear operators around linearized and dead sites (METHODS section 6).

A linearized site (Identity) only makes a network faster once the convolutions on each side are
merged into one. `fold` traces the model with torch.fx and rewrites the graph until no rule
applies:

- *identity*: Identity and eval-mode Dropout calls are dropped;
- *dead branch*: everything computed only from an always-OFF site (`sites.Zero`) is a constant;
  it is evaluated once and kept as a buffer (a residual block reduces to its shortcut plus a
  per-channel bias). If the output no longer depends on the input, that is layer collapse and
  `FoldError` says so;
- *sequential*: op B reading only op A's output becomes one op (BatchNorm into conv/linear,
  linear after linear, 1x1 with its neighbour, depthwise with pointwise, spatial after spatial:
  kernel k1 + (k2 - 1) s1, stride s1 s2, padding p1 + p2 s1, bias b2 + sum(W2) b1);
- *parallel*: op A(x) + op B(x) or A(x) + x becomes one op (RepVGG-style kernel embedding);
- *bias*: adding a per-channel constant to an op's output goes into its bias.

Every linear op is first read as an `Affine` (conv or linear weight, bias, stride, padding,
groups); merges are computed in float64. A merge is exact unless op B pads A's output with zeros
that one convolution cannot reproduce (spatial after spatial, or after a 1x1 with a bias): those
are border-approximate, and the report gives the measured deviation.
"""

from __future__ import annotations

import copy
import math
import operator
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from depthcut.sites import STAND_IN_TYPES, ChannelScale, Zero

POLICIES = ("macs", "all", "latency")
ADDS = (operator.add, operator.iadd, torch.add)  # calls that add two tensors
PASS_THROUGH = (nn.Identity, nn.Dropout)  # no-ops in eval mode


class FoldError(ValueError):
    """The model cannot be folded as asked (untraceable, layer collapse, bad policy)."""


# --------------------------------------------------------------------------------------------
# Linear operators in one shape


@dataclass
class Affine:
    """A conv2d (weight (out, in/groups, kh, kw)) or a linear (weight (out, in)) with its bias."""

    kind: str
    weight: Tensor
    bias: Tensor
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    groups: int = 1

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
        )

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
        """Multiply-adds to produce an output of `out_shape`."""
        positions = math.prod(out_shape[:-1]) if self.kind == "linear" else (
            out_shape[0] * out_shape[2] * out_shape[3]
        )
        per_position = self.weight[0].numel() * self.out_features
        return int(positions * per_position)

    def to_module(self, like: Tensor) -> nn.Module:
        bias = bool(self.bias.any())
        if self.kind == "linear":
            module: nn.Module = nn.Linear(self.in_features, self.out_features, bias=bias)
        else:
            module = nn.Conv2d(
                self.in_features, self.out_features, self.kernel, self.stride, self.padding,
                groups=self.groups, bias=bias,
            )
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
        weight = module.weight.detach().to(f64)
        bias = (module.bias.detach().to(f64) if module.bias is not None
                else weight.new_zeros(weight.shape[0]))
        return Affine("conv", weight.clone(), bias.clone(), _pair(module.stride), _pair(padding),
                      module.groups)
    if isinstance(module, nn.Linear):
        weight = module.weight.detach().to(f64)
        bias = (module.bias.detach().to(f64) if module.bias is not None
                else weight.new_zeros(weight.shape[0]))
        return Affine("linear", weight.clone(), bias.clone())
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


def compose(a: Affine, b: Affine) -> tuple[Affine, bool] | None:
    """The op computing b(a(x)), and whether it is exact everywhere (not only in the interior)."""
    if a.kind != b.kind or a.out_features != b.in_features:
        return None
    if a.kind == "linear":
        return Affine("linear", b.weight @ a.weight, b.weight @ a.bias + b.bias), True
    wa, wb = a.dense(), b.dense()
    (ka0, ka1), (kb0, kb1), (sa0, sa1) = a.kernel, b.kernel, a.stride
    weight = wa.new_zeros(b.out_features, a.in_features, ka0 + (kb0 - 1) * sa0,
                          ka1 + (kb1 - 1) * sa1)
    for i in range(kb0):
        for j in range(kb1):
            weight[:, :, i * sa0:i * sa0 + ka0, j * sa1:j * sa1 + ka1] += torch.einsum(
                "om,mikl->oikl", wb[:, :, i, j], wa)
    bias = b.bias + torch.einsum("omij,m->o", wb, a.bias)
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


def identity_affine(channels: int, kind: str, like: Tensor) -> Affine:
    if kind == "linear":
        return Affine("linear", torch.eye(channels, dtype=like.dtype), like.new_zeros(channels))
    return Affine("conv", like.new_ones(channels, 1, 1, 1), like.new_zeros(channels),
                  groups=channels)


def add_parallel(a: Affine, b: Affine) -> Affine | None:
    """The op computing a(x) + b(x) (exact), or None if their shapes cannot share one op."""
    if (a.kind != b.kind or a.in_features != b.in_features
            or a.out_features != b.out_features or a.stride != b.stride):
        return None
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
    return Affine("conv", _regroup(weight, groups), a.bias + b.bias, a.stride, pad, groups)


# --------------------------------------------------------------------------------------------
# The report


@dataclass
class Merge:
    """One merge considered: what it replaced, whether it was taken, and why."""

    rule: str
    replaces: list[str]
    exact: bool
    macs_before: int
    macs_after: int
    taken: bool
    reason: str = ""
    seconds_before: float | None = None
    seconds_after: float | None = None


@dataclass
class FoldReport:
    policy: str
    ops_before: int
    ops_after: int
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    depth_before: int
    depth_after: int
    max_abs_diff: float
    relative_error: float
    merges: list[Merge] = field(default_factory=list)
    removed_branches: list[str] = field(default_factory=list)
    agreement: float | None = None
    top1_unfolded: float | None = None
    top1_folded: float | None = None

    @property
    def exact(self) -> bool:
        """True when every merge taken is exact (the fold must then agree to float32 rounding)."""
        return all(m.exact for m in self.merges if m.taken)

    def to_dict(self) -> dict:
        return {**asdict(self), "exact": self.exact}

    def markdown(self) -> str:
        """The report as a Markdown table plus the list of merges."""
        rows = [
            ("operators", self.ops_before, self.ops_after),
            ("multiply-adds", f"{self.macs_before:,}", f"{self.macs_after:,}"),
            ("parameters", f"{self.params_before:,}", f"{self.params_after:,}"),
            ("conv/linear ops on the longest path", self.depth_before, self.depth_after),
        ]
        lines = [f"Fold report (policy {self.policy})", "",
                 "| | unfolded | folded |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {before} | {after} |" for name, before, after in rows]
        if self.top1_unfolded is not None:
            lines.append(f"| test top-1 | {self.top1_unfolded:.2f} | {self.top1_folded:.2f} |")
        lines.append("")
        kind = "all merges exact" if self.exact else "border-approximate merges present"
        lines.append(f"max |folded - unfolded| = {self.max_abs_diff:.3g} (relative "
                     f"{self.relative_error:.3g}; {kind})")
        if self.agreement is not None:
            lines.append(f"top-1 agreement with the unfolded model: {self.agreement:.2f}%")
        if self.removed_branches:
            lines.append(f"branches removed (always-OFF sites): "
                         f"{', '.join(self.removed_branches)}")
        taken = [m for m in self.merges if m.taken]
        declined = [m for m in self.merges if not m.taken]
        lines += ["", f"merges taken ({len(taken)}):"]
        lines += [f"- {m.rule}: {' + '.join(m.replaces)} "
                  f"({'exact' if m.exact else 'border-approximate'}; MACs {m.macs_before:,} -> "
                  f"{m.macs_after:,}{_timing(m)})" for m in taken]
        if declined:
            lines += ["", f"merges declined ({len(declined)}):"]
            lines += [f"- {m.rule}: {' + '.join(m.replaces)} ({m.reason})" for m in declined]
        return "\n".join(lines)


def _timing(merge: Merge) -> str:
    if merge.seconds_before is None:
        return ""
    return f"; {merge.seconds_before * 1e3:.3f} -> {merge.seconds_after * 1e3:.3f} ms"


# --------------------------------------------------------------------------------------------
# Graph helpers


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, STAND_IN_TYPES)
                or super().is_leaf_module(module, qualified_name))


def trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure gets one clear message
        raise FoldError(
            f"torch.fx cannot trace {type(model).__name__} ({type(error).__name__}: {error}). "
            "Folding needs a traceable forward: move data-dependent Python control flow out "
            "of forward(), or fold the traceable submodules one by one."
        ) from error
    for node in graph.nodes:
        node.type = None  # string annotations (PEP 563) would make the module unpicklable
    return torch.fx.GraphModule(model, graph, type(model).__name__)


def _is_op_node(node: torch.fx.Node) -> bool:
    return node.op in ("call_module", "call_function", "call_method")


def _module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def count_ops(gm: torch.fx.GraphModule) -> int:
    """Operator calls in the graph, not counting no-ops (Identity, eval Dropout)."""
    return sum(1 for n in gm.graph.nodes if _is_op_node(n)
               and not isinstance(_module(gm, n), PASS_THROUGH))


def longest_linear_path(gm: torch.fx.GraphModule) -> int:
    """Conv/linear ops on the longest input-to-output path."""
    depth: dict[torch.fx.Node, int] = {}
    for node in gm.graph.nodes:
        before = max((depth[i] for i in node.all_input_nodes), default=0)
        is_linear = isinstance(_module(gm, node), (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
        is_linear = is_linear or node.target in (torch.conv2d, torch.nn.functional.conv2d,
                                                 torch.nn.functional.linear)
        depth[node] = before + int(is_linear)
        if node.op == "output":
            return depth[node]
    return 0


def count_macs(model: nn.Module, example_input: Tensor) -> int:
    """Forward multiply-adds by torch's flop counter (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input)
    return counter.get_total_flops() // 2


def _input_of(node: torch.fx.Node) -> torch.fx.Node | None:
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    arg = node.args[0]
    return arg if isinstance(arg, torch.fx.Node) else None


def _meta_shape(node: torch.fx.Node) -> torch.Size:
    return node.meta["tensor_meta"].shape


def median_seconds(fn: Callable[[], object], repeats: int = 15, warmup: int = 3) -> float:
    """Median wall time of `fn()` under no_grad, after warm-up (synchronizing CUDA)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# The folding pass


class _Folder:
    def __init__(self, gm: torch.fx.GraphModule, example: Tensor, policy: str) -> None:
        self.gm = gm
        self.example = example
        self.policy = policy
        self.merges: list[Merge] = []
        self.removed: list[str] = []
        self.declined: set[tuple] = set()
        self.made = 0
        self.origin: dict[str, list[str]] = {}

    # shapes ------------------------------------------------------------------------------
    def propagate(self) -> None:
        self.gm.graph.lint()
        self.gm.recompile()
        ShapeProp(self.gm).propagate(self.example[:1])

    def names(self, node: torch.fx.Node) -> list[str]:
        return self.origin.get(str(node.target), [str(node.target)])

    # rules -------------------------------------------------------------------------------
    def drop_pass_through(self) -> None:
        for node in list(self.gm.graph.nodes):
            if isinstance(_module(self.gm, node), PASS_THROUGH) and _input_of(node) is not None:
                node.replace_all_uses_with(node.args[0])
                self.gm.graph.erase_node(node)

    def remove_dead_branches(self) -> None:
        zeros = [n for n in self.gm.graph.nodes if isinstance(_module(self.gm, n), Zero)]
        if not zeros:
            return
        self.removed = [str(n.target) for n in zeros]
        depends: dict[torch.fx.Node, bool] = {}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                depends[node] = True
            elif isinstance(_module(self.gm, node), Zero) or node.op == "get_attr":
                depends[node] = False
            else:
                depends[node] = any(depends[i] for i in node.all_input_nodes)
        output = next(n for n in self.gm.graph.nodes if n.op == "output")
        if not depends[output]:
            raise FoldError(
                f"layer collapse: with {', '.join(self.removed)} always OFF, no path from the "
                "input reaches the output, so the network would return the same prediction for "
                "every input. Keep at least one site on that path active."
            )
        boundary = [n for n in self.gm.graph.nodes if _is_op_node(n) and not depends[n]
                    and any(depends[u] for u in n.users)]
        values = _capture(self.gm, self.example[:1], boundary)
        for index, node in enumerate(boundary):
            name = f"folded_constant_{index}"
            self.gm.register_buffer(name, values[node].detach().clone())
            with self.gm.graph.inserting_before(node):
                constant = self.gm.graph.get_attr(name)
            node.replace_all_uses_with(constant)
        self.gm.graph.eliminate_dead_code()

    def try_sequential(self, node: torch.fx.Node, diagonal_only: bool = False) -> bool:
        first = _input_of(node)
        if first is None or len(first.users) != 1 or _input_of(first) is None:
            return False
        a = affine_of(_module(self.gm, first), len(_meta_shape(first.args[0])))
        b = affine_of(_module(self.gm, node), len(_meta_shape(first)))
        if a is None or b is None or (diagonal_only and not (a.is_diagonal or b.is_diagonal)):
            return False
        result = compose(a, b)
        if result is None:
            return False
        merged, exact = result
        macs_before = a.macs(_meta_shape(first)) + b.macs(_meta_shape(node))
        module_a, module_b = _module(self.gm, first), _module(self.gm, node)
        return self.apply("sequential", [first, node], first.args[0], merged, exact,
                          macs_before, lambda x: module_b(module_a(x)))

    def try_parallel(self, node: torch.fx.Node) -> bool:
        if node.target not in ADDS or len(node.args) != 2 or node.kwargs:
            return False
        left, right = node.args
        if not all(isinstance(arg, torch.fx.Node) for arg in (left, right)):
            return False
        for op_node, other in ((left, right), (right, left)):
            source = _input_of(op_node)
            if source is None or len(op_node.users) != 1:
                continue
            a = affine_of(_module(self.gm, op_node), len(_meta_shape(source)))
            if a is None:
                continue
            if other is source:
                b = identity_affine(a.in_features, a.kind, a.weight)
                if a.in_features != a.out_features or a.stride != (1, 1):
                    continue
                parts, modules = [op_node], [_module(self.gm, op_node)]
            elif _input_of(other) is source and len(other.users) == 1:
                b = affine_of(_module(self.gm, other), len(_meta_shape(source)))
                parts, modules = [op_node, other], [_module(self.gm, op_node),
                                                    _module(self.gm, other)]
            else:
                continue
            if b is None:
                continue
            merged = add_parallel(a, b)
            if merged is None:
                continue
            macs_before = a.macs(_meta_shape(op_node)) + (
                b.macs(_meta_shape(other)) if len(parts) == 2 else 0)
            if len(modules) == 2:
                def unmerged(x, ma=modules[0], mb=modules[1]):
                    return ma(x) + mb(x)
            else:
                def unmerged(x, ma=modules[0]):
                    return ma(x) + x
            if self.apply("parallel", [*parts, node], source, merged, True, macs_before,
                          unmerged):
                return True
        return False

    def try_bias(self, node: torch.fx.Node) -> bool:
        if node.target not in ADDS or len(node.args) != 2 or node.kwargs:
            return False
        for op_node, other in (node.args, reversed(node.args)):
            if not (isinstance(other, torch.fx.Node) and other.op == "get_attr"
                    and isinstance(op_node, torch.fx.Node)):
                continue
            constant = getattr(self.gm, other.target)
            source = _input_of(op_node)
            if source is None or len(op_node.users) != 1:
                continue
            a = affine_of(_module(self.gm, op_node), len(_meta_shape(source)))
            per_channel = _per_channel(constant, a.kind if a else "", _meta_shape(op_node))
            if a is None or per_channel is None:
                continue
            a.bias = a.bias + per_channel.to(a.bias)
            return self.apply("bias", [op_node, node], source, a, True,
                              a.macs(_meta_shape(op_node)), None, always=True)
        return False

    def apply(self, rule: str, nodes: list[torch.fx.Node], source: torch.fx.Node,
              merged: Affine, exact: bool, macs_before: int,
              unmerged: Callable[[Tensor], Tensor] | None, always: bool = False) -> bool:
        """Decide by the policy, then put one module for `merged` in place of `nodes`."""
        key = (rule, *(str(n.target) if n.op == "call_module" else n.name for n in nodes))
        if key in self.declined:
            return False
        last = nodes[-1]
        out_shape = _meta_shape(last)
        macs_after = merged.macs(out_shape)
        if merged.kind == "conv":
            h, w = _meta_shape(source)[2:]
            expect = tuple((size + 2 * p - k) // s + 1 for size, p, k, s in
                           zip((h, w), merged.padding, merged.kernel, merged.stride, strict=True))
            if expect != tuple(out_shape[2:]):
                return False
        replaces = [name for n in nodes if n.op == "call_module" for name in self.names(n)]
        batch = self.example.shape[0]
        record = Merge(rule, replaces, exact, macs_before * batch, macs_after * batch, True)
        # The merged op reads `source`: it takes that tensor's dtype, not the model input's
        # (token ids are int64, the activations the op sees are floating point).
        like = self.example.new_empty(0, dtype=source.meta["tensor_meta"].dtype)
        module = merged.to_module(like)
        if not always:
            if self.policy == "macs" and macs_after > macs_before:
                record.taken, record.reason = False, (
                    f"would raise MACs {macs_before * batch:,} -> {macs_after * batch:,}")
            elif self.policy == "latency" and unmerged is not None:
                x = torch.randn(batch, *_meta_shape(source)[1:], dtype=like.dtype,
                                device=like.device)
                record.seconds_before = median_seconds(lambda: unmerged(x))
                record.seconds_after = median_seconds(lambda: module(x))
                if record.seconds_after >= record.seconds_before:
                    record.taken, record.reason = False, (
                        f"slower here: {record.seconds_before * 1e3:.3f} -> "
                        f"{record.seconds_after * 1e3:.3f} ms at batch {batch}")
        self.merges.append(record)
        if not record.taken:
            self.declined.add(key)
            return False
        name = f"folded_{self.made}"
        self.made += 1
        self.gm.add_submodule(name, module)
        self.origin[name] = replaces
        with self.gm.graph.inserting_after(last):
            new = self.gm.graph.call_module(name, (source,))
        last.replace_all_uses_with(new)
        for node in reversed(nodes):
            if not node.users:
                self.gm.graph.erase_node(node)
        self.propagate()
        return True

    def run(self) -> torch.fx.GraphModule:
        self.drop_pass_through()
        self.remove_dead_branches()
        self.propagate()
        # Per-channel scales (BatchNorm) first: those merges never cost anything, and the
        # cost of the others is then judged on the ops that really remain.
        rules = [
            lambda node: self.try_bias(node) or self.try_sequential(node, diagonal_only=True),
            lambda node: (self.try_bias(node) or self.try_sequential(node)
                          or self.try_parallel(node)),
        ]
        for rule in rules:
            changed = True
            while changed:
                changed = False
                for node in list(self.gm.graph.nodes):
                    if rule(node):
                        changed = True
                        break
        self.gm.delete_all_unused_submodules()
        self.gm.recompile()
        return self.gm


def _per_channel(constant: Tensor, kind: str, shape: torch.Size) -> Tensor | None:
    """The per-channel values of a constant that is uniform over batch and positions, or None."""
    if kind == "conv" and constant.dim() == 4 and constant.shape[1] == shape[1]:
        values = constant[:1, :, :1, :1]
        return values.flatten() if bool((constant == values).all()) else None
    if kind == "linear" and constant.dim() >= 1 and constant.shape[-1] == shape[-1]:
        values = constant.reshape(-1, constant.shape[-1])[:1]
        return values.flatten() if bool((constant == values).all()) else None
    return None


def _capture(gm: torch.fx.GraphModule, example: Tensor,
             nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, Tensor]:
    wanted = set(nodes)
    values: dict[torch.fx.Node, Tensor] = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> object:
            result = super().run_node(node)
            if node in wanted:
                values[node] = result
            return result

    with torch.no_grad():
        Capture(gm).run(example)
    return values


# --------------------------------------------------------------------------------------------
# Public API


def compare_outputs(unfolded: nn.Module, folded: nn.Module,
                    batches: Iterable) -> dict[str, float | None]:
    """Top-1 agreement (and top-1 of each when targets come with the batches) over `batches`."""
    agree = correct_unfolded = correct_folded = seen = 0
    has_targets = True
    device = next(iter(folded.buffers()), next(iter(folded.parameters()), None))
    with torch.no_grad():
        for batch in batches:
            inputs, targets = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (
                batch, None)
            if device is not None:
                inputs = inputs.to(device.device)
            p_unfolded = unfolded(inputs).argmax(-1)
            p_folded = folded(inputs).argmax(-1)
            agree += int((p_unfolded == p_folded).sum())
            seen += len(p_folded)
            if targets is None:
                has_targets = False
            else:
                targets = targets.to(p_folded.device)
                correct_unfolded += int((p_unfolded == targets).sum())
                correct_folded += int((p_folded == targets).sum())
    if seen == 0:
        raise ValueError("compare_outputs got no batches")
    result = {"agreement": 100.0 * agree / seen, "top1_unfolded": None, "top1_folded": None}
    if has_targets:
        result["top1_unfolded"] = 100.0 * correct_unfolded / seen
        result["top1_folded"] = 100.0 * correct_folded / seen
    return result


def fold(model: nn.Module, example_input: Tensor, policy: str = "macs",
         data: Iterable | None = None) -> torch.fx.GraphModule:
    """A new eval-mode module computing the same function as `model` with fewer operators.

    `model` is not modified. `policy` decides merges that change the work: "macs" (default)
    takes a merge only if it needs no more multiply-adds than the ops it replaces, "all" takes
    every merge, "latency" times both on `example_input`'s batch size and device. The returned
    module carries `fold_report` (a FoldReport); with `data` (batches of inputs or
    (input, target) pairs) the report also gives top-1 agreement and top-1 of both models.
    """
    if policy not in POLICIES:
        raise FoldError(f"unknown fold policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise FoldError("example_input must be a batched tensor, e.g. one batch of test images")
    from depthcut.pruning import clone_model, make_permanent  # pruning imports fold

    unfolded = make_permanent(clone_model(model)).eval()  # pruning masks baked into weights
    gm = trace(copy.deepcopy(unfolded))
    with torch.no_grad():
        reference = unfolded(example_input)
    ops_before, depth_before = count_ops(gm), longest_linear_path(gm)
    folder = _Folder(gm, example_input, policy)
    folded = folder.run()
    with torch.no_grad():
        output = folded(example_input)
    if output.shape != reference.shape:
        raise FoldError(f"folding changed the output shape {tuple(reference.shape)} -> "
                        f"{tuple(output.shape)}; please report this model")
    diff = float((output - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    report = FoldReport(
        policy=policy,
        ops_before=ops_before,
        ops_after=count_ops(folded),
        macs_before=count_macs(unfolded, example_input),
        macs_after=count_macs(folded, example_input),
        params_before=sum(p.numel() for p in unfolded.parameters()),
        params_after=sum(p.numel() for p in folded.parameters()),
        depth_before=depth_before,
        depth_after=longest_linear_path(folded),
        max_abs_diff=diff,
        relative_error=diff / scale,
        merges=folder.merges,
        removed_branches=folder.removed,
    )
    if data is not None:
        compared = compare_outputs(unfolded, folded, data)
        report.agreement = compared["agreement"]
        report.top1_unfolded = compared["top1_unfolded"]
        report.top1_folded = compared["top1_folded"]
    folded.fold_report = report
    return folded
