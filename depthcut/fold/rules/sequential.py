"""Sequential merge: op B reading only op A's output becomes one op computing B(A(x)).

BatchNorm into conv or linear, linear after linear, 1x1 with its neighbour, depthwise with
pointwise, spatial after spatial (kernel k1 + (k2 - 1) s1, stride s1 s2, padding p1 + p2 s1,
bias b2 + sum(W2) b1). For a policy that decides merge by merge; one that prices segments
decides the same merges as parts of a chain (`chain.py`).
"""

from __future__ import annotations

import torch.fx
from torch import nn

from depthcut.affine import compose_chain
from depthcut.fold.registry import LINEAR, merge_by_merge, register_rule
from depthcut.fold.rewrite import Candidate, propose
from depthcut.fold.state import FoldState, shape_of, spatial_size
from depthcut.graph import input_of


def sequential(state: FoldState, node: torch.fx.Node, diagonal_only: bool = False) -> bool:
    """op B reading only op A's output: one op computing B(A(x)). With `diagonal_only`, only
    when A or B is a per-channel scale (BatchNorm, ChannelScale)."""
    first = input_of(node)
    if first is None or len(first.users) != 1 or input_of(first) is None:
        return False
    a, b = state.affine(first, first.args[0]), state.affine(node, first)
    if a is None or b is None or (diagonal_only and not (a.is_diagonal or b.is_diagonal)):
        return False
    result = compose_chain([a, b], spatial_size(first.args[0]))
    if result is None:
        return False
    return propose(state, Candidate(
        "sequential", [first, node], first.args[0], *result,
        a.macs(shape_of(first)) + b.macs(shape_of(node)),
        nn.Sequential(state.module(first), state.module(node))))


register_rule(LINEAR, sequential, order=30, when=merge_by_merge)
