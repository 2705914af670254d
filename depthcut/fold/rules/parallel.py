"""Parallel merge: op A(x) + op B(x), or A(x) + x, becomes one op (RepVGG-style kernel
embedding: the smaller kernel, or the identity as a centre tap, is added into the larger)."""

from __future__ import annotations

import torch.fx
from torch import Tensor, nn

from depthcut.affine import add_parallel, identity_affine
from depthcut.fold.registry import LINEAR, register_rule
from depthcut.fold.rewrite import Candidate, propose
from depthcut.fold.state import FoldState, shape_of
from depthcut.graph import input_of, is_add


def parallel(state: FoldState, node: torch.fx.Node) -> bool:
    """op A(x) + op B(x), or A(x) + x: one op (RepVGG-style kernel embedding)."""
    if not is_add(node, methods=False) or len(node.args) != 2 or node.kwargs:
        return False
    left, right = node.args
    if not all(isinstance(arg, torch.fx.Node) for arg in (left, right)):
        return False
    for op_node, other in ((left, right), (right, left)):
        candidate = _parallel_candidate(state, node, op_node, other)
        if candidate is not None and propose(state, candidate):
            return True
    return False


def _parallel_candidate(state: FoldState, add: torch.fx.Node, op_node: torch.fx.Node,
                        other: torch.fx.Node) -> Candidate | None:
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
        parts, macs_b = [op_node, other], b.macs(shape_of(other))
        unmerged = _SumOf(state.module(op_node), state.module(other))
    else:
        return None
    merged = add_parallel(a, b)
    if merged is None:
        return None
    return Candidate("parallel", [*parts, add], source, merged, True,
                     a.macs(shape_of(op_node)) + macs_b, unmerged)


class _SumOf(nn.Module):
    """a(x) + b(x), or a(x) + x without b: the ops a parallel merge replaces, for timing."""

    def __init__(self, a: nn.Module, b: nn.Module | None) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) + (x if self.b is None else self.b(x))


register_rule(LINEAR, parallel, order=40)
