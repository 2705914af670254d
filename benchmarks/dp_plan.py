"""How good is the latency table's estimate? Plans by `--choose dp` at several budgets, each
checked against the whole folded model measured on the same backend.

depthcut's MobileNetV2 (width 0.5 by default, random weights, BatchNorm statistics perturbed,
32x32 inputs). The table is built (or read from --table) on --backend at --batch; entropies
come from 64 random inputs (random weights: the point is the latency, not the choice). For
each budget the DP's plan is folded whole (policy macs) and timed round-robin with the
BN-folded dense model; medians over rounds. "predicted" is the table's estimate of the plan
over its estimate of the dense model; "measured" the same ratio of whole-model timings.

    .venv/bin/python benchmarks/dp_plan.py                        # eager, batch 128
    .venv/bin/python benchmarks/dp_plan.py --backend onnxruntime --batch 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from depthcut.cost import TIMERS, get_timer
from depthcut.cost.latency_table import (
    FOLD_BATCH,
    LatencyTable,
    TableContext,
    build_segment_table,
)
from depthcut.entropy import count_states, layer_entropies
from depthcut.fold import fold
from depthcut.models import build_model
from depthcut.scorers.dp import plan_sites
from depthcut.sites import find_sites, linearize
from depthcut.untrained import randomize_batchnorm


def perturbed_model(name: str, width: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, width=width, num_classes=10)
    return randomize_batchnorm(model, torch.Generator().manual_seed(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2")
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--backend", default="eager", choices=tuple(TIMERS))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--span", type=int, default=8)
    parser.add_argument("--table", default=None, help="the table's JSON file (default cache)")
    parser.add_argument("--budgets", default="0.9,0.8,0.7,0.6,0.5,0.4")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=7, help="timings per table entry")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = perturbed_model(args.model, args.width)
    sites = find_sites(model)
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(64, 3, 32, 32, generator=generator)
    entropies = layer_entropies(count_states(model, [(inputs, None)], sites))
    sample = inputs[:1]
    context = TableContext(args.backend, args.batch)
    table = LatencyTable(args.table)
    start = time.perf_counter()
    built = build_segment_table(model, sample, context, table, sites, args.span,
                                repeats=args.repeats, warmup=2)
    print(f"{args.model} x{args.width:g}, {len(sites)} sites, {context.key()}: table of "
          f"{len(built.seconds)} segments, {built.misses} timed, {built.hits} read "
          f"({table.path}), {time.perf_counter() - start:.0f} s")
    dense_estimate = built.plan_seconds(list(range(len(sites) + 2)))
    importance = [entropies[s] for s in sites]
    plans = {}
    for budget in (float(b) for b in args.budgets.split(",")):
        started = time.perf_counter()
        plan = plan_sites(importance, built.seconds, budget * dense_estimate, built.overhead)
        plans[budget] = (plan, time.perf_counter() - started)

    big = sample.expand(args.batch, -1, -1, -1).contiguous()
    small = sample.expand(FOLD_BATCH, -1, -1, -1).contiguous()
    timer = get_timer(args.backend)
    variants = {"dense": fold(model, small, "macs")}
    for budget, (plan, _) in plans.items():
        linear = [sites[k - 1] for k in plan.linearized(len(sites))]
        variants[budget] = fold(linearize(perturbed_model(args.model, args.width), linear),
                                small, "macs")
    calls = {name: timer.prepare(folded, big) for name, folded in variants.items()}
    times: dict = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            times[name].append(timer.measure(call, big.device, repeats=3, warmup=1))
    measured = {name: statistics.median(values) for name, values in times.items()}
    print(f"dense (BN folded): estimate {dense_estimate * 1e3:.2f} ms, measured "
          f"{measured['dense'] * 1e3:.2f} ms (batch {args.batch})\n")
    print("| budget | sites kept / removed | entropy removed (bits) | predicted | measured | "
          "plan time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for budget, (plan, seconds) in plans.items():
        removed = len(plan.linearized(len(sites)))
        flag = "" if plan.feasible else " (over budget: fastest plan)"
        print(f"| {budget:.2f} | {len(sites) - removed} / {removed} | {plan.removed:.2f} | "
              f"{plan.seconds / dense_estimate:.3f}{flag} | "
              f"{measured[budget] / measured['dense']:.3f} | {seconds * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
