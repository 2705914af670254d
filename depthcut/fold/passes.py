"""The passes a fold runs over one `FoldState`, in order (`PASSES`).

`drop_no_ops` and `remove_dead_branches` simplify the traced graph, `annotate_shapes` gives
every node its shape, `drop_shape_checks` removes asserts on tensor ranks and shapes (they
made every checked op a branch point), `modularize_linear_calls` (`depthcut.fold.functional`)
makes the linear ops a forward computes as functions (F.batch_norm in timm's fused norm-act
modules, F.conv2d, F.linear with parameter weights) module calls the rules read, then two
passes run the registered rules (`depthcut.fold.registry`; the rules themselves are in
`depthcut.fold.rules`): `merge_per_channel`, then `merge_linear_ops`.
A sweep tries, in graph order, each rule at each node and starts again from the first node after
every rewrite, until no rule applies. `clean_up` drops what the rewrites left unused.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx
from torch import Tensor, nn

from depthcut.fold.functional import modularize_linear_calls
from depthcut.fold.policy import FoldPolicy
from depthcut.fold.registry import LINEAR, PER_CHANNEL, RuleSpec, rules_for
from depthcut.fold.state import FoldError, FoldState
from depthcut.graph import (
    PASS_THROUGH,
    TraceError,
    count_ops,
    depends_on_input,
    input_of,
    is_op,
    longest_linear_path,
    node_values,
    output_node,
    reads_metadata_only,
    trace,
)
from depthcut.layers import Zero


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
    values = node_values(gm, state.example[:1], boundary)
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


def drop_shape_checks(state: FoldState) -> None:
    """Shape checks (`torch._assert(x.ndim == 4, ...)`, as in timm's norm layers) go, with the
    metadata reads only they used: a check reads its tensor, so it made every checked op a
    branch point that no chain could pass."""
    graph = state.gm.graph
    for node in list(graph.nodes):
        if (node.op == "call_function" and node.target is torch._assert and node.args
                and isinstance(node.args[0], torch.fx.Node)
                and reads_metadata_only(node.args[0]) and not node.users):
            graph.erase_node(node)
    unused = [n for n in graph.nodes if not n.users and reads_metadata_only(n)]
    while unused:
        node = unused.pop()
        inputs = node.all_input_nodes
        graph.erase_node(node)
        unused += [n for n in inputs if not n.users and reads_metadata_only(n)
                   and n not in unused]


def _sweep(state: FoldState, rules: list[RuleSpec]) -> None:
    """In graph order, the first rule that rewrites at a node; then from the start again."""
    while any(spec.rule(state, node) for node in list(state.gm.graph.nodes) for spec in rules):
        pass


def merge_per_channel(state: FoldState) -> None:
    """Constants into biases, per-channel scales (BatchNorm) into their neighbours first: those
    never cost anything, and the other merges' cost is then judged on the ops that remain."""
    _sweep(state, rules_for(PER_CHANNEL, state.policy))


def merge_linear_ops(state: FoldState) -> None:
    """Constants into biases, chains (or sequential merges, for a policy without a chain cost)
    and parallel merges, as the policy allows. A policy that decides merge by merge gets one
    sweep of every rule. A policy that prices segments gets one sweep per rule (with the free
    rules beside it), in order, and again until nothing changes: every chain is decided before
    any parallel merge, so a residual block whose branch is linear becomes one op, then one with
    its shortcut, and a chain that a parallel merge makes longer is decided again."""
    rules = rules_for(LINEAR, state.policy)
    if not state.policy.prices_segments:
        _sweep(state, rules)
        return
    while True:
        made = state.made
        for costly in (spec for spec in rules if not spec.free):
            _sweep(state, [spec for spec in rules if spec.free or spec is costly])
        if state.made == made:
            return


def clean_up(state: FoldState) -> None:
    state.gm.delete_all_unused_submodules()
    state.gm.recompile()


PASSES: tuple[Callable[[FoldState], None], ...] = (
    drop_no_ops, remove_dead_branches, annotate_shapes, drop_shape_checks,
    modularize_linear_calls,
    merge_per_channel, merge_linear_ops, clean_up,
)


class UntraceableError(FoldError):
    """torch.fx cannot trace the model's forward (`cause`: what the tracer raised)."""

    def __init__(self, message: str, cause: Exception) -> None:
        super().__init__(message)
        self.cause = cause


def run_passes(model: nn.Module, example: Tensor, policy: FoldPolicy) -> FoldState:
    """Trace a copy of `model` (eval mode) and run every pass over it; UntraceableError if
    torch.fx cannot trace it."""
    try:
        gm = trace(copy.deepcopy(model))
    except TraceError as error:
        raise UntraceableError(
            f"{error}. Folding needs a traceable forward: move data-dependent Python control "
            "flow out of forward(), or fold the traceable submodules one by one.",
            error.cause) from error.cause
    return run_passes_on(gm, example, policy)


def run_passes_on(gm: torch.fx.GraphModule, example: Tensor, policy: FoldPolicy) -> FoldState:
    """Run every pass over a captured graph (`trace`, or `depthcut.fold.exported`), in place."""
    state = FoldState(gm, example, policy)
    state.ops_before, state.depth_before = count_ops(gm), longest_linear_path(gm)
    for fold_pass in PASSES:
        fold_pass(state)
    return state
