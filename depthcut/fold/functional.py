"""Linear ops a forward computes as functions, read as modules: the pass
`modularize_linear_calls`.

timm's fused norm-act modules (`BatchNormAct2d` and its kin) and many users' own layers call
`F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, ...)` inside
their forward, and some call `F.conv2d(x, self.weight, ...)` or `F.linear(x, self.weight, ...)`
(timm's `StdConv2d` computes its weight from its parameter first). torch.fx traces into those
modules and sees function calls, which the rules (they read module calls as `Affine`s) skip:
timm's mobilenetv2_100 folded nothing. This pass puts an eval-mode `nn.BatchNorm1d/2d/3d`,
`nn.Conv2d` or `nn.Linear` holding the call's tensors in place of each such call whose weights
do not depend on the model input, so every rule reads it like the module it computes.

Why in the fold's traced copy, and not by rewriting the user's model into modules before
tracing: the user's model keeps its classes, parameter names and state_dict (a fused module
split into `bn` + `act` children would rename `bn1.weight` to `bn1.bn.weight`); its activation
child (`bn1.act`) is a module already, so `find_sites` finds it and `linearize` replaces it by
name. Only the fold needs the BatchNorm as an op, and it works on its own copy. The report
names a converted call after the module whose forward made it, e.g. `bn1:batch_norm`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from depthcut.fold.state import FoldState
from depthcut.graph import depends_on_input, node_values

# Each function's parameters in order, with their defaults (None: required).
_SIGNATURES: dict[Callable, tuple[tuple[str, object], ...]] = {
    F.batch_norm: (("input", None), ("running_mean", None), ("running_var", None),
                   ("weight", None), ("bias", None), ("training", False), ("momentum", 0.1),
                   ("eps", 1e-5)),
    torch.conv2d: (("input", None), ("weight", None), ("bias", None), ("stride", 1),
                   ("padding", 0), ("dilation", 1), ("groups", 1)),
    F.linear: (("input", None), ("weight", None), ("bias", None)),
}
# The arguments that are tensors the op holds (they must not depend on the model input).
_TENSORS = ("running_mean", "running_var", "weight", "bias")
_BATCH_NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _bind(node: torch.fx.Node) -> dict[str, object] | None:
    """The call's arguments by name (defaults filled), or None if they do not fit."""
    signature = _SIGNATURES.get(node.target) if node.op == "call_function" else None
    if signature is None:
        return None
    names = [name for name, _ in signature]
    if len(node.args) > len(names) or set(node.kwargs) - set(names):
        return None
    bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    for name, default in signature:
        bound.setdefault(name, default)
    return bound


def _convertible(node: torch.fx.Node, bound: dict[str, object],
                 depends: dict[torch.fx.Node, bool]) -> bool:
    """An eval-mode call on an input-dependent tensor, whose held tensors are constants and whose
    other arguments are Python values known at trace time."""
    source = bound["input"]
    if not (isinstance(source, torch.fx.Node) and depends[source]):
        return False
    for name, value in bound.items():
        if name == "input":
            continue
        if isinstance(value, torch.fx.Node) and (name not in _TENSORS or depends[value]):
            return False
    if node.target is F.batch_norm:
        return (bound["training"] is False and bound["running_mean"] is not None
                and bound["running_var"] is not None)
    return bound["weight"] is not None


def _module_for(node: torch.fx.Node, bound: dict[str, object],
                values: dict[str, Tensor | None]) -> nn.Module | None:
    """The module computing the call (a copy of its tensors), or None for a rank it lacks."""
    weight, bias = values["weight"], values["bias"]
    if node.target is F.batch_norm:
        mean, var = values["running_mean"], values["running_var"]
        kind = _BATCH_NORMS.get(len(bound["input"].meta["tensor_meta"].shape))
        if kind is None:
            return None
        module = kind(mean.numel(), eps=float(bound["eps"]), affine=True)
        module = module.to(device=mean.device, dtype=mean.dtype)
        with torch.no_grad():
            module.running_mean.copy_(mean)
            module.running_var.copy_(var)
            module.weight.copy_(torch.ones_like(mean) if weight is None else weight)
            module.bias.copy_(torch.zeros_like(mean) if bias is None else bias)
        return module.eval()
    if node.target is torch.conv2d:
        if weight.dim() != 4:
            return None
        groups = int(bound["groups"])
        module = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                           bound["stride"], bound["padding"], bound["dilation"], groups,
                           bias=bias is not None)
    else:
        if weight.dim() != 2:
            return None
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    module = module.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module.eval()


def _owner(node: torch.fx.Node) -> str:
    """The qualified name of the module whose forward made the call ("" for the model)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()), ("", None))[0] if stack else ""


def _erase_unused_constants(graph: torch.fx.Graph, roots: list[torch.fx.Node],
                            depends: dict[torch.fx.Node, bool]) -> None:
    """Erase what computed the converted calls' tensors (parameter reads, a standardized
    weight) once nothing reads it; input-dependent nodes are never touched."""
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node.users or depends.get(node, True) or node.op not in (
                "get_attr", "call_function", "call_method"):
            continue
        inputs = node.all_input_nodes
        graph.erase_node(node)
        stack.extend(inputs)


def modularize_linear_calls(state: FoldState) -> None:
    """Every eval-mode F.batch_norm, F.conv2d and F.linear on the input-dependent path whose
    tensors are constants (parameters and buffers, or computed from them only) becomes a call
    of an eval-mode module holding those tensors (see the module docstring)."""
    gm = state.gm
    depends = depends_on_input(gm)
    calls = []
    for node in gm.graph.nodes:
        bound = _bind(node)
        if bound is not None and _convertible(node, bound, depends):
            calls.append((node, bound))
    if not calls:
        return
    held = [value for _, bound in calls for name in _TENSORS
            if isinstance(value := bound.get(name), torch.fx.Node)]
    values = node_values(gm, state.example[:1], held)
    used: set[str] = set()
    for index, (node, bound) in enumerate(calls):
        tensors = {name: (values[value] if isinstance(value, torch.fx.Node) else None)
                   for name in _TENSORS if name in bound
                   for value in (bound[name],)}
        tensors.setdefault("running_mean", None)
        tensors.setdefault("running_var", None)
        module = _module_for(node, bound, tensors)
        if module is None:
            continue
        name = f"functional_{index}"
        gm.add_submodule(name, module)
        owner, kind = _owner(node), getattr(node.target, "__name__", "call")
        label = f"{owner}:{kind}" if owner else kind
        while label in used:
            label += "'"
        used.add(label)
        state.origin[name] = [label]
        source = _bind(node)["input"]  # read now: an earlier replacement may have rewired it
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_module(name, (source,))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        roots = [arg for arg in node.all_input_nodes if arg is not source]
        gm.graph.erase_node(node)
        _erase_unused_constants(gm.graph, roots, depends)
    gm.graph.lint()
    gm.recompile()
