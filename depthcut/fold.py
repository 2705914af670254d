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
  bias b2 + sum(W2) b1); *chain*: a maximal run of linear ops (each reading only the previous
  one's output; broken by nonlinear sites, branch points and ops that are not linear, such as
  LayerNorm or pooling) becomes the partition into merged segments of least total cost, over
  every contiguous segment, as in matrix-chain ordering; *parallel*: op A(x) + op B(x) or
  A(x) + x becomes one op (RepVGG-style kernel embedding). The first pass allows only
  per-channel sequential merges. The second decides every chain, then every parallel merge,
  and again until nothing changes: a residual block whose branch is linear becomes one op, then
  one op with its shortcut (centre tap), and the chains that makes longer are decided again.

Chains and policies (`depthcut.fold_policy`). A policy that prices segments (`segment_cost`:
the cost of one segment, a `Merge` with rule "chain", a single op being a segment too, or None
where the policy does not allow it) decides chains as a whole: "macs" prices a segment by its
multiply-adds, "latency" by its median time here (a `depthcut.cost` timer), both for exact
segments only; "all" by one per op left (the fewest ops, whatever the border). Ties go to fewer
MACs, then fewer ops. Each segment taken is recorded as a Merge (rule "chain", MACs before and
after, exactness, why); when the whole chain is not one op, a declined Merge for the whole
chain says why. A policy without a segment cost (a plain callable, for one) decides merge by
merge (sequential, then parallel).

Every linear op is first read as an `Affine` (`depthcut.affine`: conv or linear weight, bias,
stride, padding, groups, optional bias map); merges are computed in float64. A merged chain is
exact when no op after its first spatial op (kernel > 1) zero-pads: the linear parts then agree
everywhere, and what the border still needs (the composed bias that an inner op's padding sees,
e.g. a 1x1 conv or BN with a bias before a padded 3x3) is a fixed per-position bias map,
original(0) - merged(0), computed for the input size the model is folded at
(`layers.BiasMapConv2d`, which refuses any other size with `InputSizeError`; the report gives
`input_size` and `bias_maps`). Otherwise (a padded op after a spatial op: the border error
depends on the input) the merge is border-approximate: the merged conv computes the inner ops
beyond their borders, and the report gives the measured deviation. Each proposed merge is a
`Merge` record; the policy (a `FoldPolicy`: "macs", "all" and "latency" are presets in
`POLICIES`; or a plain callable `(Merge) -> bool`) decides whether it is taken, with both sides
at hand to run (`MergeSides`); "macs" and "latency" take exact merges only. Folding a bias never
costs: it is always taken.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from depthcut.affine import (
    Affine,
    add_parallel,
    affine_of,
    compose,  # noqa: F401 (re-exported: part of the fold API)
    compose_chain,
    compose_shape,
    identity_affine,
    linear_parts_agree,
)
from depthcut.cost import count_macs
from depthcut.errors import ConfigError, DepthcutError
from depthcut.fold_policy import (  # noqa: F401 (re-exported: part of the fold API)
    APPROXIMATE,
    POLICIES,
    CallablePolicy,
    FoldPolicy,
    Merge,
    MergeSides,
)
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
from depthcut.layers import BiasMapConv2d, InputSizeError, Zero  # noqa: F401 (re-export)
from depthcut.masks import clone_model, make_permanent


class FoldError(DepthcutError, ValueError):
    """The model cannot be folded as asked (untraceable, layer collapse, bad policy)."""


# --------------------------------------------------------------------------------------------
# The report


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
    # The per-sample input shape the model was folded at, e.g. [3, 32, 32]; the ops holding a
    # bias map (`layers.BiasMapConv2d`) hold it for this size only and refuse any other.
    input_size: list[int] | None = None
    bias_maps: list[str] = field(default_factory=list)

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
        if self.input_size is not None:
            size = "x".join(map(str, self.input_size))
            if self.bias_maps:
                lines.append(
                    f"folded at input size {size}: {len(self.bias_maps)} op(s) carry a bias map "
                    f"({', '.join(self.bias_maps)}) that holds for this input size only; the "
                    "folded model refuses inputs of another size (fold again for them)")
            else:
                lines.append(f"folded at input size {size} (no bias map: any input size works)")
        taken = [m for m in self.merges if m.taken]
        declined = [m for m in self.merges if not m.taken]
        lines += ["", f"merges taken ({len(taken)}):"]
        lines += [f"- {m.rule}: {' + '.join(m.replaces)} "
                  f"({'exact' if m.exact else 'border-approximate'}; MACs {m.macs_before:,} -> "
                  f"{m.macs_after:,}{_timing(m)}{'; ' + m.reason if m.reason else ''})"
                  for m in taken]
        if declined:
            lines += ["", f"merges declined ({len(declined)}):"]
            lines += [f"- {m.rule}: {' + '.join(m.replaces)} ({m.reason})" for m in declined]
        return "\n".join(lines)


