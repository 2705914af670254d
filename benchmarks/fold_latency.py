"""Latency and multiply-adds of a folded ResNet-18 against the unfolded one, side by side.

Full-width CIFAR ResNet-18 (17 sites), 8 sites linearized, folded under each policy (or
another model of depthcut.models with --model, e.g. MobileNetV2 with every site linear). Every
variant is timed in the same run, round-robin, and the medians are compared (the machine is
noisy; ratios, not absolute times, are the result). `bn-only` folds the model with no site
linearized: only the BatchNorms merge, which any deployment does anyway, so it is the fair
baseline for what depth reduction itself buys.

    .venv/bin/python benchmarks/fold_latency.py                  # the default 8 sites below
    .venv/bin/python benchmarks/fold_latency.py --from-run runs/main   # sites of a run's answer
    .venv/bin/python benchmarks/fold_latency.py --per-op         # where the batch-1 time goes
    .venv/bin/python benchmarks/fold_latency.py --model mobilenetv2 --all-sites
                                         # every site linear: chain folding, bias maps
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from depthcut.cost import count_macs
from depthcut.fold import fold
from depthcut.graph import longest_linear_path, trace
from depthcut.models import build_model
from depthcut.sites import find_sites, linearize

# The 8 sites EASIER chose, in order, in the README's main run (ResNet-18 x0.25 trained on
# CIFAR-10 (JPEG)); a fixed list so the benchmark needs no trained model.
DEFAULT_SITES = [
    "layer1.0.act2", "layer1.1.act2", "act", "layer1.1.act1",
    "layer2.1.act1", "layer4.0.act2", "layer4.1.act2", "layer2.0.act1",
]


def sites_from_run(run_dir: Path) -> list[str]:
    folded = run_dir / "folded_answer.json"
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    stage = json.loads(folded.read_text())["stage"] if folded.exists() else len(records) - 1
    return records[stage]["linearized"]


def timed(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(x)
        return time.perf_counter() - start


def per_op_times(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    """Median time of each operator call at this input, grouped by kind (e.g. conv 3x3 64->64)."""
    gm = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    groups: dict[str, list[float]] = defaultdict(list)

    class Timer(torch.fx.Interpreter):
        def run_node(self, node):
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            fn = lambda: getattr(self, node.op)(node.target, args, kwargs)  # noqa: E731
            if node.op in ("placeholder", "output", "get_attr"):
                return fn()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                result = fn()
                times.append(time.perf_counter() - start)
            groups[kind_of(gm, node)].append(statistics.median(times))
            return result

    with torch.no_grad():
        Timer(gm).run(x)
    return groups


def kind_of(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Conv2d):
            k = "x".join(map(str, module.kernel_size))
            return f"conv {k} s{module.stride[0]}"
        return type(module).__name__
    return str(getattr(node.target, "__name__", node.target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18",
                        help="a conv net of depthcut.models (other than resnet18: give "
                             "--sites or --all-sites)")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--sites", nargs="*", default=None, help="sites to linearize")
    parser.add_argument("--all-sites", action="store_true", help="linearize every site")
    parser.add_argument("--from-run", type=Path, help="linearize the answer stage's sites")
    parser.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 128])
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed rounds per variant (default: 30 at batch 1, 5 above)")
    parser.add_argument("--per-op", action="store_true", help="per-operator batch-1 breakdown")
    args = parser.parse_args()

    torch.manual_seed(0)
    dense = build_model(args.model, width=args.width).eval()
    for module in dense.modules():  # non-trivial BN statistics, so folding has real work
        if isinstance(module, nn.BatchNorm2d):
            module.running_var.uniform_(0.5, 2.0)
            module.running_mean.normal_(0, 0.2)
    all_sites = find_sites(dense)
    if args.all_sites:
        sites = all_sites
    else:
        sites = args.sites or (sites_from_run(args.from_run) if args.from_run
                               else DEFAULT_SITES)
    linear = linearize(build_model(args.model, width=args.width).eval(), sites)
    linear.load_state_dict(dense.state_dict())
    unfolded_depth = longest_linear_path(trace(linear))
    shown = "all" if args.all_sites else ", ".join(sites)
    print(f"{args.model} x{args.width}, {len(sites)} of {len(all_sites)} sites linearized: "
          f"{shown}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, eager, "
          "channels_last off\n")

    rows = []
    for batch in args.batch_sizes:
        x = torch.randn(batch, 3, 32, 32)
        variants: dict[str, nn.Module] = {"unfolded": linear, "bn-only": fold(dense, x)}
        fold_seconds = {}
        for policy in ("macs", "all", "latency"):
            start = time.perf_counter()
            variants[policy] = fold(linear, x, policy)
            fold_seconds[policy] = time.perf_counter() - start
        repeats = args.repeats or (30 if batch == 1 else 5)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for model in variants.values():
            timed(model, x)  # warm up
        for _ in range(repeats):
            for name, model in variants.items():
                times[name].append(timed(model, x))
        base = statistics.median(times["unfolded"])
        for name, model in variants.items():
            report = getattr(model, "fold_report", None)
            median = statistics.median(times[name])
            rows.append({
                "batch": batch, "variant": name, "ms": 1e3 * median, "ratio": median / base,
                "macs_per_image": count_macs(model, x[:1]),
                "depth": report.depth_after if report else unfolded_depth,
                "rel_error": report.relative_error if report else 0.0,
                "exact": report.exact if report else True,
                "fold_s": fold_seconds.get(name),
            })

    print("| batch | variant | median ms | / unfolded | MMACs per image | conv/linear depth "
          "| max rel. deviation | exact |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['batch']} | {r['variant']} | {r['ms']:.2f} | {r['ratio']:.3f} | "
              f"{r['macs_per_image'] / 1e6:.1f} | {r['depth']} | {r['rel_error']:.2g} | "
              f"{'yes' if r['exact'] else 'no'} |")

    if args.per_op:
        x = torch.randn(1, 3, 32, 32)
        print("\nPer-operator batch-1 time (median of 20 calls each, summed by kind):")
        print("| variant | kind | calls | total ms |")
        print("| --- | --- | ---: | ---: |")
        for name in ("unfolded", "bn-only", "all"):
            model = {"unfolded": linear, "bn-only": fold(dense, x), "all": fold(linear, x, "all")}[
                name]
            for kind, values in sorted(per_op_times(model, x, 20).items(),
                                       key=lambda kv: -sum(kv[1])):
                print(f"| {name} | {kind} | {len(values)} | {1e3 * sum(values):.3f} |")


if __name__ == "__main__":
    main()
