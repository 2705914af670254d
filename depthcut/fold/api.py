"""The entry point: `fold` traces a model, runs the passes (`depthcut.fold.passes.PASSES`) over
one `FoldState` and returns the folded module with its `FoldReport`."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.fx
from torch import Tensor, nn

from depthcut.cost import count_macs
from depthcut.fold.exported import ExportError, export_graph
from depthcut.fold.parts import PartialFold, fold_parts
from depthcut.fold.passes import UntraceableError, run_passes, run_passes_on
from depthcut.fold.policy import POLICIES, CallablePolicy, FoldPolicy, Merge
from depthcut.fold.report import FoldReport, compare_outputs
from depthcut.fold.state import FoldError
from depthcut.graph import count_ops, longest_linear_path
from depthcut.layers import BiasMapConv2d
from depthcut.masks import clone_model, make_permanent


def _resolve(policy: str | FoldPolicy | Callable[[Merge], bool]) -> FoldPolicy:
    """A preset's name, a FoldPolicy, or a user's callable `(Merge) -> bool` (wrapped)."""
    if isinstance(policy, str) and policy in POLICIES:
        return POLICIES[policy]
    if isinstance(policy, FoldPolicy):
        return policy
    if callable(policy):
        if hasattr(policy, "chain_cost"):
            raise FoldError("a policy's `chain_cost` attribute is no longer read: subclass "
                            "depthcut.fold.FoldPolicy and override `segment_cost`")
        return CallablePolicy(policy)
    raise FoldError(f"unknown fold policy {policy!r}; choose one of {', '.join(POLICIES)}")


def _fold_whole(model: nn.Module, example: Tensor, policy: FoldPolicy) -> PartialFold:
    """Fold `model` as one graph: traced by torch.fx, else captured by torch.export
    (`depthcut.fold.exported`: transformers' encoders), else part by part
    (`depthcut.fold.parts`: data-dependent control flow)."""
    try:
        state = run_passes(model, example, policy)
    except UntraceableError as error:
        try:
            state = run_passes_on(export_graph(model, example), example, policy)
        except ExportError:
            return fold_parts(clone_model(model), example, policy, error)
    folded = state.gm
    return PartialFold(folded, state.merges, state.removed, [], state.ops_before,
                       count_ops(folded), state.depth_before, longest_linear_path(folded))


def _refold(model: nn.Module, example: Tensor, policy: FoldPolicy) -> nn.Module:
    """The same fold of `model` (a float64 copy)."""
    return _fold_whole(model, example, policy).model


def _in_float64(tensor: Tensor) -> Tensor:
    return tensor.double() if tensor.is_floating_point() else tensor


def _relative(output: Tensor, truth: Tensor) -> float:
    scale = float(truth.abs().max()) or 1.0
    return float((output.double() - truth).abs().max()) / scale


def _check_in_float64(report: FoldReport, unfolded: nn.Module, example: Tensor,
                      reference: Tensor, output: Tensor, policy: FoldPolicy) -> None:
    """Measure the folded and the unfolded float32 outputs against a float64 evaluation of the
    unfolded model, so that float32 rounding of a badly conditioned model does not read as a
    wrong fold; when that does not settle it (an exact fold further from the float64 truth than
    float32 rounding explains), fold a float64 copy and measure that too. Turns `unfolded`
    to float64 in place."""
    if not (reference.is_floating_point() and output.is_floating_point()):
        return
    try:
        unfolded64 = unfolded.double()  # in place: fold's own copy, not needed after this
        example64 = _in_float64(example)
        with torch.no_grad():
            truth = unfolded64(example64)
    except (RuntimeError, TypeError) as error:  # an op without a float64 kernel
        report.float64_note = f"no float64 evaluation ({type(error).__name__}: {error})"
        return
    report.float64_error = _relative(output, truth)
    report.float32_noise = _relative(reference, truth)
    if not report.exact or report.float64_error <= report.rounding_bound:
        return
    refolded = _refold(unfolded64, example64, policy)
    with torch.no_grad():
        report.float64_fold_error = _relative(refolded(example64), truth)


def fold(model: nn.Module, example_input: Tensor,
         policy: str | FoldPolicy | Callable[[Merge], bool] = "macs",
         data: Iterable | None = None) -> nn.Module:
    """A new eval-mode module computing the same function as `model` with fewer operators.

    `model` is not modified. `policy` decides merges that change the work: "macs" (default)
    folds each chain of linear ops into the exact partition of least multiply-adds, "all" into
    the fewest ops whatever the border, "latency" into the exact partition of least measured
    time on `example_input`'s batch size and device (`LatencyPolicy(timer=...)` times with
    another `depthcut.cost` timer); or pass your own `FoldPolicy` (override `segment_cost` to
    decide chains as a whole), or a plain callable `(Merge) -> bool`, which decides merge by
    merge and may set `merge.reason` when it declines. The returned module carries
    `fold_report` (a FoldReport); with `data` (batches of inputs or (input, target) pairs) the
    report also gives top-1 agreement and top-1 of both models.

    Exact merges may carry a bias map (the border correction of a bias seen by zero padding):
    it holds for `example_input`'s spatial size only, and the folded model raises
    `InputSizeError` on inputs of another size (fold at the size you will run).

    Exactness is measured against a float64 evaluation of the unfolded model too
    (`FoldReport.float64_error`, beside `float32_noise`, the unfolded float32 model's own
    deviation from it): in a badly conditioned model float32 rounding alone can move the output
    far, and an exact fold must not read as a wrong one. Where even that leaves doubt, a float64
    copy is folded and measured (`float64_fold_error`).

    A forward torch.fx cannot trace is captured whole by torch.export where it exports (shape
    checks and mask building as in Hugging Face transformers: `depthcut.fold.exported`; the
    result takes any batch size, other sizes as the example's). One with data-dependent
    control flow is folded part by part (`depthcut.fold.parts`): each traceable submodule on
    its own, the rest left as it is and named in `FoldReport.unfolded_parts`; the result is
    then a copy of the model with its folded parts in place (a GraphModule otherwise).
    FoldError if no part traces.
    """
    chosen = _resolve(policy)
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise FoldError("example_input must be a batched tensor, e.g. one batch of test images")
    unfolded = make_permanent(clone_model(model)).eval()  # pruning masks baked into weights
    with torch.no_grad():
        reference = unfolded(example_input)
    parts = _fold_whole(unfolded, example_input, chosen)
    folded = parts.model
    folded.eval()
    with torch.no_grad():
        output = folded(example_input)
    if output.shape != reference.shape:
        raise FoldError(f"folding changed the output shape {tuple(reference.shape)} -> "
                        f"{tuple(output.shape)}; please report this model")
    diff = float((output - reference).abs().max())
    scale = float(reference.abs().max()) or 1.0
    report = FoldReport(
        policy=chosen.name,
        ops_before=parts.ops_before,
        ops_after=parts.ops_after,
        macs_before=count_macs(unfolded, example_input),
        macs_after=count_macs(folded, example_input),
        params_before=sum(p.numel() for p in unfolded.parameters()),
        params_after=sum(p.numel() for p in folded.parameters()),
        depth_before=parts.depth_before,
        depth_after=parts.depth_after,
        max_abs_diff=diff,
        relative_error=diff / scale,
        merges=parts.merges,
        removed_branches=parts.removed,
        input_size=list(example_input.shape[1:]),
        bias_maps=[name for name, m in folded.named_modules() if isinstance(m, BiasMapConv2d)],
        unfolded_parts=parts.unfolded,
    )
    if data is not None:
        compared = compare_outputs(unfolded, folded, data)
        report.agreement = compared["agreement"]
        report.top1_unfolded = compared["top1_unfolded"]
        report.top1_folded = compared["top1_folded"]
    _check_in_float64(report, unfolded, example_input, reference, output, chosen)  # last:
    # it turns `unfolded` (fold's own copy) to float64 in place
    folded.fold_report = report
    return folded
