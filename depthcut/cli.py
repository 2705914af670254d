"""Command line: `depthcut easier|nepenthe|egp|imp|entropy|fold|heal ...`. Only parses and
calls the API.

Settings are layered: a preset (`--preset quick`, the default, finishes in minutes on 2 CPU
cores; `--preset paper` is the papers' recipe), then a JSON `--config` file, then explicit flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from depthcut.data import DATASETS, DatasetNotFoundError
from depthcut.entropy import ENTROPY_VARIANTS
from depthcut.export import ExportError
from depthcut.fold import POLICIES, FoldError
from depthcut.models import ACTIVATIONS, MODELS
from depthcut.pruning import REALLOCATE
from depthcut.run import CheckpointError, RunDirError
from depthcut.sites import SiteError
from depthcut.train import SCHEDULES

PRESETS: dict[str, dict] = {
    # Minutes on a 2-core CPU: a narrow ResNet-18, short cosine training, short finetunes.
    "quick": {
        "width": 0.25,
        "epochs": 15,
        "lr": 0.1,
        "schedule": "cosine",
        "weight_decay": 5e-4,
        "decay_norm_and_bias": False,  # no weight decay on BatchNorm weights and biases
        "nesterov": True,
        "finetune_epochs": 3,
        "finetune_lr": 0.02,
        "max_stages": 8,
        "rounds": 5,
        "slope_epochs": 3,
        "slope_lr": 0.02,
    },
    # EASIER Table 4 (CIFAR-10): full width, 160 epochs per stage, lr per architecture
    # (PAPER_LR), milestones 80/120, gamma 0.1, momentum 0.9, weight decay 1e-4 on every
    # parameter as in the authors' code; every site may go.
    "paper": {
        "width": 1.0,
        "epochs": 160,
        "lr": None,  # PAPER_LR of the model
        "schedule": "multistep",
        "milestones": [80, 120],
        "gamma": 0.1,
        "weight_decay": 1e-4,
        "decay_norm_and_bias": True,
        "nesterov": False,
        "finetune_epochs": 160,
        "finetune_lr": None,  # same as lr
        "max_stages": None,
        "rounds": None,  # pruning methods: until their stop rule
        "slope_epochs": 160,
        "slope_lr": None,  # same as lr
    },
}

# EASIER Table 4 learning rates. Table 4 gives none for the sequence transformer or for
# torchvision:/timm: models: they get PAPER_LR_OTHER (the ResNet-18 value).
PAPER_LR: dict[str, float] = {"resnet18": 0.1, "mobilenetv2": 0.1, "vgg16": 0.01, "swin-t": 0.001}
PAPER_LR_OTHER = 0.1

DEFAULTS: dict = {
    "model": "resnet18",
    "activation": None,  # the architecture's own (ReLU; ReLU6 for MobileNetV2; GELU)
    "dataset": "cifar10-jpeg",
    "data_root": "../shared/data",
    "cache_dir": None,
    "val_fraction": 0.1,
    "train_subset": None,
    "batch_size": 128,
    "seed": 0,
    "device": "auto",
    "channels_last": "auto",
    "decay_norm_and_bias": False,
    "momentum": 0.9,
    "milestones": [80, 120],
    "gamma": 0.1,
    "warmup_epochs": 0.0,
    "dense_checkpoint": None,
    "amp": False,
    "delta": 1.0,
    "k": 1,
    "entropy_mode": "eval",
    "entropy_variant": "paper",
    "reallocate": "fixed",
    "zeta": 0.5,
    "temperature": 1.0,
    "theta": 0.99,
    "lam": 0.25,
    "threshold": 0.9,
    "lf_k": None,
    "methods": ["easier", "nepenthe", "egp", "imp", "layer-folding"],
}

USER_ERRORS = (
    DatasetNotFoundError,
    SiteError,
    RunDirError,
    CheckpointError,
    FloatingPointError,
    ExportError,
    OSError,  # e.g. no space left on device while writing a checkpoint
    FoldError,
    ValueError,
)


def _experiment_options(parser: argparse.ArgumentParser) -> None:
    """Options every method shares (data, model, dense training); defaults come from presets."""
    S = argparse.SUPPRESS
    group = parser.add_argument_group("data and model")
    group.add_argument("--preset", choices=sorted(PRESETS), default="quick",
                       help="base settings: quick (minutes on CPU) or paper (EASIER Table 4)")
    group.add_argument("--config", type=Path, help="JSON file of settings (keys = option names)")
    group.add_argument("--model", default=S, metavar="MODEL",
                       help=f"{', '.join(sorted(MODELS))}, or torchvision:NAME / timm:NAME "
                       "(optional packages; random init, stem adapted to 32x32)")
    group.add_argument("--width", type=float, default=S, help="width multiplier")
    group.add_argument("--activation", choices=sorted(ACTIVATIONS), default=S,
                       help="default: the architecture's own")
    group.add_argument("--dataset", choices=DATASETS, default=S)
    group.add_argument("--data-root", default=S, help="folder holding the dataset")
    group.add_argument("--cache-dir", default=S, help="where decoded datasets are cached")
    group.add_argument("--val-fraction", type=float, default=S,
                       help="share of the training split held out for validation")
    group.add_argument("--train-subset", type=int, default=S,
                       help="train on only this many images of the training split")
    group.add_argument("--batch-size", type=int, default=S)
    group.add_argument("--seed", type=int, default=S)
    group.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:1, ...")
    group.add_argument("--channels-last", choices=("on", "off", "auto"), default=S,
                       help="memory format of images and convolutions: on, off, or auto "
                       "(default): depthcut picks per model: channels_last on CPU, but "
                       "contiguous when a strided 1x1 convolution has fewer than 16 input "
                       "channels (a oneDNN bug on some CPUs); contiguous on GPU")
    group.add_argument("--no-channels-last", dest="channels_last", action="store_const",
                       const="off", default=S, help="same as --channels-last off")
    group.add_argument("--amp", action="store_true", default=S,
                       help="bf16 autocast for training, evaluation and entropy counting")
    group.add_argument("--dense-checkpoint", default=S,
                       help="start from this trained checkpoint instead of training a dense model")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=S, help="dense training epochs")
    train.add_argument("--lr", type=float, default=S,
                       help="dense learning rate (quick: 0.1; paper: Table 4 per model: 0.1 "
                       "ResNet-18 and MobileNetV2, 0.01 VGG-16, 0.001 Swin-T; 0.1 for models "
                       "Table 4 does not list)")
    train.add_argument("--schedule", choices=SCHEDULES, default=S)
    train.add_argument("--milestones", type=int, nargs="*", default=S,
                       help="multistep schedule: epochs at which lr is multiplied by gamma")
    train.add_argument("--gamma", type=float, default=S)
    train.add_argument("--momentum", type=float, default=S)
    train.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=S)
    train.add_argument("--weight-decay", type=float, default=S,
                       help="quick: 5e-4; paper: 1e-4")
    train.add_argument("--decay-norm-bias", dest="decay_norm_and_bias",
                       action=argparse.BooleanOptionalAction, default=S,
                       help="weight decay also on BatchNorm/LayerNorm weights and biases "
                       "(paper preset: on, as the authors' code; quick: off)")
    train.add_argument("--warmup-epochs", type=float, default=S)
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, help="run directory (required unless --resume)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    out.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue an interrupted run with its own settings (other options "
                     "are ignored) from its last finished epoch")
    out.add_argument("--no-progress", action="store_true", help="no progress bars")
    out.add_argument("--print-config", action="store_true",
                     help="print the resolved settings (preset, then --config, then flags) as "
                     "JSON and exit, without loading data or training; --out not needed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depthcut", description="Make trained neural networks shallower."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    easier = commands.add_parser("easier", help="EASIER: linearize low-entropy sites")
    _experiment_options(easier)
    group = easier.add_argument_group("EASIER")
    _easier_options(group)
    _entropy_variant_option(group)
    _finetune_options(group)

    for name, text in (("nepenthe", "NEPENTHE: entropy-guided pruning until theta"),
                       ("egp", "EGP: entropy-guided pruning, fixed rounds"),
                       ("imp", "iterative magnitude pruning baseline")):
        command = commands.add_parser(name, help=text)
        _experiment_options(command)
        group = command.add_argument_group(name.upper())
        _pruning_options(group, name)
        _entropy_variant_option(group)
        if name != "nepenthe":
            group.add_argument("--delta", type=float, default=argparse.SUPPRESS,
                               help="answer: last round within delta val top-1 points "
                               "(default 1)")
        _finetune_options(group)

    folding = commands.add_parser("layer-folding", help="Layer Folding baseline (trained slopes)")
    _experiment_options(folding)
    group = folding.add_argument_group("Layer Folding")
    _folding_options(group, "--k")
    _finetune_options(group)

    compare = commands.add_parser(
        "compare", help="train dense once, run several methods from it, write the report")
    _experiment_options(compare)
    compare.add_argument("--methods", nargs="+", default=argparse.SUPPRESS,
                         help="from: easier easier-k2 nepenthe egp imp layer-folding "
                         "(default: all but easier-k2)")
    compare.add_argument("--no-fair-reference", action="store_true",
                         help="skip training the dense model as long as each method")
    group = compare.add_argument_group("EASIER (delta also serves EGP and IMP)")
    _easier_options(group)
    _entropy_variant_option(group)
    _pruning_options(compare.add_argument_group("NEPENTHE, EGP, IMP"), "nepenthe")
    _folding_options(compare.add_argument_group("Layer Folding"), "--lf-k")
    _finetune_options(compare.add_argument_group("finetuning (every method)"))

    report = commands.add_parser("report", help="rebuild the comparison report from run dirs")
    report.add_argument("runs", nargs="+", type=Path, help="run directories")
    report.add_argument("--out", type=Path, required=True, help="report directory")
    report.add_argument("--no-measure", action="store_true",
                        help="do not fold and time EASIER stages (tables show -)")
    report.add_argument("--no-progress", action="store_true")

    entropy = commands.add_parser("entropy", help="print the per-site entropy of a checkpoint")
    entropy.add_argument("--checkpoint", type=Path, required=True)
    entropy.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's dataset")
    entropy.add_argument("--data-root", help="default: the checkpoint's data root")
    entropy.add_argument("--cache-dir")
    entropy.add_argument("--split", choices=("train", "test"), default="train",
                         help="which split to count on (no augmentation)")
    entropy.add_argument("--samples", type=int, help="count on only the first N images")
    entropy.add_argument("--batch-size", type=int, default=512)
    entropy.add_argument("--device", default="auto")
    entropy.add_argument("--no-progress", action="store_true")

    fold = commands.add_parser("fold", help="merge linear ops of a checkpoint; print the report")
    fold.add_argument("--checkpoint", type=Path, required=True, help="a stage checkpoint")
    fold.add_argument("--out", type=Path, required=True, help="where to save the folded model")
    fold.add_argument("--policy", choices=POLICIES, default="macs",
                      help="macs: merge only where MACs do not rise (default); all: every "
                      "merge; latency: merge where measured faster on --device")
    fold.add_argument("--export", choices=("onnx",), help="also write OUT with .onnx suffix")
    _data_options(fold, split_help="test images used for agreement and top-1 (default: all)")

    heal = commands.add_parser("heal", help="finetune a folded model briefly (border merges)")
    heal.add_argument("--folded", type=Path, required=True, help="a model from `depthcut fold`")
    heal.add_argument("--out", type=Path, required=True, help="where to save the healed model")
    heal.add_argument("--epochs", type=int, default=1)
    heal.add_argument("--lr", type=float, default=0.001,
                      help="small: a folded model has no BatchNorm left to steady training")
    heal.add_argument("--weight-decay", type=float, default=5e-4)
    heal.add_argument("--train-subset", type=int, help="finetune on only this many images")
    heal.add_argument("--seed", type=int, default=0)
    _data_options(heal, split_help="evaluate on only the first N test images")
    return parser


def _finetune_options(group: argparse._ArgumentGroup) -> None:
    S = argparse.SUPPRESS
    group.add_argument("--finetune-epochs", type=int, default=S,
                       help="retraining epochs per stage/round (quick: 3; paper: 160)")
    group.add_argument("--finetune-lr", type=float, default=S,
                       help="retraining learning rate (default: preset; paper: same as --lr)")
    group.add_argument("--entropy-mode", choices=("eval", "train"), default=S,
                       help="model mode while counting: eval (default) or train (BatchNorm "
                       "batch statistics)")


def _entropy_variant_option(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--entropy-variant", choices=ENTROPY_VARIANTS,
                       default=argparse.SUPPRESS,
                       help="how site entropy is counted: paper = the METHODS definition "
                       "(default); easier-code = the EASIER authors' counting rule (z >= 0 is "
                       "ON, per-batch entropies averaged, train mode on augmented batches); "
                       "egp-code = the EGP code's rule (average only over non-constant "
                       "channels per batch). IMP chooses by magnitude but still records it")


def _easier_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--delta", type=float, default=argparse.SUPPRESS,
                       help="top-1 points the answer may lose against dense (default 1.0)")
    group.add_argument("--k", type=int, default=argparse.SUPPRESS,
                       help="sites linearized per stage (EASIER k-x; default 1)")
    group.add_argument("--max-stages", type=int, default=argparse.SUPPRESS,
                       help="stop after this many stages (quick preset: 8; paper: no limit)")


def _folding_options(group: argparse._ArgumentGroup, k_flag: str) -> None:
    S = argparse.SUPPRESS
    group.add_argument(k_flag, dest="lf_k", type=int, default=S,
                       help="linearize the k sites with slope closest to 1 (default: threshold; "
                       "in compare: EASIER's answer count)")
    group.add_argument("--threshold", type=float, default=S,
                       help="without k: linearize sites with slope >= this (default 0.9)")
    group.add_argument("--lam", type=float, default=S,
                       help="weight of the slope loss sum |1 - alpha^2| (default 0.25)")
    group.add_argument("--slope-epochs", type=int, default=S,
                       help="epochs training the slopes (quick: 3; paper: 160)")
    group.add_argument("--slope-lr", type=float, default=S,
                       help="learning rate while training slopes (default: preset)")


def _pruning_options(group: argparse._ArgumentGroup, name: str) -> None:
    S = argparse.SUPPRESS
    group.add_argument("--zeta", type=float, default=S,
                       help="fraction of remaining weights pruned per round (default 0.5)")
    if name != "imp":
        group.add_argument("--temperature", type=float, default=S,
                           help="softmax temperature of the budget allocation (default 1)")
    if name == "nepenthe":
        group.add_argument("--theta", type=float, default=S,
                           help="stop when val top-1 < theta x dense val top-1 (default 0.99)")
    if name != "imp":
        group.add_argument("--reallocate", choices=REALLOCATE, default=S,
                           help="when a capped layer's share is re-allocated: fixed = keep "
                           "the first step's irrelevances (default); recompute = recompute "
                           "them over the layers still uncapped (the EGP code)")
    group.add_argument("--rounds", type=int, default=S,
                       help="at most this many rounds (quick preset: 5; paper: no limit)")


def _data_options(parser: argparse.ArgumentParser, split_help: str) -> None:
    parser.add_argument("--dataset", choices=DATASETS, help="default: the model's dataset")
    parser.add_argument("--data-root", help="default: the model's data root")
    parser.add_argument("--cache-dir")
    parser.add_argument("--samples", type=int, help=split_help)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, auto, ...")
    parser.add_argument("--no-progress", action="store_true")


def _dataset_for(args: argparse.Namespace, origin: dict):
    """The dataset a model was trained on, unless the flags name another."""
    from depthcut.data import load_dataset

    dataset_name = args.dataset or origin.get("dataset")
    root = args.data_root or origin.get("data_root")
    if not dataset_name or not root:
        raise ValueError("the model names no dataset: pass --dataset and --data-root")
    return load_dataset(dataset_name, root, cache_dir=args.cache_dir,
                        progress=not args.no_progress)


def _test_loader(args: argparse.Namespace, dataset, device):
    from depthcut.data import BatchLoader

    images, labels = dataset.test_images, dataset.test_labels
    if args.samples is not None:
        if args.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {args.samples}")
        images, labels = images[: args.samples], labels[: args.samples]
    return BatchLoader(images, labels, batch_size=args.batch_size, mean=dataset.mean,
                       std=dataset.std, device=device)


def resolve_settings(args: argparse.Namespace) -> dict:
    """Preset, then config file, then explicit flags."""
    settings = {**DEFAULTS, **PRESETS[args.preset]}
    if args.config is not None:
        try:
            loaded = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read config file {args.config}: {error}") from error
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {args.config} must hold a JSON object")
        unknown = sorted(set(loaded) - set(settings))
        if unknown:
            raise ValueError(
                f"unknown keys in {args.config}: {', '.join(unknown)}; known: "
                f"{', '.join(sorted(settings))}"
            )
        settings.update(loaded)
    if args.out is None and not getattr(args, "print_config", False):
        raise ValueError("--out RUN_DIR is required (or --resume RUN_DIR to continue a run)")
    skip = {"command", "preset", "config", "out", "overwrite", "no_progress",
            "no_fair_reference", "resume", "print_config"}
    settings.update({k: v for k, v in vars(args).items() if k not in skip})
    # Older config files wrote channels_last as true / false / null.
    legacy = {True: "on", False: "off", None: "auto"}
    if not isinstance(settings["channels_last"], str):
        settings["channels_last"] = legacy.get(settings["channels_last"],
                                               settings["channels_last"])
    if settings["lr"] is None:  # the paper preset: Table 4's rate for this architecture
        settings["lr"] = PAPER_LR.get(settings["model"], PAPER_LR_OTHER)
    for key in ("finetune_lr", "slope_lr"):
        if settings[key] is None:
            settings[key] = settings["lr"]
    return settings


def _train_config(settings: dict, epochs: int, lr: float):
    from depthcut.train import TrainConfig

    return TrainConfig(
        epochs=epochs,
        lr=lr,
        momentum=settings["momentum"],
        weight_decay=settings["weight_decay"],
        nesterov=settings["nesterov"],
        schedule=settings["schedule"],
        milestones=tuple(settings["milestones"]),
        gamma=settings["gamma"],
        warmup_epochs=settings["warmup_epochs"],
        decay_norm_and_bias=settings["decay_norm_and_bias"],
    )


def experiment_config(settings: dict, progress: bool):
    from depthcut.experiment import ExperimentConfig

    return ExperimentConfig(
        dataset=settings["dataset"],
        data_root=str(settings["data_root"]),
        cache_dir=settings["cache_dir"],
        model=settings["model"],
        width=settings["width"],
        activation=settings["activation"],
        val_fraction=settings["val_fraction"],
        train_subset=settings["train_subset"],
        batch_size=settings["batch_size"],
        seed=settings["seed"],
        device=settings["device"],
        channels_last=settings["channels_last"],
        dense=_train_config(settings, settings["epochs"], settings["lr"]),
        dense_checkpoint=settings["dense_checkpoint"],
        amp=settings["amp"],
        progress=progress,
    )


def _easier_config(settings: dict):
    from depthcut.methods.easier import EasierConfig

    return EasierConfig(
        delta=settings["delta"],
        k=settings["k"],
        max_stages=settings["max_stages"],
        finetune=_train_config(settings, settings["finetune_epochs"], settings["finetune_lr"]),
        entropy_mode=settings["entropy_mode"],
        entropy_variant=settings["entropy_variant"],
    )


def _pruning_config(settings: dict):
    from depthcut.methods.rounds import PruningConfig

    return PruningConfig(
        zeta=settings["zeta"],
        temperature=settings["temperature"],
        theta=settings["theta"],
        delta=settings["delta"],
        rounds=settings["rounds"],
        finetune=_train_config(settings, settings["finetune_epochs"], settings["finetune_lr"]),
        entropy_mode=settings["entropy_mode"],
        entropy_variant=settings["entropy_variant"],
        reallocate=settings["reallocate"],
    )


def _folding_config(settings: dict):
    from depthcut.methods.layer_folding import LayerFoldingConfig

    return LayerFoldingConfig(
        k=settings["lf_k"],
        threshold=settings["threshold"],
        lam=settings["lam"],
        slope_training=_train_config(settings, settings["slope_epochs"], settings["slope_lr"]),
        finetune=_train_config(settings, settings["finetune_epochs"], settings["finetune_lr"]),
    )


def cmd_print_config(args: argparse.Namespace) -> int:
    """Print the resolved settings as JSON (a valid --config file) and exit; no data, no run.

    The method configs are built too, so a bad value is reported here as it would be by a run.
    With --resume, print the run's own saved config.json instead.
    """
    if getattr(args, "resume", None) is not None:
        path = args.resume / "config.json"
        if not path.is_file():
            raise RunDirError(f"{args.resume} holds no config.json: not a depthcut run")
        print(path.read_text().rstrip())
        return 0
    settings = resolve_settings(args)
    experiment_config(settings, progress=False)
    builders = {"easier": (_easier_config,), "nepenthe": (_pruning_config,),
                "egp": (_pruning_config,), "imp": (_pruning_config,),
                "layer-folding": (_folding_config,),
                "compare": (_easier_config, _pruning_config, _folding_config)}
    for build in builders[args.command]:
        build(settings)
    print(json.dumps(settings, indent=2, sort_keys=True, default=str))
    return 0


def cmd_easier(args: argparse.Namespace) -> int:
    from depthcut.experiment import run_easier
    from depthcut.reports import stage_table

    settings = resolve_settings(args)
    method = _easier_config(settings)
    result = run_easier(
        experiment_config(settings, not args.no_progress), method, args.out,
        overwrite=args.overwrite,
    )
    answer = result.answer
    print()
    print(stage_table(result.records))
    print(
        f"\nAnswer: stage {answer['stage']}, {answer['sites_linearized']}/"
        f"{answer['sites_total']} sites linearized, test top-1 {answer['test_top1']:.2f} "
        f"(dense {result.records[0]['test_top1']:.2f}). Stopped: {result.stop_reason}."
    )
    folded = result.folded
    if folded:
        print(f"Answer folded ({folded['policy']}): test top-1 {folded['top1_folded']:.2f}, "
              f"MACs/image {folded['macs_unfolded']:,} -> {folded['macs_folded']:,}, batch-1 "
              f"latency {folded['latency_ms_batch1_unfolded']:.2f} -> "
              f"{folded['latency_ms_batch1_folded']:.2f} ms")
    print(f"Records, checkpoints and summary.md in {args.out}")
    return 0


def cmd_pruning(args: argparse.Namespace) -> int:
    from depthcut.experiment import run_pruning
    from depthcut.reports import stage_table

    settings = resolve_settings(args)
    method = _pruning_config(settings)
    result = run_pruning(experiment_config(settings, not args.no_progress), args.command,
                         method, args.out, overwrite=args.overwrite)
    answer = result.answer
    print()
    print(stage_table(result.records))
    print(
        f"\nAnswer: round {answer['stage']}, sparsity {100 * answer.get('sparsity', 0):.1f}%, "
        f"{answer['sites_linearized']}/{answer['sites_total']} sites removed, test top-1 "
        f"{answer['test_top1']:.2f} (dense {result.records[0]['test_top1']:.2f}). "
        f"Stopped: {result.stop_reason}."
    )
    print(f"Records, checkpoints and summary.md in {args.out}")
    return 0


def cmd_layer_folding(args: argparse.Namespace) -> int:
    from depthcut.experiment import run_layer_folding
    from depthcut.reports import stage_table

    settings = resolve_settings(args)
    method = _folding_config(settings)
    result = run_layer_folding(experiment_config(settings, not args.no_progress), method,
                               args.out, overwrite=args.overwrite)
    print()
    print(stage_table(result.records))
    slopes = ", ".join(f"{site} {alpha:.2f}" for site, alpha in result.answer["alphas"].items())
    print(f"\nSlopes: {slopes}")
    print(f"Records, checkpoints and summary.md in {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from depthcut.experiment import run_comparison

    settings = resolve_settings(args)
    report = run_comparison(
        experiment_config(settings, not args.no_progress), settings["methods"], args.out,
        easier_config=_easier_config(settings), pruning_config=_pruning_config(settings),
        folding_config=_folding_config(settings),
        fair_reference=not args.no_fair_reference, overwrite=args.overwrite,
    )
    print(report.read_text())
    print(f"Report, tables and plots in {report.parent}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from depthcut.compare import build_report

    report = build_report(args.runs, args.out, measure=not args.no_measure,
                          progress=not args.no_progress)
    print(report.read_text())
    print(f"Report, tables and plots in {report.parent}")
    return 0


def cmd_entropy(args: argparse.Namespace) -> int:
    from depthcut.data import BatchLoader
    from depthcut.entropy import count_states
    from depthcut.reports import entropy_table
    from depthcut.run import load_checkpoint
    from depthcut.sites import find_sites
    from depthcut.train import resolve_device

    model, info = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    dataset = _dataset_for(args, info.get("extra", {}))
    images, labels = (
        (dataset.train_images, dataset.train_labels)
        if args.split == "train"
        else (dataset.test_images, dataset.test_labels)
    )
    if args.samples is not None:
        if args.samples < 1:
            raise ValueError(f"--samples must be >= 1, got {args.samples}")
        images, labels = images[: args.samples], labels[: args.samples]
    loader = BatchLoader(images, labels, batch_size=args.batch_size, mean=dataset.mean,
                         std=dataset.std, device=device)
    model.to(device)
    counts = count_states(model, loader, find_sites(model), progress=not args.no_progress)
    linearized = info.get("linearized", [])
    print(
        f"{args.checkpoint}: {info['spec'].name} x{info['spec'].width}, "
        f"{len(linearized)} site(s) linearized; {len(images)} images of the {dataset.name} "
        f"{args.split} split"
    )
    print(entropy_table(counts))
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    from depthcut.export import export_onnx
    from depthcut.fold import fold
    from depthcut.run import load_checkpoint, save_folded
    from depthcut.train import resolve_device

    model, info = load_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    dataset = _dataset_for(args, info.get("extra", {}))
    loader = _test_loader(args, dataset, device)
    example = next(iter(loader))[0]
    folded = fold(model.to(device), example, args.policy, data=loader)
    report = folded.fold_report
    linearized = info.get("linearized", [])
    print(f"{args.checkpoint}: {info['spec'].name} x{info['spec'].width}, {len(linearized)} "
          f"site(s) linearized; checked on {len(loader.images)} {dataset.name} test images")
    print(report.markdown())
    extra = {**info.get("extra", {}), "source": str(args.checkpoint),
             "linearized": linearized, "spec": info["spec"].to_dict()}
    save_folded(args.out, folded, extra)
    print(f"\nFolded model saved to {args.out}")
    if not report.exact:
        print("Border-approximate merges changed the function near image borders; "
              f"`depthcut heal --folded {args.out} --out HEALED.pt` finetunes it briefly.")
    if args.export == "onnx":
        exported = export_onnx(folded, example[:1].cpu(), args.out.with_suffix(".onnx"))
        checked = (f"checked with onnxruntime: max |onnx - torch| {exported['max_abs_diff']:.3g}"
                   if exported["checked"] else "not checked (onnxruntime not installed)")
        print(f"ONNX written to {exported['path']}; {checked}")
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    from depthcut.data import make_splits
    from depthcut.run import load_folded, save_folded
    from depthcut.train import TrainConfig, evaluate, resolve_device, seed_everything, train

    module, info = load_folded(args.folded)
    device = resolve_device(args.device)
    dataset = _dataset_for(args, info.get("extra", {}))
    splits = make_splits(dataset, val_fraction=0.0, train_subset=args.train_subset,
                         batch_size=args.batch_size, seed=args.seed, device=device)
    test = _test_loader(args, dataset, device)
    module.to(device)
    before = evaluate(module, test)
    seed_everything(args.seed)
    config = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay)
    train(module, splits.train, config, progress=not args.no_progress, desc="heal")
    module.eval()
    after = evaluate(module, test)
    report = info.get("report") or {}
    unfolded = report.get("top1_unfolded")
    print(f"{args.folded}: test top-1 of the folded model {before:.2f} before heal, "
          f"{after:.2f} after {args.epochs} epoch(s) at lr {args.lr}"
          + (f" (unfolded model: {unfolded:.2f})" if unfolded is not None else ""))
    extra = {**info.get("extra", {}), "heal": {"epochs": args.epochs, "lr": args.lr,
                                               "top1_before": before, "top1_after": after}}
    module.fold_report = None
    save_folded(args.out, module, extra)
    print(f"Healed model saved to {args.out}")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from depthcut.experiment import resume_run
    from depthcut.reports import stage_table

    result = resume_run(args.resume, progress=not args.no_progress)
    print()
    print(stage_table(result.records))
    answer = result.answer
    print(f"\nResumed and finished: answer stage {answer['stage']}, test top-1 "
          f"{answer['test_top1']:.2f}. Stopped: {result.stop_reason}. Run in {args.resume}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"easier": cmd_easier, "nepenthe": cmd_pruning, "egp": cmd_pruning,
                "imp": cmd_pruning, "layer-folding": cmd_layer_folding, "entropy": cmd_entropy,
                "fold": cmd_fold, "heal": cmd_heal, "compare": cmd_compare,
                "report": cmd_report}
    if getattr(args, "resume", None) is not None:
        handlers[args.command] = cmd_resume
    if getattr(args, "print_config", False):
        handlers[args.command] = cmd_print_config
    from depthcut import distributed

    try:
        if distributed.init_from_env() and not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 alone reports
        return handlers[args.command](args)
    except USER_ERRORS as error:
        print(f"depthcut {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("depthcut: interrupted", file=sys.stderr)
        return 130
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
