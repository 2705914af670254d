"""Cost of measure_entropy against a plain no-grad forward over the same data, in one run.

Runs the two side by side, alternating, several times, and reports the median of the per-pair
ratios (this machine is noisy, so absolute times matter less than the ratio) and the peak memory
each one adds over the resident model and data (tracemalloc does not see torch's allocator, so on
CPU we read the process's peak RSS growth; on CUDA, torch.cuda.max_memory_allocated).

    .venv/bin/python benchmarks/entropy_overhead.py --data-root ../shared/data
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from depthcut.data import load_dataset
from depthcut.entropy import measure_entropy
from depthcut.models import build_model


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches_of(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, batch_size: int,
               device: torch.device):
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device).float().div_(255)
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        yield x


def plain_forward(model: torch.nn.Module, batches) -> None:
    with torch.no_grad():
        for x in batches:
            model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="cifar10-jpeg")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    data = load_dataset(args.dataset, args.data_root)
    images = data.test_inputs[: args.samples]
    mean = torch.tensor(data.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(data.std, device=device).view(1, -1, 1, 1)
    model = build_model(args.model, num_classes=data.num_classes, width=args.width).to(device)
    model = model.to(memory_format=torch.channels_last).eval()

    def run(kind: str) -> float:
        batches = batches_of(images, mean, std, args.batch_size, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        if kind == "entropy":
            measure_entropy(model, batches, progress=False)
        else:
            plain_forward(model, batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run("plain")  # warm-up both paths (allocator, kernels)
    base_rss = peak_rss_mib()
    run("entropy")
    entropy_rss = peak_rss_mib()
    ratios, plain_times, entropy_times = [], [], []
    for repeat in range(args.repeats):
        order = ("plain", "entropy") if repeat % 2 == 0 else ("entropy", "plain")
        times = {kind: run(kind) for kind in order}
        plain_times.append(times["plain"])
        entropy_times.append(times["entropy"])
        ratios.append(times["entropy"] / times["plain"])

    n = len(images)
    print(f"{args.model} x{args.width} on {args.samples} {args.dataset} test images, "
          f"batch {args.batch_size}, device {device}, {torch.get_num_threads()} threads")
    print(f"plain no-grad forward: median {statistics.median(plain_times):.3f} s "
          f"({n / statistics.median(plain_times):.0f} img/s)")
    print(f"measure_entropy:       median {statistics.median(entropy_times):.3f} s "
          f"({n / statistics.median(entropy_times):.0f} img/s)")
    print(f"ratio entropy/plain: median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.repeats} alternating pairs)")
    print(f"peak RSS after warm-up forward {base_rss:.0f} MiB, after entropy "
          f"{entropy_rss:.0f} MiB (+{entropy_rss - base_rss:.1f} MiB)")


if __name__ == "__main__":
    main()