def _timing(merge: Merge) -> str:
    if merge.seconds_before is None:
        return ""
    return f"; {merge.seconds_before * 1e3:.3f} -> {merge.seconds_after * 1e3:.3f} ms"


# --------------------------------------------------------------------------------------------
# Policies: which merges to take (`depthcut.fold_policy`)


def _resolve(policy: str | FoldPolicy | Callable[[Merge], bool]) -> FoldPolicy:
    """A preset's name, a FoldPolicy, or a user's callable `(Merge) -> bool` (wrapped)."""
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]
    if isinstance(policy, FoldPolicy):
        return policy
    if callable(policy):
        if hasattr(policy, "chain_cost"):
            raise FoldError("a policy's `chain_cost` attribute is no longer read: subclass "
                            "depthcut.fold_policy.FoldPolicy and override `segment_cost`")
        return CallablePolicy(policy)
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


def _spatial(node: torch.fx.Node) -> tuple[int, int] | None:
    """(H, W) of a (N, C, H, W) tensor, else None."""
    shape = _shape(node)
    return (int(shape[2]), int(shape[3])) if len(shape) == 4 else None


@dataclass
class FoldState:
    """What the passes share: the graph being rewritten, the example, the policy, the record."""

    gm: torch.fx.GraphModule
    example: Tensor
    policy: FoldPolicy
    merges: list[Merge] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    declined: set[tuple] = field(default_factory=set)  # never proposed twice
    made: int = 0
    origin: dict[str, list[str]] = field(default_factory=dict)  # folded module -> originals
    affines: dict[tuple[str, int], Affine | None] = field(default_factory=dict)  # read once

    @property
    def folded_at(self) -> tuple[int, ...]:
        """The per-sample input shape the model is folded at."""
        return tuple(self.example.shape[1:])

    def propagate(self) -> None:
        """Recompile and refresh every node's shape (the rules read them)."""
        self.gm.graph.lint()
        self.gm.recompile()
        ShapeProp(self.gm).propagate(self.example[:1])

    def module(self, node: torch.fx.Node) -> nn.Module | None:
        return module_of(self.gm, node)

    def affine(self, node: torch.fx.Node, source: torch.fx.Node) -> Affine | None:
        """The op `node` calls as an Affine, reading `source` (a copy: rules may change it)."""
        if node.op != "call_module":
            return None
        key = (str(node.target), len(_shape(source)))
        if key not in self.affines:  # a module name is never reused for another module
            self.affines[key] = affine_of(self.module(node), key[1])
        op = self.affines[key]
        return None if op is None else dataclasses.replace(op)

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
    unmerged: nn.Module | None = None  # the replaced ops as one module, for timing
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


def _input_maker(state: FoldState, source: torch.fx.Node, like: Tensor) -> Callable[[], Tensor]:
    """Random inputs of the shape `source` has, at the fold's batch size, dtype and device."""
    shape, batch = _shape(source), state.example.shape[0]
    return lambda: torch.randn(batch, *shape[1:], dtype=like.dtype, device=like.device)


def _decide(state: FoldState, merge: Merge, candidate: _Candidate, module: nn.Module,
            like: Tensor) -> None:
    """Ask the policy, with both sides at hand for it to run."""
    unmerged = candidate.unmerged
    sides = MergeSides(lambda: unmerged, lambda: module,
                       _input_maker(state, candidate.source, like))
    merge.taken = bool(state.policy.decide(merge, sides))
    if not merge.taken and not merge.reason:
        merge.reason = f"declined by policy {state.policy.name}"


