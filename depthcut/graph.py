"""The model as a torch.fx graph: the one tracer, node kinds, and the queries built on them.

`fold`, `pruning`, `sites` and `external` all read models through `trace`, so they agree on
what a node is: every leaf torch module is one call, and so are the stand-ins for removed sites
(`Zero`, `ChannelScale`), which `fold` must see as modules, not as the ops inside them.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch import nn

from depthcut.errors import DepthcutError
from depthcut.layers import STAND_IN_TYPES, Zero

ADDS = (operator.add, operator.iadd, torch.add)  # function calls that add two tensors
ADD_METHODS = ("add", "add_")  # the same as tensor methods
PASS_THROUGH = (nn.Identity, nn.Dropout)  # no-ops in eval mode
OP_KINDS = ("call_module", "call_function", "call_method")
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
LINEAR_FUNCTIONS = (torch.conv2d, torch.nn.functional.conv2d, torch.nn.functional.linear)
# Linear ops a forward may compute as functions (fold reads them as modules:
# depthcut.fold.functional); timm's fused norm-act modules call F.batch_norm.
LINEAR_CALLS = (*LINEAR_FUNCTIONS, torch.nn.functional.batch_norm)


class TraceError(DepthcutError, ValueError):
    """torch.fx cannot trace the model; `cause` is what the tracer raised.

    Callers say what they needed the trace for (`fold` as FoldError, `sites` as SiteError).
    """

    def __init__(self, model: nn.Module, cause: Exception) -> None:
        super().__init__(f"torch.fx cannot trace {type(model).__name__} "
                         f"({type(cause).__name__}: {cause})")
        self.cause = cause


class _Tracer(torch.fx.Tracer):
    """torch.fx's default leaf rule, plus the stand-ins and modules marked `depthcut_leaf`
    (models/hf.py: library attention plain torch.fx cannot trace) kept as one call each."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return (isinstance(module, STAND_IN_TYPES) or getattr(module, "depthcut_leaf", False)
                or super().is_leaf_module(module, qualified_name))


def trace_graph(model: nn.Module) -> torch.fx.Graph:
    """The traced graph of `model` (no GraphModule: cheaper when only reading), or TraceError."""
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure is one kind of error
        raise TraceError(model, error) from error
    for node in graph.nodes:
        node.type = None  # string annotations (PEP 563) would make the module unpicklable
    return graph


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """`model` as a GraphModule sharing its modules, or TraceError."""
    return torch.fx.GraphModule(model, trace_graph(model), type(model).__name__)


# --------------------------------------------------------------------------------------------
# Node kinds


def is_op(node: torch.fx.Node) -> bool:
    """A node that computes something (not an input, constant or the output)."""
    return node.op in OP_KINDS


def is_add(node: torch.fx.Node, methods: bool = True) -> bool:
    """An addition of tensors: `a + b`, `a += b`, `torch.add(a, b)`, and `a.add(b)` with
    `methods`."""
    return (node.op == "call_function" and node.target in ADDS) or (
        methods and node.op == "call_method" and node.target in ADD_METHODS)


_METADATA_ATTRIBUTES = frozenset({"ndim", "shape", "dtype", "device", "is_cuda"})
_METADATA_METHODS = frozenset({"dim", "size"})


def reads_metadata_only(node: torch.fx.Node) -> bool:
    """A value computed from tensors' ranks, shapes, dtypes or devices only, never their
    contents (`x.ndim == 4`, `x.shape[1]`): fixed for the shapes a model is traced at."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _METADATA_ATTRIBUTES
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    if node.op == "call_function" and getattr(node.target, "__module__", "") in (
            "_operator", "operator"):
        return all(reads_metadata_only(arg) for arg in node.all_input_nodes)
    return False


def data_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that read `node`'s values, not only its shape (a shape check is no branch)."""
    return [user for user in node.users if not reads_metadata_only(user)
            and not (user.op == "call_function" and user.target is torch._assert)]


