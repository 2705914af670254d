"""Into bias: op(x) + constant, with a constant uniform over batch and positions (what a dead
branch leaves, `remove_dead_branches`), becomes op(x) with the constant in its bias. It never
costs anything: it is always taken, and runs in both merge passes beside every other rule."""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor

from depthcut.fold.registry import LINEAR, PER_CHANNEL, register_rule
from depthcut.fold.rewrite import Candidate, propose
from depthcut.fold.state import FoldState, shape_of
from depthcut.graph import input_of, is_add


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
        per_channel = _per_channel(constant, a.kind if a else "", shape_of(op_node))
        if a is None or per_channel is None:
            continue
        a.bias = a.bias + per_channel.to(a.bias)
        return propose(state, Candidate("bias", [op_node, node], source, a, True,
                                        a.macs(shape_of(op_node)), always=True))
    return False


def _per_channel(constant: Tensor, kind: str, shape: torch.Size) -> Tensor | None:
    """The per-channel values of a constant that is uniform over batch and positions, or None."""
    if kind == "conv" and constant.dim() == 4 and constant.shape[1] == shape[1]:
        values = constant[:1, :, :1, :1]
        return values.flatten() if bool((constant == values).all()) else None
    if kind == "linear" and constant.dim() >= 1 and constant.shape[-1] == shape[-1]:
        values = constant.reshape(-1, constant.shape[-1])[:1]
        return values.flatten() if bool((constant == values).all()) else None
    return None


register_rule(PER_CHANNEL, into_bias, order=10)
register_rule(LINEAR, into_bias, order=10, free=True)