def _replace(state: FoldState, candidate: _Candidate, module: nn.Module,
             replaces: list[str]) -> torch.fx.Node:
    """Put `module` (reading the source) in place of the candidate's nodes; the new node."""
    graph, last = state.gm.graph, candidate.nodes[-1]
    name = f"folded_{state.made}"
    state.made += 1
    state.gm.add_submodule(name, module)
    state.origin[name] = replaces
    with graph.inserting_after(last):
        new = graph.call_module(name, (candidate.source,))
    last.replace_all_uses_with(new)
    # The merged op gives the output of `last` (same shape: `_fits`), and nothing else changes
    # shape: no need to propagate shapes through the whole model again.
    new.meta["tensor_meta"] = last.meta["tensor_meta"]
    for node in reversed(candidate.nodes):
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    return new


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
    module = candidate.merged.to_module(like, state.folded_at)
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
        owner, _, attr = other.target.rpartition(".")  # a dotted target: a submodule's tensor
        constant = getattr(state.gm.get_submodule(owner), attr)
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
    result = compose_chain([a, b], _spatial(first.args[0]))
    if result is None:
        return False
    return _apply(state, _Candidate(
        "sequential", [first, node], first.args[0], *result,
        a.macs(_shape(first)) + b.macs(_shape(node)),
        nn.Sequential(state.module(first), state.module(node))))


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
    if other is source:
        if a.in_features != a.out_features or a.stride != (1, 1):
            return None
        b = identity_affine(a.in_features, a.kind, a.weight)
        parts, macs_b = [op_node], 0
        unmerged = _SumOf(state.module(op_node), None)
    elif input_of(other) is source and len(other.users) == 1:
        b = state.affine(other, source)
        if b is None:
            return None
        parts, macs_b = [op_node, other], b.macs(_shape(other))
        unmerged = _SumOf(state.module(op_node), state.module(other))
    else:
        return None
    merged = add_parallel(a, b)
    if merged is None:
        return None
    return _Candidate("parallel", [*parts, add], source, merged, True,
                      a.macs(_shape(op_node)) + macs_b, unmerged)


class _SumOf(nn.Module):
    """a(x) + b(x), or a(x) + x without b: the ops a parallel merge replaces, for timing."""

    def __init__(self, a: nn.Module, b: nn.Module | None) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + (x if self.b is None else self.b(x))


# --------------------------------------------------------------------------------------------
# Chains: the partition of least total cost (matrix-chain style)


def _link(state: FoldState, node: torch.fx.Node) -> torch.fx.Node | None:
    """The op `node` continues a chain from: its input, when that is a linear op whose only
    user is `node` (not a branch point); else None."""
    source = input_of(node)
    if (source is None or len(source.users) != 1 or input_of(source) is None
            or state.affine(source, source.args[0]) is None):
        return None
    return source


def _chain_at(state: FoldState, node: torch.fx.Node) -> list[torch.fx.Node]:
    """The maximal chain of linear ops starting at `node`, or [] if `node` does not start one:
    each op reads only the previous one's output, and each but the last has one user."""
    source = input_of(node)
    if source is None or state.affine(node, source) is None or _link(state, node) is not None:
        return []
    nodes = [node]
    while len(nodes[-1].users) == 1:
        user = next(iter(nodes[-1].users))
        if input_of(user) is not nodes[-1] or state.affine(user, nodes[-1]) is None:
            break
        nodes.append(user)
    return nodes


@dataclass
class _Segment:
    """Ops start..stop of a chain as one op: its exactness, its Merge record and its cost."""

    start: int
    stop: int  # inclusive
    exact: bool
    merge: Merge  # what the chain cost saw
    cost: float | None


def _segments(state: FoldState, nodes: list[torch.fx.Node], ops: list[Affine]
              ) -> dict[tuple[int, int], _Segment]:
    """Every contiguous segment of the chain that one op can compute, priced by the policy's
    `segment_cost`. Segments are priced in shape (`compose_shape`); a merged op is computed
    only when it is run (a "latency" cost times it) or taken."""
    batch, like = state.example.shape[0], _like(state, input_of(nodes[0]))
    singles = [op.macs(_shape(node)) for op, node in zip(ops, nodes, strict=True)]
    modules = [state.module(node) for node in nodes]
    result: dict[tuple[int, int], _Segment] = {}
    for i in range(len(nodes)):
        source = input_of(nodes[i])
        size, make_input = _spatial(source), _input_maker(state, source, like)
        merged: Affine | None = ops[i]
        for j in range(i, len(nodes)):
            if j > i:
                merged = compose_shape(merged, ops[j])
            if merged is None:
                break
            candidate = _Candidate("chain", nodes[i:j + 1], source, merged, True, 0)
            if j > i and not _fits(candidate):
                continue
            segment_ops = ops[i:j + 1]
            exact = merged.kind == "linear" or linear_parts_agree(segment_ops)

            def build(i=i, j=j, ops=segment_ops, size=size) -> nn.Module:
                if j == i:
                    return modules[i]
                return _finish(ops, size).to_module(like, state.folded_at)

            merge = Merge(
                "chain", [name for node in nodes[i:j + 1] for name in state.names(node)], exact,
                sum(singles[i:j + 1]) * batch, merged.macs(_shape(nodes[j])) * batch, False)
            sides = MergeSides(lambda parts=modules[i:j + 1]: nn.Sequential(*parts), build,
                               make_input)
            cost = state.policy.segment_cost(merge, sides)
            if cost is None and j == i:
                raise FoldError(f"the chain cost of policy {state.policy.name} gave no cost for "
                                f"the single op {nodes[i].target}; it must price every op")
            result[i, j] = _Segment(i, j, exact, merge, cost)
    return result


