"""Folding: merge the linear operators around linearized and dead sites (METHODS section 6).

A linearized site (Identity) only makes a network faster once the convolutions on each side are
merged into one. `fold` traces the model (`graph.trace`) and runs a short sequence of passes
over one `FoldState` (`PASSES`, in order):

- `drop_no_ops`: Identity and eval-mode Dropout calls are dropped;
- `remove_dead_branches`: everything computed only from an always-OFF site (`layers.Zero`) is
  a constant; it is evaluated once and kept as a buffer (a residual block reduces to its
  shortcut plus a per-channel bias). If the output no longer depends on the input, that is layer
  collapse and `FoldError` says so;
- `merge_per_channel`, then `merge_linear_ops`: rules rewrite one node at a time, first rule at
  the first node in graph order, until none applies. *bias*: a per-channel constant added to an
  op's output goes into its bias; *sequential*: op B reading only op A's output becomes one op
  (BatchNorm into conv/linear, linear after linear, 1x1 with its neighbour, depthwise with
  pointwise, spatial after spatial: kernel k1 + (k2 - 1) s1, stride s1 s2, padding p1 + p2 s1,
  bias b2 + sum(W2) b1); *parallel*: op A(x) + op B(x) or A(x) + x becomes one op
  (RepVGG-style kernel embedding). The first pass allows only per-channel sequential merges.

Every linear op is first read as an `Affine` (conv or linear weight, bias, stride, padding,
groups); merges are computed in float64. A merge is exact unless op B pads A's output with zeros
that one convolution cannot reproduce (spatial after spatial, or after a 1x1 with a bias): those
are border-approximate, and the report gives the measured deviation. Each proposed merge is a
`Merge` record; the policy, a callable `(Merge) -> bool` ("macs", "all" and "latency" are
presets in `POLICIES`), decides whether it is taken. Folding a bias never costs: it is always
taken.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from depthcut.errors import ConfigError, DepthcutError
from depthcut.graph import (
    PASS_THROUGH,
    TraceError,
    count_ops,
    depends_on_input,
    input_of,
    is_add,
    is_op,
    longest_linear_path,
    module_of,
    output_node,
    trace,
)
from depthcut.layers import ChannelScale, Zero
from depthcut.masks import clone_model, make_permanent


class FoldError(DepthcutError, ValueError):
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
    """One merge considered: what it replaced, whether it was taken, and why.

    The policy sees it before `taken` is final; `unmerged`, `merged` and `make_input` let it run
    both sides on an input of the real shape (they are cleared once it has decided).
    """

    rule: str
    replaces: list[str]
    exact: bool
    macs_before: int
    macs_after: int
    taken: bool
    reason: str = ""
    seconds_before: float | None = None
    seconds_after: float | None = None
    unmerged: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)
    merged: Callable[[Tensor], Tensor] | None = field(default=None, repr=False, compare=False)
    make_input: Callable[[], Tensor] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The recorded fields (not the callables a policy may run)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                if f.name not in _POLICY_ONLY}


_POLICY_ONLY = ("unmerged", "merged", "make_input")


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
        data = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)
                if f.name != "merges"}
        data["merges"] = [m.to_dict() for m in self.merges]
        return {f.name: data[f.name] for f in fields(self)} | {"exact": self.exact}

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
# Measures


def count_macs(model: nn.Module, example_input: Tensor) -> int:
    """Forward multiply-adds by torch's flop counter (FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(example_input)
    return counter.get_total_flops() // 2


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
# Policies: which merges to take


Policy = Callable[[Merge], bool]


def fewer_macs(merge: Merge) -> bool:
    """Preset "macs": take a merge that needs no more multiply-adds than the ops it replaces."""
    if merge.macs_after <= merge.macs_before:
        return True
    merge.reason = f"would raise MACs {merge.macs_before:,} -> {merge.macs_after:,}"
    return False


def every_merge(merge: Merge) -> bool:
    """Preset "all": the shallowest graph, whatever a merge costs."""
    return True


def faster_here(merge: Merge) -> bool:
    """Preset "latency": time both sides here at the fold's batch size; take the faster."""
    unmerged, merged = merge.unmerged, merge.merged
    if unmerged is None or merged is None or merge.make_input is None:
        return True
    x = merge.make_input()
    merge.seconds_before = median_seconds(lambda: unmerged(x))
    merge.seconds_after = median_seconds(lambda: merged(x))
    if merge.seconds_after < merge.seconds_before:
        return True
    merge.reason = (f"slower here: {merge.seconds_before * 1e3:.3f} -> "
                    f"{merge.seconds_after * 1e3:.3f} ms at batch {x.shape[0]}")
    return False


POLICIES: dict[str, Policy] = {"macs": fewer_macs, "all": every_merge, "latency": faster_here}


