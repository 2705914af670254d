"""Fold a stage's model and measure both versions: the one measurement runs, compare and report
share, so the folded answer and the report's cost table are taken the same way."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import Tensor, nn

from depthcut.cost import DEFAULT_TIMER, Timer, get_timer
from depthcut.fold import fold


def measure_stage(model: nn.Module, example: Tensor, *, policy: str = "macs",
                  data: Iterable | None = None, latency: Mapping[int, int] | None = None,
                  timer: str | Timer = DEFAULT_TIMER) -> tuple[nn.Module, dict]:
    """Fold `model` (on CPU, eval mode) on `example`, a batch at the run's real input shape,
    and measure unfolded and folded: MACs per image, parameters, operators, conv/linear depth,
    exactness, top-1 on `data` when given, and the median latency in ms at each batch size of
    `latency` (batch size -> repeats; default batch 1, 30 repeats; {} times nothing) on slices
    of `example`, timed by `timer` (a `depthcut.cost` timer or its name).
    Returns (folded model, measurements)."""
    model = model.cpu().eval()
    example = example.cpu()
    folded = fold(model, example, policy, data=data)
    report = folded.fold_report
    batch = len(example)
    measured = {
        "policy": policy,
        "top1_unfolded": report.top1_unfolded,
        "top1_folded": report.top1_folded,
        "agreement": report.agreement,
        "exact": report.exact,
        "max_abs_diff": report.max_abs_diff,
        "relative_error": report.relative_error,
        "macs_unfolded": report.macs_before // batch,
        "macs_folded": report.macs_after // batch,
        "params_unfolded": report.params_before,
        "params_folded": report.params_after,
        "ops_unfolded": report.ops_before,
        "ops_folded": report.ops_after,
        "depth_unfolded": report.depth_before,
        "depth_folded": report.depth_after,
        # Ops with a bias map hold for this per-sample input shape only (the folded model
        # refuses another size).
        "folded_at": report.input_size,
        "bias_maps": len(report.bias_maps),
    }
    timing = get_timer(timer)
    for size, repeats in ({1: 30} if latency is None else latency).items():
        x = example[:size]
        for name, module in (("unfolded", model), ("folded", folded)):
            measured[f"latency_ms_batch{size}_{name}"] = 1e3 * timing.seconds(
                module, x, repeats=repeats)
    measured["merges_taken"] = sum(m.taken for m in report.merges)
    return folded, measured
