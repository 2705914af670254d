"""Short EASIER runs per architecture and per activation on CIFAR-10 (JPEG), for the README.

Each run: dense training on a training subset, then a few EASIER stages with one finetune epoch
each (delta 1.0 on validation top-1). The table gives each architecture's sites, parameters and
multiply-adds at 32x32, and the run's dense and answer-stage test top-1 and sites removed.

    .venv/bin/python scripts/architectures.py --data-root ../shared/data --out runs/arch
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from depthcut.cost import count_macs
from depthcut.experiment import ExperimentConfig, run_method
from depthcut.methods.easier import EasierConfig
from depthcut.models import build_model, count_parameters, default_activation
from depthcut.reports import markdown_table
from depthcut.run import read_records
from depthcut.sites import find_sites
from depthcut.stages import answer_stage
from depthcut.train import TrainConfig

ARCHITECTURES = [("resnet18", 0.25), ("vgg16", 0.25), ("mobilenetv2", 0.25), ("swin-t", 0.25)]
ACTIVATIONS = ["relu", "leaky_relu", "prelu", "gelu", "silu"]


def run(name: str, width: float, activation: str | None, args, out: Path, *, subset: int,
        epochs: int, stages: int) -> dict:
    config = ExperimentConfig(
        dataset="cifar10-jpeg", data_root=args.data_root, model=name, width=width,
        activation=activation, train_subset=subset, seed=0, progress=False,
        dense=TrainConfig(epochs=epochs, lr=0.05, weight_decay=5e-4),
    )
    method = EasierConfig(delta=1.0, max_stages=stages,
                          finetune=TrainConfig(epochs=1, lr=0.01, weight_decay=5e-4))
    if (out / "summary.md").is_file():  # finished before: read it instead of training again
        records = read_records(out)
        answer = answer_stage(records)
        return {"dense": records[0], "answer": answer, "minutes": records[-1]["elapsed_s"] / 60}
    start = time.perf_counter()
    result = run_method(config, "easier", method, out, overwrite=True)
    return {"dense": result.records[0], "answer": result.answer,
            "minutes": (time.perf_counter() - start) / 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--out", type=Path, default=Path("runs/arch"))
    parser.add_argument("--train-subset", type=int, default=5000, help="architecture runs")
    parser.add_argument("--epochs", type=int, default=3, help="architecture runs")
    parser.add_argument("--stages", type=int, default=2, help="architecture runs")
    parser.add_argument("--act-train-subset", type=int, default=10000, help="activation runs")
    parser.add_argument("--act-epochs", type=int, default=5, help="activation runs")
    parser.add_argument("--act-stages", type=int, default=10, help="activation runs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    x = torch.randn(1, 3, 32, 32)
    rows = []
    for name, width in ARCHITECTURES:
        full = build_model(name).eval()
        outcome = run(name, width, None, args, args.out / name, subset=args.train_subset,
                      epochs=args.epochs, stages=args.stages)
        dense, answer = outcome["dense"], outcome["answer"]
        rows.append([name, default_activation(name), len(find_sites(full)),
                     f"{count_parameters(full) / 1e6:.2f} M", f"{count_macs(full, x) / 1e6:.0f} M",
                     f"x{width}", f"{dense['test_top1']:.2f}", f"{answer['test_top1']:.2f}",
                     f"{answer['sites_linearized']}/{answer['sites_total']}",
                     f"{outcome['minutes']:.1f}"])
        print(markdown_table(HEADERS, rows[-1:]), flush=True)
    activation_rows = []
    for activation in ACTIVATIONS:
        outcome = run("resnet18", 0.25, activation, args, args.out / f"resnet18-{activation}",
                      subset=args.act_train_subset, epochs=args.act_epochs,
                      stages=args.act_stages)
        dense, answer = outcome["dense"], outcome["answer"]
        activation_rows.append([activation, f"{dense['test_top1']:.2f}",
                                f"{answer['test_top1']:.2f}",
                                f"{answer['sites_linearized']}/{answer['sites_total']}",
                                ", ".join(answer["linearized"]), f"{outcome['minutes']:.1f}"])
        print(markdown_table(ACT_HEADERS, activation_rows[-1:]), flush=True)
    text = (f"Short EASIER runs on CIFAR-10 (JPEG), seed 0, delta 1.0 (validation), 1 "
            f"finetune epoch per stage. Architectures: {args.train_subset} training images, "
            f"{args.epochs} dense epochs, at most {args.stages} stages.\n\n"
            + markdown_table(HEADERS, rows) + "\n\nActivations (ResNet-18 x0.25): "
            f"{args.act_train_subset} training images, {args.act_epochs} dense epochs, at most "
            f"{args.act_stages} stages.\n\n" + markdown_table(ACT_HEADERS, activation_rows)
            + "\n")
    (args.out / "architectures.md").write_text(text)
    print(text)


HEADERS = ["model", "activation", "sites", "params (x1)", "MACs at 32x32 (x1)", "run width",
           "dense test top-1", "answer test top-1", "sites removed", "minutes"]
ACT_HEADERS = ["activation (ResNet-18 x0.25)", "dense test top-1", "answer test top-1",
               "sites removed", "sites", "minutes"]

if __name__ == "__main__":
    main()