def _resolve(policy: str | Policy) -> tuple[str, Policy]:
    """(name for the report, callable) of a preset name or a user's callable."""
    if isinstance(policy, str) and policy in POLICIES:
        return policy, POLICIES[policy]
    if callable(policy):
        return getattr(policy, "__name__", type(policy).__name__), policy
    raise FoldError(f"unknown fold policy {policy!r}; choose one of {', '.join(POLICIES)}")


# --------------------------------------------------------------------------------------------
# Fold state and the one rewrite every merge goes through


def _trace(model: nn.Module) -> torch.fx.GraphModule:
    try:
        return trace(model)
    except TraceError as error:
        raise FoldError(
            f"{error}. Folding needs a traceable forward: move data-dependent Python control "
            "flow out of forward(), or fold the traceable submodules one by one."
        ) from error.cause


def _shape(node: torch.fx.Node) -> torch.Size:
    return node.meta["tensor_meta"].shape


@dataclass
class FoldState:
    """What the passes share: the graph being rewritten, the example, the policy, the record."""

    gm: torch.fx.GraphModule
    example: Tensor
    policy: Policy
    policy_name: str
    merges: list[Merge] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    declined: set[tuple] = field(default_factory=set)  # never proposed twice
    made: int = 0
    origin: dict[str, list[str]] = field(default_factory=dict)  # folded module -> originals

    def propagate(self) -> None:
        """Recompile and refresh every node's shape (the rules read them)."""
        self.gm.graph.lint()
        self.gm.recompile()
        ShapeProp(self.gm).propagate(self.example[:1])

    def module(self, node: torch.fx.Node) -> nn.Module | None:
        return module_of(self.gm, node)

    def affine(self, node: torch.fx.Node, source: torch.fx.Node) -> Affine | None:
        """The op `node` calls as an Affine, reading `source`."""
        return affine_of(self.module(node), len(_shape(source)))

    def names(self, node: torch.fx.Node) -> list[str]:
        return self.origin.get(str(node.target), [str(node.target)])


@dataclass
class _Candidate:
    """A rewrite a rule found: one op computing `merged` on `source`, in place of `nodes`."""

    rule: str
    nodes: list[torch.fx.Node]
    source: torch.fx.Node
    merged: Affine
    exact: bool
    macs_before: int  # per sample
    unmerged: Callable[[Tensor], Tensor] | None = None  # the replaced ops, for timing
    always: bool = False  # taken without asking the policy: it never costs anything


def _fits(candidate: _Candidate) -> bool:
    """Whether the merged op gives the replaced ops' output size from the source's size."""
    merged, out_shape = candidate.merged, _shape(candidate.nodes[-1])
    if merged.kind != "conv":
        return True
    h, w = _shape(candidate.source)[2:]
    expect = tuple((size + 2 * p - k) // s + 1 for size, p, k, s in
                   zip((h, w), merged.padding, merged.kernel, merged.stride, strict=True))
    return expect == tuple(out_shape[2:])


def _decide(state: FoldState, merge: Merge, candidate: _Candidate, module: nn.Module,
            like: Tensor) -> None:
    """Ask the policy (with what it needs to time both sides), then drop the callables."""
    shape, batch = _shape(candidate.source), state.example.shape[0]
    merge.unmerged, merge.merged = candidate.unmerged, module
    merge.make_input = lambda: torch.randn(batch, *shape[1:], dtype=like.dtype,
                                           device=like.device)
    merge.taken = bool(state.policy(merge))
    if not merge.taken and not merge.reason:
        merge.reason = f"declined by policy {state.policy_name}"
    merge.unmerged = merge.merged = merge.make_input = None


def _replace(state: FoldState, candidate: _Candidate, module: nn.Module,
             replaces: list[str]) -> None:
    """Put `module` (reading the source) in place of the candidate's nodes."""
    graph, last = state.gm.graph, candidate.nodes[-1]
    name = f"folded_{state.made}"
    state.made += 1
    state.gm.add_submodule(name, module)
    state.origin[name] = replaces
    with graph.inserting_after(last):
        new = graph.call_module(name, (candidate.source,))
    last.replace_all_uses_with(new)
    for node in reversed(candidate.nodes):
        if not node.users:
            graph.erase_node(node)
    state.propagate()


