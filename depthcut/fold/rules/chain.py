"""Chain merge: a maximal run of linear ops becomes the partition into merged segments of least
total cost under the policy (`FoldPolicy.segment_cost`), as in matrix-chain ordering.

A chain is a run of linear ops, each reading only the previous one's output; nonlinear sites,
branch points and ops that are not linear (LayerNorm, pooling) break it. Every contiguous
segment is priced (MACs for "macs", one per op for "all", measured time for "latency"; a single
op is a segment too), and the least total cost over partitions is found by dynamic programming
(ties: fewer MACs, then fewer ops). Each segment taken is one Merge (rule "chain"); when the
whole chain is not one op, a declined Merge for the whole chain says why. Only for a policy
that prices segments; one that decides merge by merge gets `sequential.py` instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx
from torch import nn

from depthcut.affine import Affine, compose_chain, compose_shape, linear_parts_agree
from depthcut.fold.policy import APPROXIMATE, Merge, MergeSides
from depthcut.fold.registry import LINEAR, prices_segments, register_rule
from depthcut.fold.rewrite import Candidate, fits, input_maker, replace_nodes
from depthcut.fold.state import FoldError, FoldState, shape_of, spatial_size
from depthcut.graph import input_of


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
    batch, like = state.example.shape[0], state.like(input_of(nodes[0]))
    singles = [op.macs(shape_of(node)) for op, node in zip(ops, nodes, strict=True)]
    modules = [state.module(node) for node in nodes]
    result: dict[tuple[int, int], _Segment] = {}
    for i in range(len(nodes)):
        source = input_of(nodes[i])
        size, make_input = spatial_size(source), input_maker(state, source, like)
        merged: Affine | None = ops[i]
        for j in range(i, len(nodes)):
            if j > i:
                merged = compose_shape(merged, ops[j])
            if merged is None:
                break
            candidate = Candidate("chain", nodes[i:j + 1], source, merged, True, 0)
            if j > i and not fits(candidate):
                continue
            segment_ops = ops[i:j + 1]
            exact = merged.kind == "linear" or linear_parts_agree(segment_ops)

            def build(i=i, j=j, ops=segment_ops, size=size) -> nn.Module:
                if j == i:
                    return modules[i]
                return _finish(ops, size).to_module(like, state.folded_at)

            merge = Merge(
                "chain", [name for node in nodes[i:j + 1] for name in state.names(node)], exact,
                sum(singles[i:j + 1]) * batch, merged.macs(shape_of(nodes[j])) * batch, False)
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
                        spatial_size(input_of(nodes[segment.start])))
        merge.taken = True
        merge.reason = f"chain of {len(nodes)} ops -> {len(chosen)} at least total cost"
        if final.bias_map is not None:
            merge.reason += f"; bias map for {'x'.join(map(str, final.input_size))} inputs"
        source = input_of(nodes[segment.start])
        module = final.to_module(state.like(source), state.folded_at)
        candidate = Candidate("chain", nodes[segment.start:segment.stop + 1], source, final,
                               merge.exact, 0)
        state.merges.append(merge)
        kept.append(replace_nodes(state, candidate, module, merge.replaces))
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


register_rule(LINEAR, chain, order=20, when=prices_segments)