def module_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    """The module a call_module node calls, else None."""
    return gm.get_submodule(str(node.target)) if node.op == "call_module" else None


def input_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The one tensor a module call reads, or None when it is not a one-argument module call."""
    if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
        return None
    arg = node.args[0]
    return arg if isinstance(arg, torch.fx.Node) else None


# --------------------------------------------------------------------------------------------
# Queries


def depends_on_input(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, bool]:
    """For each node, whether its value changes with the model input.

    A `Zero` output and a get_attr constant do not; anything else does when one of its inputs
    does. This is how an always-OFF site's branch is found to be a constant.
    """
    depends: dict[torch.fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            depends[node] = True
        elif isinstance(module_of(gm, node), Zero) or node.op == "get_attr":
            depends[node] = False
        else:
            depends[node] = any(depends[i] for i in node.all_input_nodes)
    return depends


def node_values(gm: torch.fx.GraphModule, example: torch.Tensor,
                nodes: list[torch.fx.Node]) -> dict[torch.fx.Node, torch.Tensor]:
    """The values `nodes` take when `gm` runs on `example` (one no-grad run)."""
    wanted = set(nodes)
    values: dict[torch.fx.Node, torch.Tensor] = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> object:
            result = super().run_node(node)
            if node in wanted:
                values[node] = result
            return result

    with torch.no_grad():
        Capture(gm).run(example)
    return values


def output_node(gm: torch.fx.GraphModule) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


def output_depends_on_input(gm: torch.fx.GraphModule) -> bool:
    """False is layer collapse: the model returns the same prediction for every input."""
    return depends_on_input(gm)[output_node(gm)]


def count_ops(gm: torch.fx.GraphModule) -> int:
    """Operator calls in the graph, not counting no-ops (Identity, eval Dropout)."""
    return sum(1 for n in gm.graph.nodes if is_op(n)
               and not isinstance(module_of(gm, n), PASS_THROUGH))


def longest_linear_path(gm: torch.fx.GraphModule) -> int:
    """Conv/linear ops on the longest input-to-output path."""
    depth: dict[torch.fx.Node, int] = {}
    for node in gm.graph.nodes:
        before = max((depth[i] for i in node.all_input_nodes), default=0)
        is_linear = (isinstance(module_of(gm, node), LINEAR_TYPES)
                     or node.target in LINEAR_FUNCTIONS)
        depth[node] = before + int(is_linear)
        if node.op == "output":
            return depth[node]
    return 0


def chain_neighbours(model: nn.Module, sites: list[str]) -> dict[str, list[str]]:
    """For each site, the sites one linear run away: reached from its output through ops that
    are linear once folded (conv, linear, BatchNorm, no-ops, stand-ins) with one reader each,
    and no branch. Linearizing both merges the run between them into a longer chain, which
    can fold into fewer MACs where either alone saves nothing (a MobileNetV2 block needs both
    of its sites linear to become one convolution). Symmetric; [] for an isolated site."""
    graph = trace_graph(model)
    wanted = set(sites)
    neighbours: dict[str, set[str]] = {site: set() for site in sites}
    linear = (*LINEAR_TYPES, nn.modules.batchnorm._BatchNorm, *PASS_THROUGH, *STAND_IN_TYPES)
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        current = node
        while len(data_users(current)) == 1:
            (user,) = data_users(current)
            if (user.op == "call_function" and user.target in LINEAR_CALLS
                    and all(arg.op == "get_attr" for arg in user.all_input_nodes[1:])):
                current = user  # a BatchNorm, conv or linear on parameters, as a function
                continue
            if user.op != "call_module":
                break
            if user.target in wanted:
                neighbours[node.target].add(user.target)
                neighbours[user.target].add(node.target)
                break
            if not isinstance(model.get_submodule(str(user.target)), linear):
                break
            current = user
    return {site: sorted(found) for site, found in neighbours.items()}