def _apply(state: FoldState, candidate: _Candidate) -> bool:
    """Record the merge, let the policy decide, and rewrite the graph if it is taken."""
    nodes = candidate.nodes
    key = (candidate.rule, *(str(n.target) if n.op == "call_module" else n.name for n in nodes))
    if key in state.declined or not _fits(candidate):
        return False
    batch = state.example.shape[0]
    replaces = [name for n in nodes if n.op == "call_module" for name in state.names(n)]
    macs_after = candidate.merged.macs(_shape(nodes[-1]))
    merge = Merge(candidate.rule, replaces, candidate.exact, candidate.macs_before * batch,
                  macs_after * batch, True)
    # The merged op reads `source`: it takes that tensor's dtype, not the model input's
    # (token ids are int64, the activations the op sees are floating point).
    like = state.example.new_empty(0, dtype=candidate.source.meta["tensor_meta"].dtype)
    module = candidate.merged.to_module(like)
    if not candidate.always:
        _decide(state, merge, candidate, module, like)
    state.merges.append(merge)
    if not merge.taken:
        state.declined.add(key)
        return False
    _replace(state, candidate, module, replaces)
    return True


# --------------------------------------------------------------------------------------------
# Rules: each looks at one node and proposes at most one rewrite


def into_bias(state: FoldState, node: torch.fx.Node) -> bool:
    """op(x) + constant, with a per-channel constant: the constant goes into op's bias."""
    if not is_add(node, methods=False) or len(node.args) != 2 or node.kwargs:
        return False
    for op_node, other in (node.args, reversed(node.args)):
        if not (isinstance(other, torch.fx.Node) and other.op == "get_attr"
                and isinstance(op_node, torch.fx.Node)):
            continue
        constant = getattr(state.gm, other.target)
        source = input_of(op_node)
        if source is None or len(op_node.users) != 1:
            continue
        a = state.affine(op_node, source)
        per_channel = _per_channel(constant, a.kind if a else "", _shape(op_node))
        if a is None or per_channel is None:
            continue
        a.bias = a.bias + per_channel.to(a.bias)
        return _apply(state, _Candidate("bias", [op_node, node], source, a, True,
                                        a.macs(_shape(op_node)), always=True))
    return False


def sequential(state: FoldState, node: torch.fx.Node, diagonal_only: bool = False) -> bool:
    """op B reading only op A's output: one op computing B(A(x))."""
    first = input_of(node)
    if first is None or len(first.users) != 1 or input_of(first) is None:
        return False
    a, b = state.affine(first, first.args[0]), state.affine(node, first)
    if a is None or b is None or (diagonal_only and not (a.is_diagonal or b.is_diagonal)):
        return False
    result = compose(a, b)
    if result is None:
        return False
    module_a, module_b = state.module(first), state.module(node)
    return _apply(state, _Candidate(
        "sequential", [first, node], first.args[0], *result,
        a.macs(_shape(first)) + b.macs(_shape(node)), lambda x: module_b(module_a(x))))


def per_channel_sequential(state: FoldState, node: torch.fx.Node) -> bool:
    """A sequential merge with a per-channel scale (BatchNorm, ChannelScale): never costs."""
    return sequential(state, node, diagonal_only=True)


def parallel(state: FoldState, node: torch.fx.Node) -> bool:
    """op A(x) + op B(x), or A(x) + x: one op (RepVGG-style kernel embedding)."""
    if not is_add(node, methods=False) or len(node.args) != 2 or node.kwargs:
        return False
    left, right = node.args
    if not all(isinstance(arg, torch.fx.Node) for arg in (left, right)):
        return False
    for op_node, other in ((left, right), (right, left)):
        candidate = _parallel_candidate(state, node, op_node, other)
        if candidate is not None and _apply(state, candidate):
            return True
    return False


def _parallel_candidate(state: FoldState, add: torch.fx.Node, op_node: torch.fx.Node,
                        other: torch.fx.Node) -> _Candidate | None:
    source = input_of(op_node)
    if source is None or len(op_node.users) != 1:
        return None
    a = state.affine(op_node, source)
    if a is None:
        return None
    module_a = state.module(op_node)
    if other is source:
        if a.in_features != a.out_features or a.stride != (1, 1):
            return None
        b = identity_affine(a.in_features, a.kind, a.weight)
        parts, macs_b = [op_node], 0

        def unmerged(x: Tensor) -> Tensor:
            return module_a(x) + x
    elif input_of(other) is source and len(other.users) == 1:
        b = state.affine(other, source)
        if b is None:
            return None
        parts, macs_b, module_b = [op_node, other], b.macs(_shape(other)), state.module(other)

        def unmerged(x: Tensor) -> Tensor:
            return module_a(x) + module_b(x)
    else:
        return None
    merged = add_parallel(a, b)
    if merged is None:
        return None
    return _Candidate("parallel", [*parts, add], source, merged, True,
                      a.macs(_shape(op_node)) + macs_b, unmerged)


# --------------------------------------------------------------------------------------------
# Passes, in order


def drop_no_ops(state: FoldState) -> None:
    """Identity and eval-mode Dropout calls go (a linearized site is an Identity)."""
    for node in list(state.gm.graph.nodes):
        if isinstance(state.module(node), PASS_THROUGH) and input_of(node) is not None:
            node.replace_all_uses_with(node.args[0])
            state.gm.graph.erase_node(node)


