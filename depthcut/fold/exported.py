"""A forward torch.fx cannot trace, captured whole with torch.export: one graph to fold.

Hugging Face transformers 5.x models compare traced shapes while building their attention
masks (`batch_size != position_ids.shape[0]`), pass `**kwargs` through every layer and unpack
tuples, so neither the model nor its encoder layers trace with torch.fx; only small pieces do
(an intermediate dense + GELU, never the MLP's two linears together). torch.export runs the
forward on fake tensors instead of symbols: Python control flow on shapes is resolved at
capture time, every layer is inlined into one ATen graph, and each node keeps the module path
that made it (`nn_module_stack`). It is what torch's own deployment paths (AOTInductor,
ExecuTorch, ONNX's dynamo exporter) build on, so it follows library updates that break
symbolic tracing.

The exported graph (`ExportedProgram.module()`: parameters as `get_attr` reads) is made to read
like a traced forward before the passes run: `aten.linear`, `aten.conv2d` and the eval-mode
`aten.batch_norm` become `F.linear`, `F.conv2d` and `F.batch_norm` calls, which
`fold.functional` turns into modules the rules read; `aten.add.Tensor` becomes `+`; eval-mode
dropout and metadata asserts go. Every other ATen op stays as it is, an op the rules do not
merge through. The batch dimension is captured dynamic, so the folded model takes any batch
size; other sizes are those of the example (fold at the size you will run). Data-dependent
control flow (`if x.sum() > 0`) does not export: such a model is folded part by part.
"""

from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from depthcut.fold.state import FoldError

aten = torch.ops.aten


class ExportError(FoldError):
    """torch.export cannot capture the model at the example (`cause`: what it raised)."""

    def __init__(self, model: nn.Module, cause: Exception) -> None:
        text = f"{type(cause).__name__}: {cause}".splitlines()[0][:300]
        super().__init__(f"torch.export cannot capture {type(model).__name__} ({text})")
        self.cause = cause


def _is_false(value: object) -> bool:
    return value is False or value == 0


def _as_tuple(value: object) -> object:
    return tuple(value) if isinstance(value, list) else value


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, target: object, args: tuple) -> None:
    """Put a call of `target` with `args` in place of `node`, keeping its metadata."""
    with graph.inserting_before(node):
        new = graph.call_function(target, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _batch_norm_call(source: object, weight: object, bias: object, mean: object, var: object,
                     momentum: object, eps: object) -> tuple | None:
    """F.batch_norm's eval-mode arguments, or None when the statistics are not tensors."""
    if not (isinstance(mean, torch.fx.Node) and isinstance(var, torch.fx.Node)):
        return None
    return (source, mean, var, weight, bias, False, momentum, eps)


def _translate(graph: torch.fx.Graph) -> None:
    """ATen calls the rules can read become the torch functions the passes know (module
    docstring); the rest is left as it is."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        target, args = node.target, node.args
        if node.kwargs:
            continue
        if target is aten.linear.default:
            _replace(graph, node, F.linear, (*args, None)[:3])
        elif target is aten.conv2d.default:
            defaults = (None, None, None, 1, 0, 1, 1)  # bias, stride, padding, dilation, groups
            full = (*args, *defaults[len(args):])
            _replace(graph, node, torch.conv2d, tuple(_as_tuple(a) for a in full))
        elif target is aten.batch_norm.default and len(args) >= 8 and _is_false(args[5]):
            bound = _batch_norm_call(*args[:5], *args[6:8])
            if bound is not None:
                _replace(graph, node, F.batch_norm, bound)
        elif target is aten._native_batch_norm_legit_no_training.default:
            bound = _batch_norm_call(*args[:7]) if len(args) == 7 else None
            getters = list(node.users)
            if bound is not None and all(u.target is operator.getitem and u.args[1] == 0
                                         for u in getters):
                for getter in getters:
                    _replace(graph, getter, F.batch_norm, bound)
                graph.erase_node(node)
        elif (target is aten.add.Tensor and len(args) == 2
              and all(isinstance(a, torch.fx.Node) for a in args)):
            _replace(graph, node, operator.add, args)
        elif target in (aten.dropout.default, aten.feature_dropout.default) and (
                len(args) == 3 and _is_false(args[2])):
            node.replace_all_uses_with(args[0])
            graph.erase_node(node)
        elif target is aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)
    graph.lint()


def export_graph(model: nn.Module, example: Tensor) -> torch.fx.GraphModule:
    """A copy of `model` (eval mode) captured by torch.export at `example`, dynamic in the
    batch, its ATen graph made readable by the fold passes (module docstring); ExportError if
    it does not export. A copy: the graph module holds the parameters it reads, and the
    caller's model may change after (fold turns its own copy to float64)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(copy.deepcopy(model), (example,), strict=False,
                                             dynamic_shapes=({0: torch.export.Dim.AUTO},))
        gm = program.module()
    except Exception as error:  # noqa: BLE001 - any capture failure is one kind of error
        raise ExportError(model, error) from error
    _translate(gm.graph)
    for node in list(gm.graph.nodes):
        node.type = None
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            gm.graph.erase_node(node)  # the input-shape guard: a local class, not picklable
    # A plain GraphModule holding what the graph reads: the exported module refuses
    # `.eval()`, which every caller of a folded model may call.
    return torch.fx.GraphModule(gm, gm.graph, type(model).__name__)
