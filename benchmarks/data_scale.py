"""Loader throughput against the training step's, and peak memory, on an image folder.

Loads an image folder at one size through depthcut's data path (decoded once into the disk
cache, timed when it is built), then times separately, in one process:

- the loader: the training split's batches (shuffled, augmented, normalised), images/s;
- the training step: forward, backward and SGD step of the model on one batch already in
  memory, images/s;

and prints the process's peak resident memory (VmHWM). The loader keeps up when its rate is
above the step's. Output: one JSON line per run.

    .venv/bin/python benchmarks/data_scale.py --data-root /work/data224 --image-size 224
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from depthcut.data import load_dataset, make_splits
from depthcut.memory_format import choose_memory_format
from depthcut.models import ModelSpec
from depthcut.train import TrainConfig


def peak_rss_mib() -> float:
    """The process's peak resident set (VmHWM), MiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def loader_rate(loader, batches: int) -> float:
    """Images per second over `batches` batches (after one warm-up batch)."""
    iterator = iter(loader)
    next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        inputs, _ = next(iterator)
        count += len(inputs)
    return count / (time.perf_counter() - start)


def step_rate(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
              steps: int) -> float:
    """Images per second of forward + backward + SGD step (after one warm-up step)."""
    config = TrainConfig()
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(inputs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--augment", default="cifar")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--loader-batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = load_dataset("imagefolder", args.data_root, cache_dir=args.cache_dir,
                        image_size=args.image_size, augment=args.augment)
    load_seconds = time.perf_counter() - start
    spec = ModelSpec(name=args.model, num_classes=data.num_classes, in_channels=3,
                     width=args.width, activation="relu")
    model = spec.build()
    memory_format = choose_memory_format(model, torch.device("cpu"), "auto")
    if memory_format.channels_last:
        model = model.to(memory_format=torch.channels_last)
    splits = make_splits(data, batch_size=args.batch_size,
                         channels_last=memory_format.channels_last)
    loader = loader_rate(splits.train, args.loader_batches)
    inputs, labels = next(iter(splits.train))
    step = step_rate(model, inputs, labels, args.steps)
    print(json.dumps({
        "data": data.name, "image_size": args.image_size, "images": len(data.train_inputs)
        + len(data.test_inputs), "decoded_gb": round((len(data.train_inputs)
        + len(data.test_inputs)) * 3 * args.image_size ** 2 / 1e9, 2),
        "load_s": round(load_seconds, 1), "augment": args.augment,
        "batch_size": args.batch_size, "model": f"{args.model} x{args.width}",
        "loader_img_s": round(loader), "train_step_img_s": round(step, 1),
        "loader_over_step": round(loader / step, 1), "peak_rss_mib": round(peak_rss_mib()),
        "threads": args.threads, "cpu": cpu_name(), "cores": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