def remove_dead_branches(state: FoldState) -> None:
    """What only always-OFF sites (`Zero`) feed becomes a constant buffer; refuse collapse."""
    gm = state.gm
    zeros = [n for n in gm.graph.nodes if isinstance(state.module(n), Zero)]
    if not zeros:
        return
    state.removed = [str(n.target) for n in zeros]
    depends = depends_on_input(gm)
    if not depends[output_node(gm)]:
        raise FoldError(
            f"layer collapse: with {', '.join(state.removed)} always OFF, no path from the "
            "input reaches the output, so the network would return the same prediction for "
            "every input. Keep at least one site on that path active."
        )
    boundary = [n for n in gm.graph.nodes if is_op(n) and not depends[n]
                and any(depends[u] for u in n.users)]
    values = _capture(gm, state.example[:1], boundary)
    for index, node in enumerate(boundary):
        name = f"folded_constant_{index}"
        gm.register_buffer(name, values[node].detach().clone())
        with gm.graph.inserting_before(node):
            constant = gm.graph.get_attr(name)
        node.replace_all_uses_with(constant)
    gm.graph.eliminate_dead_code()


def annotate_shapes(state: FoldState) -> None:
    """Every node's output shape, which the merge rules read."""
    state.propagate()


def _rewrite(state: FoldState, rules: tuple[Callable[[FoldState, torch.fx.Node], bool], ...]
             ) -> None:
    """In graph order, the first rule that rewrites at a node; then from the start again."""
    while any(rule(state, node) for node in list(state.gm.graph.nodes) for rule in rules):
        pass


def merge_per_channel(state: FoldState) -> None:
    """Constants into biases, per-channel scales (BatchNorm) into their neighbours first: those
    never cost anything, and the other merges' cost is then judged on the ops that remain."""
    _rewrite(state, (into_bias, per_channel_sequential))


def merge_linear_ops(state: FoldState) -> None:
    """Constants into biases, sequential and parallel merges, as the policy allows."""
    _rewrite(state, (into_bias, sequential, parallel))


def clean_up(state: FoldState) -> None:
    state.gm.delete_all_unused_submodules()
    state.gm.recompile()


PASSES: tuple[Callable[[FoldState], None], ...] = (
    drop_no_ops, remove_dead_branches, annotate_shapes, merge_per_channel, merge_linear_ops,
    clean_up,
)


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
        raise ConfigError("compare_outputs got no batches")
    result = {"agreement": 100.0 * agree / seen, "top1_unfolded": None, "top1_folded": None}
    if has_targets:
        result["top1_unfolded"] = 100.0 * correct_unfolded / seen
        result["top1_folded"] = 100.0 * correct_folded / seen
    return result


def fold(model: nn.Module, example_input: Tensor, policy: str | Policy = "macs",
         data: Iterable | None = None) -> torch.fx.GraphModule:
    """A new eval-mode module computing the same function as `model` with fewer operators.

    `model` is not modified. `policy` decides merges that change the work: "macs" (default)
    takes a merge only if it needs no more multiply-adds than the ops it replaces, "all" takes
    every merge, "latency" times both on `example_input`'s batch size and device; or pass a
    callable `(Merge) -> bool` (it may set `merge.reason` when it declines). The returned
    module carries `fold_report` (a FoldReport); with `data` (batches of inputs or
    (input, target) pairs) the report also gives top-1 agreement and top-1 of both models.
    """
    policy_name, decide = _resolve(policy)
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise FoldError("example_input must be a batched tensor, e.g. one batch of test images")
    unfolded = make_permanent(clone_model(model)).eval()  # pruning masks baked into weights
    gm = _trace(copy.deepcopy(unfolded))
    with torch.no_grad():
        reference = unfolded(example_input)
    ops_before, depth_before = count_ops(gm), longest_linear_path(gm)
    state = FoldState(gm, example_input, decide, policy_name)
    for fold_pass in PASSES:
        fold_pass(state)
    folded = state.gm
    with torch.no_grad():
        output = folded(example_input)
    if output.shape != reference.shape:
        raise FoldError(f"folding changed the output shape {tuple(reference.shape)} -> "
                        f"{tuple(output.shape)}; please report this model")
    diff = float((output - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    report = FoldReport(
        policy=policy_name,
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
        merges=state.merges,
        removed_branches=state.removed,
    )
    if data is not None:
        compared = compare_outputs(unfolded, folded, data)
        report.agreement = compared["agreement"]
        report.top1_unfolded = compared["top1_unfolded"]
        report.top1_folded = compared["top1_folded"]
    folded.fold_report = report
    return folded
