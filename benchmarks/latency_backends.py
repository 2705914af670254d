"""Latency of the BN-folded dense model against every site linear, folded, on each backend.

For each model (random weights, BatchNorm statistics perturbed so folding has real work, 32x32
inputs), two forms: `dense` is the dense model folded (policy macs: only the BatchNorms merge,
which any deployment does anyway, the baseline of every ratio), `linear` the model with every
site linearized, folded (policy macs: the limit of depth reduction for that model at that
size). Both are timed on each backend (`depthcut.cost` timers) at each batch size, all calls
prepared first (exported, compiled), then measured round-robin (each round times every call
once: batch 1 the median of 5 calls, larger batches one call), the figure being the median over
rounds, so a burst of load from another process spreads over everything. A backend that cannot
prepare a model (no package, no GPU, a failed compile) is named in the output with its reason.

    .venv/bin/python benchmarks/latency_backends.py --threads 2        # CPU: eager, onnxruntime,
                                                                       # compile
    python3 benchmarks/latency_backends.py --device cuda               # GPU: eager, cuda
                                                                       # (events), compile
    .venv/bin/python benchmarks/latency_backends.py --models mobilenetv2:0.5 --batch-sizes 1
    .venv/bin/python benchmarks/latency_backends.py --runs RUN_DIR...  # trained answers

With `--runs`, each run directory is a model: `dense` is its dense stage (stage 0) folded, and
`linear` its folded answer (checkpoints/answer_folded.pt, as the run folded it, a dp plan's
merge forms included), so trained answers get every backend's figures side by side.

Prints a markdown table (ms, linear/dense, each form against eager's) and what it ran on.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # depthcut from this checkout

from depthcut.cost import Timed, count_macs, get_timer, round_robin  # noqa: E402
from depthcut.errors import DepthcutError  # noqa: E402
from depthcut.fold import fold  # noqa: E402
from depthcut.models import build_model  # noqa: E402
from depthcut.sites import find_sites, linearize  # noqa: E402

MODELS = ("mobilenetv2:0.5", "mobilenetv2:1.0", "swin-t:0.25", "resnet18:0.25")
CPU_BACKENDS = ("eager", "onnxruntime", "compile")
GPU_BACKENDS = ("eager", "cuda", "compile")  # cheap first: compiling may run out of time
FORMS = ("dense", "linear")
CALLS_PER_ROUND = {1: 5}  # batch size -> calls per round (others: 1)


@dataclass
class Variant:
    """One model at one size: its two forms folded, and their MACs per image."""

    name: str
    forms: dict[str, nn.Module]
    macs: dict[str, int]
    sites: int
    fold_seconds: float


@dataclass
class Timings:
    """Prepared calls, their per-round medians, and what could not be prepared (and why)."""

    calls: dict[tuple, Timed] = field(default_factory=dict)
    rounds: dict[tuple, list[float]] = field(default_factory=dict)
    failed: dict[tuple, str] = field(default_factory=dict)  # (variant, backend, batch) -> why
    prepare_seconds: dict[str, float] = field(default_factory=dict)  # backend -> total


def perturbed(name: str, width: float) -> nn.Module:
    """The model with random weights and non-trivial BatchNorm statistics (seeded)."""
    torch.manual_seed(0)
    model = build_model(name, width=width).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_var.uniform_(0.5, 2.0, generator=generator)
                module.running_mean.normal_(0.0, 0.2, generator=generator)
    return model


def build_variant(spec: str, example: torch.Tensor) -> Variant:
    """Both forms of `spec` (NAME:WIDTH), folded on `example`'s device (where they are timed:
    the folded modules may hold tensors that `.to()` would not move)."""
    name, _, width = spec.partition(":")
    start = time.perf_counter()
    dense = perturbed(name, float(width or 1.0))
    sites = find_sites(dense)
    linear = linearize(perturbed(name, float(width or 1.0)), sites)
    linear.load_state_dict(dense.state_dict())
    dense, linear = dense.to(example.device), linear.to(example.device)
    forms = {"dense": fold(dense, example, "macs"), "linear": fold(linear, example, "macs")}
    macs = {form: count_macs(module, example[:1]) for form, module in forms.items()}
    return Variant(spec, forms, macs, len(sites), time.perf_counter() - start)


def prepare_all(variants: list[Variant], backends: list[str], batches: list[int],
                device: torch.device, deadline: float) -> Timings:
    """Every (variant, backend, batch, form) call prepared, backend after backend (the cheap
    ones, listed first, are not crowded out by compiling); a backend that refuses or fails is
    recorded, and past `deadline` (perf_counter) the rest are skipped."""
    timings = Timings()
    for backend in backends:
        timer = get_timer(backend)
        for variant in variants:
            forms = variant.forms
            for batch in batches:
                key = (variant.name, backend, batch)
                if time.perf_counter() > deadline:
                    timings.failed[key] = "skipped: out of time"
                    continue
                x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(2))
                x = x.to(device)
                start = time.perf_counter()
                try:
                    prepared = {form: timer.prepare(module, x) for form, module in forms.items()}
                except (DepthcutError, RuntimeError) as error:
                    timings.failed[key] = f"{type(error).__name__}: {error}".splitlines()[0]
                    continue
                finally:
                    timings.prepare_seconds[backend] = (timings.prepare_seconds.get(backend, 0.0)
                                                        + time.perf_counter() - start)
                for form, call in prepared.items():
                    timings.calls[(*key, form)] = Timed(timer, call, x.device,
                                                        CALLS_PER_ROUND.get(batch, 1))
                print(f"prepared {variant.name} {backend} batch {batch} "
                      f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)
    return timings


def measure_rounds(timings: Timings, rounds: int, deadline: float) -> int:
    """Round-robin: each round times every prepared call once; stops early past `deadline`
    (at least one round). Returns the rounds done."""
    def report(done: int) -> None:
        print(f"round {done}/{rounds} done", file=sys.stderr, flush=True)

    seconds = round_robin(timings.calls, rounds, deadline=deadline, on_round=report)
    timings.rounds = {key: [1e3 * s for s in values] for key, values in seconds.items()}
    return min(len(values) for values in seconds.values()) if seconds else 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions(backends: list[str]) -> str:
    parts = [f"torch {torch.__version__}"]
    if "onnxruntime" in backends:
        try:
            import onnxruntime

            parts.append(f"onnxruntime {onnxruntime.__version__}")
        except ImportError:
            parts.append("onnxruntime not installed")
    return ", ".join(parts)


def table(variants: list[Variant], backends: list[str], batches: list[int],
          timings: Timings) -> str:
    medians = {key: statistics.median(values) for key, values in timings.rounds.items()}
    lines = ["| model | sites | MACs linear/dense | backend | batch | dense ms | linear ms | "
             "linear/dense | dense vs eager | linear vs eager |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for variant in variants:
        macs = f"{variant.macs['linear'] / variant.macs['dense']:.3f}x"
        for batch in batches:
            for backend in backends:
                key = (variant.name, backend, batch)
                if key in timings.failed:
                    lines.append(f"| {variant.name} | {variant.sites} | {macs} | {backend} | "
                                 f"{batch} | - | - | - | - | - |")
                    continue
                ms = {form: medians.get((*key, form)) for form in FORMS}
                eager = {form: medians.get((variant.name, "eager", batch, form)) for form in FORMS}
                against = [f"{ms[f] / eager[f]:.3f}x" if ms[f] and eager[f] else "-"
                           for f in FORMS]
                lines.append(
                    f"| {variant.name} | {variant.sites} | {macs} | {backend} | {batch} | "
                    f"{ms['dense']:.3f} | {ms['linear']:.3f} | "
                    f"{ms['linear'] / ms['dense']:.3f}x | {against[0]} | {against[1]} |")
    return "\n".join(lines)


def run_variant(path: Path, example: torch.Tensor) -> Variant:
    """A run's dense stage folded (policy macs) and its folded answer, as the two forms."""
    from depthcut.run import load_checkpoint, load_folded

    start = time.perf_counter()
    dense, _ = load_checkpoint(path / "checkpoints" / "stage_00.pt")
    answer, info = load_folded(path / "checkpoints" / "answer_folded.pt")
    forms = {"dense": fold(dense.eval().to(example.device), example, "macs"),
             "linear": answer.eval().to(example.device)}
    macs = {form: count_macs(module, example[:1]) for form, module in forms.items()}
    sites = len(info.get("extra", {}).get("record", {}).get("linearized", []))
    return Variant(path.name, forms, macs, sites, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        help=f"NAME:WIDTH of depthcut.models (default without --runs: "
                        f"{' '.join(MODELS)})")
    parser.add_argument("--runs", nargs="+", type=Path, default=[],
                        help="run directories: their dense stage against their folded answer")
    parser.add_argument("--backends", nargs="+",
                        help="timers of depthcut.cost (default: eager onnxruntime compile on "
                        "CPU; eager cuda compile with --device cuda)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch (and ONNX Runtime) intra-op threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds: preparing stops at 60%% of it and the rounds stop after "
                        "it (0 = no limit)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    limit = args.time_limit or float("inf")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backends = args.backends or list(GPU_BACKENDS if device.type == "cuda" else CPU_BACKENDS)
    example = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(device)
    variants = []
    for spec in args.models or ([] if args.runs else list(MODELS)):
        variants.append(build_variant(spec, example))
        print(f"folded {spec} ({variants[-1].fold_seconds:.1f} s)", file=sys.stderr, flush=True)
    for run in args.runs:
        variants.append(run_variant(run, example))
        print(f"loaded {run} ({variants[-1].fold_seconds:.1f} s)", file=sys.stderr, flush=True)
    timings = prepare_all(variants, backends, args.batch_sizes, device, start + 0.6 * limit)
    done = measure_rounds(timings, args.rounds, start + limit)
    card = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# Latency backends, {now:%Y-%m-%d %H:%M} UTC\n")
    print(f"- command: `{' '.join(['python', *sys.argv])}`")
    print(f"- {versions(backends)}; {torch.get_num_threads()} threads; device {device}{card}; "
          f"CPU: {cpu_name()}")
    print("- backends: " + "; ".join(get_timer(b).describe() for b in backends))
    linear = ("the run's folded answer (sites: linearized in it)" if args.runs else
              "every site linear, folded (policy macs)")
    print(f"- medians over {done} round-robin rounds (batch 1: median of 5 calls per round; "
          "other batches: one call); dense = the BN-folded dense model (policy macs), linear = "
          f"{linear}; 'vs eager' = that form on this backend / the same form in eager")
    print("- preparing (export, compile): " + ", ".join(
        f"{b} {s:.0f} s" for b, s in timings.prepare_seconds.items()))
    print()
    print(table(variants, backends, args.batch_sizes, timings))
    if timings.failed:
        print("\nNot timed:")
        for (name, backend, batch), why in timings.failed.items():
            print(f"- {name} on {backend} at batch {batch}: {why}")
    print(f"\nTotal {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
