"""The one rewrite every merge goes through: a rule's `Candidate`, proposed with `propose`.

A rule builds a `Candidate` (the nodes it replaces, the node they read, the merged `Affine`)
and calls `propose`: the merge is recorded as a `Merge`, the policy decides with both sides at
hand to run (`MergeSides`), and a taken merge replaces the nodes by one new module
(`replace_nodes`). A merge declined once is never proposed again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx
from torch import Tensor, nn

from depthcut.affine import Affine
from depthcut.fold.policy import Merge, MergeSides
from depthcut.fold.state import FoldState, shape_of


@dataclass
class Candidate:
    """A rewrite a rule found: one op computing `merged` on `source`, in place of `nodes`."""

    rule: str
    nodes: list[torch.fx.Node]
    source: torch.fx.Node
    merged: Affine
    exact: bool
    macs_before: int  # per sample
    unmerged: nn.Module | None = None  # the replaced ops as one module, for timing
    always: bool = False  # taken without asking the policy: it never costs anything


def fits(candidate: Candidate) -> bool:
    """Whether the merged op gives the replaced ops' output size from the source's size."""
    merged, out_shape = candidate.merged, shape_of(candidate.nodes[-1])
    if merged.kind != "conv":
        return True
    h, w = shape_of(candidate.source)[2:]
    expect = tuple((size + 2 * p - k) // s + 1 for size, p, k, s in
                   zip((h, w), merged.padding, merged.kernel, merged.stride, strict=True))
    return expect == tuple(out_shape[2:])


def input_maker(state: FoldState, source: torch.fx.Node, like: Tensor) -> Callable[[], Tensor]:
    """Random inputs of the shape `source` has, at the fold's batch size, dtype and device."""
    shape, batch = shape_of(source), state.example.shape[0]
    return lambda: torch.randn(batch, *shape[1:], dtype=like.dtype, device=like.device)


def _decide(state: FoldState, merge: Merge, candidate: Candidate, module: nn.Module,
            like: Tensor) -> None:
    """Ask the policy, with both sides at hand for it to run."""
    unmerged = candidate.unmerged
    sides = MergeSides(lambda: unmerged, lambda: module,
                       input_maker(state, candidate.source, like))
    merge.taken = bool(state.policy.decide(merge, sides))
    if not merge.taken and not merge.reason:
        merge.reason = f"declined by policy {state.policy.name}"


def replace_nodes(state: FoldState, candidate: Candidate, module: nn.Module,
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
    # The merged op gives the output of `last` (same shape: `fits`), and nothing else changes
    # shape: no need to propagate shapes through the whole model again.
    new.meta["tensor_meta"] = last.meta["tensor_meta"]
    for node in reversed(candidate.nodes):
        if not node.users:
            graph.erase_node(node)
    graph.lint()
    return new


def propose(state: FoldState, candidate: Candidate) -> bool:
    """Record the merge, let the policy decide, and rewrite the graph if it is taken."""
    nodes = candidate.nodes
    key = (candidate.rule, *(str(n.target) if n.op == "call_module" else n.name for n in nodes))
    if key in state.declined or not fits(candidate):
        return False
    batch = state.example.shape[0]
    replaces = [name for n in nodes if n.op == "call_module" for name in state.names(n)]
    macs_after = candidate.merged.macs(shape_of(nodes[-1]))
    merge = Merge(candidate.rule, replaces, candidate.exact, candidate.macs_before * batch,
                  macs_after * batch, True)
    like = state.like(candidate.source)
    module = candidate.merged.to_module(like, state.folded_at)
    if not candidate.always:
        _decide(state, merge, candidate, module, like)
    state.merges.append(merge)
    if not merge.taken:
        state.declined.add(key)
        return False
    replace_nodes(state, candidate, module, replaces)
    return True
