"""Folding a model whose forward torch.fx cannot trace, part by part.

A forward with data-dependent control flow (`if x.sum() > 0:`, timm's VGG pre-logits and
MobileViT checking input sizes) cannot be one graph. Its submodules often can: each child that
traces is folded on its own, at the input it receives when the model runs on the example;
a child that does not trace is opened in turn, down to the leaves. What could not be captured
(the untraceable modules themselves, and the children called other than once with one tensor)
stays as it is and is named in the report (`FoldReport.unfolded_parts`); merges across a part's
border (a conv in one child with the BatchNorm in the next, glued by the untraceable parent's
own code) are not made. Only a model none of whose parts traces is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from depthcut.fold.passes import UntraceableError, run_passes
from depthcut.fold.policy import FoldPolicy, Merge
from depthcut.fold.state import FoldError
from depthcut.graph import TraceError, count_ops, longest_linear_path, trace_graph


@dataclass
class PartialFold:
    """What folding the parts gave: the model with its folded parts in place and the record."""

    model: nn.Module
    merges: list[Merge] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unfolded: list[str] = field(default_factory=list)  # "name (why)"
    ops_before: int = 0  # over the folded parts
    ops_after: int = 0
    depth_before: int = 0  # the deepest part
    depth_after: int = 0
    traced: int = 0  # parts traced and folded (whether or not they merged anything)


def _calls(model: nn.Module, example: Tensor) -> dict[nn.Module, list[tuple[tuple, dict]]]:
    """The arguments each submodule is called with when `model` runs on `example`."""
    calls: dict[nn.Module, list[tuple[tuple, dict]]] = {}

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.setdefault(module, []).append((args, kwargs))

    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in model.modules()]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _one_tensor_input(calls: list[tuple[tuple, dict]]) -> Tensor | str:
    """The one tensor a part is called with, or why it cannot be folded on its own."""
    if len(calls) != 1:
        return f"called {len(calls)} times"
    args, kwargs = calls[0]
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor) or args[0].dim() < 2:
        return "not called with one batched tensor"
    return args[0]


def _short(error: Exception) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= 120 else text[:117] + "..."


def _label(name: str, model: nn.Module) -> str:
    return name or f"the model ({type(model).__name__})"


def fold_parts(unfolded: nn.Module, example: Tensor, policy: FoldPolicy,
               cause: UntraceableError) -> PartialFold:
    """Fold each traceable part of `unfolded` (fold's own copy: parts are replaced in it) at
    the input it gets from `example`. FoldError (`cause`) if no part could be traced (only
    leaves, each one op: nothing to fold)."""
    calls = _calls(unfolded, example)
    result = PartialFold(unfolded, unfolded=[f"{_label('', unfolded)} (cannot trace: "
                                             f"{_short(cause.cause)})"])
    stack = [(f"{name}", child) for name, child in reversed(list(unfolded.named_children()))]
    while stack:
        name, module = stack.pop()
        if not list(module.children()) or module not in calls:  # a leaf alone: one op
            continue
        try:
            trace_graph(module)
        except TraceError as error:
            result.unfolded.append(f"{name} (cannot trace: {_short(error.cause)})")
            stack += [(f"{name}.{child_name}", child) for child_name, child
                      in reversed(list(module.named_children()))]
            continue
        source = _one_tensor_input(calls[module])
        if isinstance(source, str):
            result.unfolded.append(f"{name} ({source})")
            continue
        _fold_part(result, name, module, source, policy)
    if not result.traced:
        raise cause
    return result


def _fold_part(result: PartialFold, name: str, module: nn.Module, source: Tensor,
               policy: FoldPolicy) -> None:
    """Fold one traceable part and put it in place when it merged anything."""
    try:
        state = run_passes(module, source, policy)
    except FoldError as error:  # e.g. layer collapse inside the part: leave it as it is
        result.unfolded.append(f"{name} ({_short(error)})")
        return
    result.traced += 1
    folded = state.gm
    taken = [merge for merge in state.merges if merge.taken]
    result.ops_before += state.ops_before
    result.depth_before = max(result.depth_before, state.depth_before)
    if not taken and not state.removed:
        result.ops_after += state.ops_before
        result.depth_after = max(result.depth_after, state.depth_before)
        return
    for merge in state.merges:
        merge.replaces = [f"{name}.{original}" for original in merge.replaces]
    result.merges += state.merges
    result.removed += [f"{name}.{site}" for site in state.removed]
    result.ops_after += count_ops(folded)
    result.depth_after = max(result.depth_after, longest_linear_path(folded))
    parent_name, _, attr = name.rpartition(".")
    parent = result.model.get_submodule(parent_name) if parent_name else result.model
    setattr(parent, attr, folded)
