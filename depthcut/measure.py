"""Fold a stage's model and measure both versions: the one measurement runs, compare and report
share, so the folded answer and the report's cost table are taken the same way."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from depthcut.cost import DEFAULT_TIMER, Timed, Timer, get_timer, medians, round_robin
from depthcut.fold import FoldPolicy, fold

ROUNDS = 5  # round-robin rounds the latencies are medians over (each of repeats / ROUNDS calls)


def measure_stage(model: nn.Module, example: Tensor, *, policy: str | FoldPolicy = "macs",
                  data: Iterable | None = None, latency: Mapping[int, int] | None = None,
                  timer: str | Timer = DEFAULT_TIMER, baseline: nn.Module | None = None
                  ) -> tuple[nn.Module, dict]:
    """Fold `model` (on CPU, eval mode) on `example`, a batch at the run's real input shape,
    and measure unfolded and folded: MACs per image, parameters, operators, conv/linear depth,
    exactness, top-1 on `data` when given, and the median latency in ms at each batch size of
    `latency` (batch size -> repeats; default batch 1, 30 repeats; {} times nothing) on slices
    of `example`, timed by `timer` (a `depthcut.cost` timer or its name; the measurements name
    it and the thread count), round-robin over the models in `ROUNDS` rounds. With
    `baseline` (the dense model), it is folded the same way and timed beside them
    (`latency_ms_batchN_dense_folded`, `macs_dense_folded`): the BN-folded dense model on the
    same backend, what a speed-up is relative to (a preset's name folds it under that preset; a
    policy object, e.g. a dp plan's per-segment forms, under "macs").
    Returns (folded model, measurements)."""
    model = model.cpu().eval()
    example = example.cpu()
    folded = fold(model, example, policy, data=data)
    report = folded.fold_report
    batch = len(example)
    measured = {
        "policy": report.policy,
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
    timed = {"unfolded": model, "folded": folded}
    if baseline is not None:
        dense_policy = policy if isinstance(policy, str) else "macs"
        timed["dense_folded"] = fold(baseline.cpu().eval(), example, dense_policy)
        measured["macs_dense_folded"] = timed["dense_folded"].fold_report.macs_after // batch
    timing = get_timer(timer)
    sizes = {1: 30} if latency is None else latency
    if sizes:
        measured.update(latency_backend=timing.name, latency_threads=torch.get_num_threads(),
                        latency_timer=timing.describe())
    calls = {(size, name): Timed(timing, timing.prepare(module, example[:size]), example.device,
                                 max(1, repeats // ROUNDS))
             for size, repeats in sizes.items() for name, module in timed.items()}
    for (size, name), seconds in medians(round_robin(calls, ROUNDS)).items():
        measured[f"latency_ms_batch{size}_{name}"] = 1e3 * seconds
    measured["merges_taken"] = sum(m.taken for m in report.merges)
    return folded, measured