def _finish(ops: list[Affine], size: tuple[int, int] | None) -> Affine:
    """The segment's op, with its bias map if the border needs one."""
    result = compose_chain(ops, size)
    if result is None:  # a map the ops carry was made for another size: cannot happen in fold
        raise FoldError("inconsistent bias maps in a chain; please report this model")
    return result[0]


def _like(state: FoldState, source: torch.fx.Node) -> Tensor:
    # A merged op reads `source`: it takes that tensor's dtype, not the model input's (token
    # ids are int64, the activations the op sees are floating point).
    return state.example.new_empty(0, dtype=source.meta["tensor_meta"].dtype)


def _best_partition(segments: dict[tuple[int, int], _Segment], n: int) -> list[_Segment]:
    """Least total cost over partitions of ops 0..n-1 into segments (ties: fewer MACs, then
    fewer ops): best[j] = min over i of best[i] + cost(i..j-1), as in matrix-chain ordering."""
    best: list[tuple[tuple[float, int, int], list[_Segment]] | None] = [((0.0, 0, 0), [])]
    for stop in range(n):
        options = []
        for start in range(stop + 1):
            segment, before = segments.get((start, stop)), best[start]
            if segment is None or segment.cost is None or before is None:
                continue
            (cost, macs, count), parts = before
            key = (cost + segment.cost, macs + segment.merge.macs_after, count + 1)
            options.append((key, [*parts, segment]))
        best.append(min(options, key=lambda option: option[0]) if options else None)
    return best[n][1]


def chain(state: FoldState, node: torch.fx.Node) -> bool:
    """The maximal chain of linear ops starting at `node`, as the partition into merged segments
    of least total cost under the policy's `segment_cost` (MACs for "macs", ops for "all", time
    for "latency"), over every contiguous segment: the whole chain is weighed at once, so a
    merge that raises the cost on its own but lowers it with its neighbours is found (a
    MobileNetV2 block, 1x1 C->6C, depthwise 3x3, 1x1 6C->C: one 3x3 C->C conv). Each segment
    taken is one Merge (rule "chain"); if the whole chain is not one op, a declined Merge for
    the whole chain says why."""
    nodes = _chain_at(state, node) if state.policy.prices_segments else []
    key = ("chain", *(str(n.target) for n in nodes))
    if len(nodes) < 2 or key in state.declined:
        return False
    state.declined.add(key)
    ops = [state.affine(n, input_of(n)) for n in nodes]
    segments = _segments(state, nodes, ops)
    chosen = _best_partition(segments, len(nodes))
    kept = []
    for segment in chosen:
        merge = segment.merge
        if segment.stop == segment.start:
            kept.append(nodes[segment.start])
            continue
        parts = [segments[i, i].merge for i in range(segment.start, segment.stop + 1)]
        seconds = [part.seconds_after for part in parts]
        if merge.seconds_after is not None and None not in seconds:
            merge.seconds_before = sum(seconds)
        final = _finish(ops[segment.start:segment.stop + 1],
                        _spatial(input_of(nodes[segment.start])))
        merge.taken = True
        merge.reason = f"chain of {len(nodes)} ops -> {len(chosen)} at least total cost"
        if final.bias_map is not None:
            merge.reason += f"; bias map for {'x'.join(map(str, final.input_size))} inputs"
        source = input_of(nodes[segment.start])
        module = final.to_module(_like(state, source), state.folded_at)
        candidate = _Candidate("chain", nodes[segment.start:segment.stop + 1], source, final,
                               merge.exact, 0)
        state.merges.append(merge)
        kept.append(_replace(state, candidate, module, merge.replaces))
    whole = segments.get((0, len(nodes) - 1))
    if whole is not None and len(chosen) > 1:
        state.merges.append(_declined_chain(state, whole, chosen, segments))
    state.declined.add(("chain", *(str(n.target) for n in kept)))
    return len(kept) < len(nodes)


def _declined_chain(state: FoldState, whole: _Segment, chosen: list[_Segment],
                    segments: dict[tuple[int, int], _Segment]) -> Merge:
    """The whole chain as one op, declined: why (cost against the partition taken)."""
    merge = whole.merge
    singles = [segments[i, i].merge.seconds_after for i in range(whole.stop + 1)]
    if merge.seconds_after is not None and None not in singles:
        merge.seconds_before = sum(singles)
    chosen_macs = sum(s.merge.macs_after for s in chosen)
    macs = f"MACs {merge.macs_after:,} as one op against {chosen_macs:,} as {len(chosen)}"
    if whole.cost is None:
        why = APPROXIMATE if not whole.exact else "not allowed"
        merge.reason = f"{why}; the policy does not take it ({macs})"
    else:
        chosen_cost = sum(s.cost for s in chosen)
        if merge.seconds_after is not None:
            cost = f"{merge.seconds_after * 1e3:.3f} ms against {chosen_cost * 1e3:.3f} ms; "
        else:
            cost = state.policy.compare_costs(whole.cost, chosen_cost)
        merge.reason = f"cheaper as {len(chosen)} ops under the policy ({cost}{macs})"
    return merge


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
    """Constants into biases, chains (or sequential merges, for a policy without a chain cost)
    and parallel merges, as the policy allows. A chain is decided before the add that follows
    it (graph order), so a residual block whose branch is linear becomes one op, then one with
    its shortcut; a chain that a parallel merge makes longer is decided again."""
    if not state.policy.prices_segments:
        _rewrite(state, (into_bias, sequential, parallel))
        return
    while True:  # every chain, then every parallel merge, until nothing changes
        made = state.made
        _rewrite(state, (into_bias, chain))
        _rewrite(state, (into_bias, parallel))
        if state.made == made:
            return


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


def fold(model: nn.Module, example_input: Tensor,
         policy: str | FoldPolicy | Callable[[Merge], bool] = "macs",
         data: Iterable | None = None) -> torch.fx.GraphModule:
    """A new eval-mode module computing the same function as `model` with fewer operators.

    `model` is not modified. `policy` decides merges that change the work: "macs" (default)
    folds each chain of linear ops into the exact partition of least multiply-adds, "all" into
    the fewest ops whatever the border, "latency" into the exact partition of least measured
    time on `example_input`'s batch size and device (`LatencyPolicy(timer=...)` times with
    another `depthcut.cost` timer); or pass your own `FoldPolicy` (override `segment_cost` to
    decide chains as a whole), or a plain callable `(Merge) -> bool`, which decides merge by
    merge and may set `merge.reason` when it declines. The returned module carries
    `fold_report` (a FoldReport); with `data` (batches of inputs or (input, target) pairs) the
    report also gives top-1 agreement and top-1 of both models.

    Exact merges may carry a bias map (the border correction of a bias seen by zero padding):
    it holds for `example_input`'s spatial size only, and the folded model raises
    `InputSizeError` on inputs of another size (fold at the size you will run).
    """
    chosen = _resolve(policy)
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise FoldError("example_input must be a batched tensor, e.g. one batch of test images")
    unfolded = make_permanent(clone_model(model)).eval()  # pruning masks baked into weights
    gm = _trace(copy.deepcopy(unfolded))
    with torch.no_grad():
        reference = unfolded(example_input)
    ops_before, depth_before = count_ops(gm), longest_linear_path(gm)
    state = FoldState(gm, example_input, chosen)
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
        policy=chosen.name,
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
        input_size=list(state.folded_at),
        bias_maps=[name for name, m in folded.named_modules() if isinstance(m, BiasMapConv2d)],
    )
    if data is not None:
        compared = compare_outputs(unfolded, folded, data)
        report.agreement = compared["agreement"]
        report.top1_unfolded = compared["top1_unfolded"]
        report.top1_folded = compared["top1_folded"]
    folded.fold_report = report
    return folded
