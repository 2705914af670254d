"""Command line: `depthcut easier|nepenthe|egp|imp|layer-folding|compare|report|entropy|fold|heal
...`. Parses arguments, calls the API (`depthcut.experiment`, `depthcut.workflows`,
`depthcut.reports`) and prints.

Settings are layered: a preset (`--preset quick`, the default, finishes in minutes on 2 CPU
cores; `--preset paper` is the papers' recipe), then a JSON `--config` file, then explicit flags.
Every setting is one flat key (an option name) mapped by `FIELDS` onto the config dataclasses,
whose defaults are the CLI's defaults.

Errors the user's input causes (`depthcut.errors.DepthcutError`) are printed as one paragraph
with exit code 2; any other exception is a bug: a short message, the traceback in a file, exit
code 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import tempfile
import traceback
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from depthcut import experiment, reports, workflows
from depthcut.data import DATASETS
from depthcut.entropy import ENTROPY_VARIANTS
from depthcut.errors import ConfigError, DepthcutError
from depthcut.experiment import COMPARABLE, EASIER_VARIANTS, ExperimentConfig
from depthcut.fold import POLICIES
from depthcut.memory_format import normalize_setting
from depthcut.methods.easier import CHOICES, PAYOFF_COSTS, EasierConfig
from depthcut.methods.layer_folding import LayerFoldingConfig
from depthcut.methods.progressive import ProgressiveConfig
from depthcut.methods.rounds import PruningConfig
from depthcut.models import ACTIVATIONS, MODELS
from depthcut.pruning import REALLOCATE
from depthcut.run import RunDirError
from depthcut.stages import METRICS
from depthcut.text import TEXT_DATASETS
from depthcut.train import SCHEDULES, TrainConfig

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
        "progressive_epochs": 1,
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
        "progressive_epochs": 40,  # a quarter of an EASIER stage (not in any paper)
    },
}

# On a text dataset (fortunes-lang, fortunes-topic) a preset is followed by its overlay here
# ("*": every text dataset, then the dataset's own): the byte-level transformer (the one model
# that reads tokens) and, for quick, SGD settings that trained it here in minutes: a one-epoch
# warm-up (it serves every training, so a one-epoch finetune ramps up to finetune_lr), lr 0.2
# (0.3 trained the language model to 76% instead of 91% in 6 epochs, and the topic model not at
# all; 0.1 was slower), 16,000 of the ~47,000 language training texts for 6 epochs, all ~6,000
# topic texts for 15 (the topic model learns slowly: 10-15% for 7 epochs, then 36-40%).
TEXT_PRESETS: dict[str, dict[str, dict]] = {
    "quick": {
        "*": {
            "model": "transformer",
            "epochs": 6,
            "lr": 0.2,
            "warmup_epochs": 1.0,
            "finetune_epochs": 1,
            "finetune_lr": 0.04,
            "max_stages": 4,
            "rounds": 3,
            "slope_epochs": 1,
            "slope_lr": 0.04,
        },
        "fortunes-lang": {"train_subset": 16000},
        "fortunes-topic": {"epochs": 15},
    },
    "paper": {"*": {"model": "transformer"}},
}

# EASIER Table 4 learning rates. Table 4 gives none for the sequence transformer or for
# torchvision:/timm: models: they get PAPER_LR_OTHER (the ResNet-18 value).
PAPER_LR: dict[str, float] = {"resnet18": 0.1, "mobilenetv2": 0.1, "vgg16": 0.01, "swin-t": 0.001}
PAPER_LR_OTHER = 0.1

# Every flat setting (an option's name, a --config key, a preset key) and the config dataclass
# fields it sets, as (dataclass, "field" or "train_field.field"). (TrainConfig, "field") sets
# that field of every TrainConfig of a run: dense training, finetuning and slope training.
# A setting's default is the default of its first field (tests check that the others agree).
FIELDS: dict[str, tuple[tuple[type, str], ...]] = {
    # data and model
    "model": ((ExperimentConfig, "model"),),
    "width": ((ExperimentConfig, "width"),),
    "activation": ((ExperimentConfig, "activation"),),
    "dataset": ((ExperimentConfig, "dataset"),),
    "data_root": ((ExperimentConfig, "data_root"),),
    "cache_dir": ((ExperimentConfig, "cache_dir"),),
    "val_fraction": ((ExperimentConfig, "val_fraction"),),
    "train_subset": ((ExperimentConfig, "train_subset"),),
    "batch_size": ((ExperimentConfig, "batch_size"),),
    "seed": ((ExperimentConfig, "seed"),),
    "device": ((ExperimentConfig, "device"),),
    "channels_last": ((ExperimentConfig, "channels_last"),),
    "amp": ((ExperimentConfig, "amp"),),
    "dense_checkpoint": ((ExperimentConfig, "dense_checkpoint"),),
    "metric": ((ExperimentConfig, "metric"),),
    # dense training; the optimizer and schedule settings serve every training of a run
    "epochs": ((ExperimentConfig, "dense.epochs"),),
    "lr": ((ExperimentConfig, "dense.lr"),),
    "schedule": ((TrainConfig, "schedule"),),
    "milestones": ((TrainConfig, "milestones"),),
    "gamma": ((TrainConfig, "gamma"),),
    "momentum": ((TrainConfig, "momentum"),),
    "nesterov": ((TrainConfig, "nesterov"),),
    "weight_decay": ((TrainConfig, "weight_decay"),),
    "decay_norm_and_bias": ((TrainConfig, "decay_norm_and_bias"),),
    "warmup_epochs": ((TrainConfig, "warmup_epochs"),),
    "distill": ((TrainConfig, "distill"),),
    "distill_temperature": ((TrainConfig, "distill_temperature"),),
    # finetuning and entropy counting (every method that has them)
    "finetune_epochs": ((EasierConfig, "finetune.epochs"), (PruningConfig, "finetune.epochs"),
                        (LayerFoldingConfig, "finetune.epochs")),
    "finetune_lr": ((EasierConfig, "finetune.lr"), (PruningConfig, "finetune.lr"),
                    (LayerFoldingConfig, "finetune.lr"), (ProgressiveConfig, "finetune.lr")),
    "entropy_mode": ((EasierConfig, "entropy_mode"), (PruningConfig, "entropy_mode"),
                     (ProgressiveConfig, "entropy_mode")),
    "entropy_variant": ((EasierConfig, "entropy_variant"), (PruningConfig, "entropy_variant"),
                        (ProgressiveConfig, "entropy_variant")),
    # EASIER (delta also serves EGP, IMP and progressive)
    "delta": ((EasierConfig, "delta"), (PruningConfig, "delta"), (ProgressiveConfig, "delta")),
    "k": ((EasierConfig, "k"),),
    "max_stages": ((EasierConfig, "max_stages"), (ProgressiveConfig, "max_stages")),
    "choose": ((EasierConfig, "choose"),),
    "payoff_weight": ((EasierConfig, "payoff_weight"),),
    "payoff_cost": ((EasierConfig, "payoff_cost"),),
    # NEPENTHE, EGP, IMP
    "zeta": ((PruningConfig, "zeta"),),
    "temperature": ((PruningConfig, "temperature"),),
    "theta": ((PruningConfig, "theta"),),
    "rounds": ((PruningConfig, "rounds"),),
    "reallocate": ((PruningConfig, "reallocate"),),
    # Layer Folding
    "lf_k": ((LayerFoldingConfig, "k"),),
    "threshold": ((LayerFoldingConfig, "threshold"),),
    "lam": ((LayerFoldingConfig, "lam"),),
    "slope_epochs": ((LayerFoldingConfig, "slope_training.epochs"),),
    "slope_lr": ((LayerFoldingConfig, "slope_training.lr"),),
    # progressive linearization
    "progressive_epochs": ((ProgressiveConfig, "finetune.epochs"),),
    "first_step": ((ProgressiveConfig, "first_step"),),
    "max_sites": ((ProgressiveConfig, "max_sites"),),
    "blend": ((ProgressiveConfig, "blend"),),
}

# The config dataclasses each method command builds (compare builds them all).
METHOD_CONFIGS: dict[str, tuple[type, ...]] = {
    "easier": (EasierConfig,),
    "nepenthe": (PruningConfig,),
    "egp": (PruningConfig,),
    "imp": (PruningConfig,),
    "layer-folding": (LayerFoldingConfig,),
    "progressive": (ProgressiveConfig,),
    "compare": (EasierConfig, PruningConfig, LayerFoldingConfig, ProgressiveConfig),
}


def _field(cls: type, name: str) -> dataclasses.Field:
    for item in dataclasses.fields(cls):
        if item.name == name:
            return item
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def field_default(cls: type, path: str) -> Any:
    """The default of `cls`'s field at `path` ("field" or "train_field.field")."""
    head, _, rest = path.partition(".")
    item = _field(cls, head)
    if item.default is not dataclasses.MISSING:
        value = item.default
    else:
        value = item.default_factory()
    for name in rest.split(".") if rest else ():
        value = getattr(value, name)
    return value


def _plain(value: Any) -> Any:
    """A default as a --config file would hold it (tuples as JSON lists)."""
    return list(value) if isinstance(value, tuple) else value


DEFAULTS: dict = {key: _plain(field_default(*targets[0])) for key, targets in FIELDS.items()}
# compare's methods are arguments of run_comparison, no dataclass field: all but the EASIER
# variants.
DEFAULTS["methods"] = [m for m in COMPARABLE if m not in EASIER_VARIANTS]


def build_config(cls: type, settings: dict, **extra: Any) -> Any:
    """A `cls` (ExperimentConfig, TrainConfig or a method's config) from flat settings, through
    FIELDS; fields no setting names keep their dataclass defaults; `extra` sets fields of `cls`
    directly."""
    values: dict[str, Any] = {}
    trainings = [f.name for f in dataclasses.fields(cls)
                 if isinstance(field_default(cls, f.name), TrainConfig)]
    for key, targets in FIELDS.items():
        for owner, path in targets:
            if owner is cls:
                paths = [path]
            elif owner is TrainConfig:  # a shared training setting: every training of cls
                paths = [f"{name}.{path}" for name in trainings]
            else:
                continue
            for target in paths:
                head, _, rest = target.partition(".")
                if rest:
                    values.setdefault(head, {})[rest] = settings[key]
                else:
                    values[head] = settings[key]
    for name in trainings:
        if name in values:
            values[name] = TrainConfig(**values[name])
    return cls(**values, **extra)


def _setting_type(key: str) -> Any:
    """The type a setting's value must have: its dataclass field's annotation (None too where
    a preset uses None: "same as lr", "Table 4's rate")."""
    if key == "methods":
        return list[str]
    owner, path = FIELDS[key][0]
    *parents, name = path.split(".")
    cls = owner
    for parent in parents:
        cls = type(field_default(cls, parent))
    hint = typing.get_type_hints(cls)[name]
    if any(key in preset and preset[key] is None for preset in PRESETS.values()):
        hint = hint | None
    return hint


def _accepts(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_accepts(option, value) for option in typing.get_args(hint))
    if origin in (tuple, list):
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_accepts(item, v) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return not isinstance(hint, type) or isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(option) for option in typing.get_args(hint))
    if origin in (tuple, list):
        return f"a list of {_type_name(typing.get_args(hint)[0]).split()[-1]}s"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def check_types(settings: dict, source: object) -> None:
    """Raise ConfigError for a setting from `source` (a --config file) of the wrong type."""
    for key, value in settings.items():
        hint = _setting_type(key)
        if not _accepts(hint, value):
            raise ConfigError(f"{source}: {key} must be {_type_name(hint)}, got {value!r}")


def experiment_config(settings: dict, progress: bool) -> ExperimentConfig:
    return build_config(ExperimentConfig, settings, progress=progress)


# Bad input: depthcut's own errors, plus the operating system's (e.g. no space left on device
# while writing a checkpoint) and a loss that became NaN or infinite. Anything else is a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (DepthcutError, OSError, FloatingPointError)


# The entropy, fold and heal options default to their depthcut.workflows function's defaults.
WORKFLOW_DEFAULTS: dict[str, dict[str, Any]] = {
    function.__name__: {name: parameter.default
                        for name, parameter in inspect.signature(function).parameters.items()
                        if parameter.default is not inspect.Parameter.empty}
    for function in (workflows.entropy_report, workflows.fold_checkpoint, workflows.heal)
}


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
    group.add_argument("--metric", choices=tuple(METRICS), default=S,
                       help="what every method's stop rule (delta, theta) compares on the "
                       "validation split: top1 (default) or balanced (balanced accuracy, the "
                       "mean per-class recall: for unbalanced classes)")
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

    progressive = commands.add_parser(
        "progressive", help="progressive linearization: several sites per short finetune, "
        "blended into identity; the step halves after a stage beyond delta")
    _experiment_options(progressive)
    group = progressive.add_argument_group("progressive")
    group.add_argument("--delta", type=float, default=argparse.SUPPRESS,
                       help="validation points the answer may lose against dense (default 1)")
    group.add_argument("--max-stages", type=int, default=argparse.SUPPRESS,
                       help="stop after this many stages, undone ones included (quick: 8)")
    _progressive_options(group)
    _entropy_variant_option(group)
    _finetune_options(group, epochs=False)

    compare = commands.add_parser(
        "compare", help="train dense once, run several methods from it, write the report")
    _experiment_options(compare)
    compare.add_argument("--methods", nargs="+", default=argparse.SUPPRESS,
                         help=f"from: {' '.join(COMPARABLE)} (default: all but "
                         f"{' and '.join(EASIER_VARIANTS)})")
    compare.add_argument("--no-fair-reference", action="store_true",
                         help="skip training the dense model as long as each method")
    group = compare.add_argument_group("EASIER (delta also serves EGP and IMP)")
    _easier_options(group)
    _entropy_variant_option(group)
    _pruning_options(compare.add_argument_group("NEPENTHE, EGP, IMP"), "nepenthe")
    _folding_options(compare.add_argument_group("Layer Folding"), "--lf-k")
    _progressive_options(compare.add_argument_group("progressive"))
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
    entropy.add_argument("--split", choices=("train", "test"),
                         default=WORKFLOW_DEFAULTS["entropy_report"]["split"],
                         help="which split to count on (no augmentation)")
    entropy.add_argument("--samples", type=int, help="count on only the first N images")
    entropy.add_argument("--batch-size", type=int,
                         default=WORKFLOW_DEFAULTS["entropy_report"]["batch_size"])
    entropy.add_argument("--device",
                         default=WORKFLOW_DEFAULTS["entropy_report"]["device"])
    entropy.add_argument("--no-progress", action="store_true")

    fold = commands.add_parser("fold", help="merge linear ops of a checkpoint; print the report")
    fold.add_argument("--checkpoint", type=Path, required=True, help="a stage checkpoint")
    fold.add_argument("--out", type=Path, required=True, help="where to save the folded model")
    fold.add_argument("--policy", choices=POLICIES,
                      default=WORKFLOW_DEFAULTS["fold_checkpoint"]["policy"],
                      help="macs: merge only where MACs do not rise (default); all: every "
                      "merge; latency: merge where measured faster on --device")
    fold.add_argument("--export", choices=("onnx",), help="also write OUT with .onnx suffix")
    _data_options(fold, "fold_checkpoint",
                  split_help="test images used for agreement and top-1 (default: all)")

    heal = commands.add_parser("heal", help="finetune a folded model briefly (border merges)")
    heal.add_argument("--folded", type=Path, required=True, help="a model from `depthcut fold`")
    heal.add_argument("--out", type=Path, required=True, help="where to save the healed model")
    heal.add_argument("--epochs", type=int, default=WORKFLOW_DEFAULTS["heal"]["epochs"])
    heal.add_argument("--lr", type=float, default=WORKFLOW_DEFAULTS["heal"]["lr"],
                      help="small: a folded model has no BatchNorm left to steady training")
    heal.add_argument("--weight-decay", type=float,
                      default=WORKFLOW_DEFAULTS["heal"]["weight_decay"])
    heal.add_argument("--train-subset", type=int, help="finetune on only this many images")
    heal.add_argument("--seed", type=int, default=WORKFLOW_DEFAULTS["heal"]["seed"])
    _data_options(heal, "heal", split_help="evaluate on only the first N test images")
    return parser


def _progressive_options(group: argparse._ArgumentGroup) -> None:
    S = argparse.SUPPRESS
    group.add_argument("--progressive-epochs", type=int, default=S,
                       help="finetune epochs per progressive stage (quick: 1; paper: 40)")
    group.add_argument("--first-step", type=int, default=S,
                       help="sites per progressive stage at first, halved after a stage "
                       "beyond delta (default 4)")
    group.add_argument("--max-sites", type=int, default=S,
                       help="progressive: stop once this many sites are linear (default: none)")
    group.add_argument("--blend", type=float, default=S,
                       help="share of each progressive finetune over which the chosen "
                       "activations blend into identity (default 0.5)")


def _finetune_options(group: argparse._ArgumentGroup, epochs: bool = True) -> None:
    S = argparse.SUPPRESS
    if epochs:
        group.add_argument("--finetune-epochs", type=int, default=S,
                           help="retraining epochs per stage/round (quick: 3; paper: 160)")
    group.add_argument("--distill", type=float, default=S,
                       help="weight in [0, 1] of distillation from the dense model's logits in "
                       "every finetune (default 0: off; the fair-compute reference never "
                       "distills)")
    group.add_argument("--distill-temperature", type=float, default=S,
                       help="softmax temperature of the distillation (default 4)")
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
    group.add_argument("--choose", choices=CHOICES, default=argparse.SUPPRESS,
                       help="site choice: entropy = lowest entropy (default); payoff = lowest "
                       "entropy - payoff weight x the fraction of the folded cost that "
                       "linearizing the site would save (a dry-run fold per site per stage)")
    group.add_argument("--payoff-weight", type=float, default=argparse.SUPPRESS,
                       help="with --choose payoff: bits of entropy a site saving the whole "
                       "folded cost is worth (default 1; 0 = entropy only)")
    group.add_argument("--payoff-cost", choices=PAYOFF_COSTS, default=argparse.SUPPRESS,
                       help="with --choose payoff: savings in folded MACs (default) or "
                       "measured batch-1 CPU latency (noisy)")


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


def _data_options(parser: argparse.ArgumentParser, workflow: str, split_help: str) -> None:
    parser.add_argument("--dataset", choices=DATASETS, help="default: the model's dataset")
    parser.add_argument("--data-root", help="default: the model's data root")
    parser.add_argument("--cache-dir")
    parser.add_argument("--samples", type=int, help=split_help)
    parser.add_argument("--batch-size", type=int,
                        default=WORKFLOW_DEFAULTS[workflow]["batch_size"])
    parser.add_argument("--device", default=WORKFLOW_DEFAULTS[workflow]["device"],
                        help="cpu (default), cuda, auto, ...")
    parser.add_argument("--no-progress", action="store_true")


def resolve_settings(args: argparse.Namespace) -> dict:
    """Preset (with its text overlay for a text dataset), then config file, then explicit
    flags."""
    settings = {**DEFAULTS, **PRESETS[args.preset]}
    loaded: dict = {}
    if args.config is not None:
        try:
            loaded = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"cannot read config file {args.config}: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {args.config} must hold a JSON object")
        unknown = sorted(set(loaded) - set(settings))
        if unknown:
            raise ConfigError(
                f"unknown keys in {args.config}: {', '.join(unknown)}; known: "
                f"{', '.join(sorted(settings))}"
            )
        check_types(loaded, args.config)
    dataset = getattr(args, "dataset", None) or loaded.get("dataset", settings["dataset"])
    if dataset in TEXT_DATASETS:  # part of the preset: the config file and flags win
        overlay = TEXT_PRESETS.get(args.preset, {})
        settings.update({**overlay.get("*", {}), **overlay.get(dataset, {})})
    settings.update(loaded)
    if args.out is None and not getattr(args, "print_config", False):
        raise ConfigError("--out RUN_DIR is required (or --resume RUN_DIR to continue a run)")
    skip = {"command", "preset", "config", "out", "overwrite", "no_progress",
            "no_fair_reference", "resume", "print_config"}
    settings.update({k: v for k, v in vars(args).items() if k not in skip})
    # Older config files wrote channels_last as true / false / null.
    settings["channels_last"] = normalize_setting(settings["channels_last"])
    if settings["lr"] is None:  # the paper preset: Table 4's rate for this architecture
        settings["lr"] = PAPER_LR.get(settings["model"], PAPER_LR_OTHER)
    for key in ("finetune_lr", "slope_lr"):
        if settings[key] is None:
            settings[key] = settings["lr"]
    return settings


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
    for cls in METHOD_CONFIGS[args.command]:
        build_config(cls, settings)
    print(json.dumps(settings, indent=2, sort_keys=True, default=str))
    return 0


def cmd_easier(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    method = build_config(EasierConfig, settings)
    result = experiment.run_easier(
        experiment_config(settings, not args.no_progress), method, args.out,
        overwrite=args.overwrite,
    )
    answer = result.answer
    print()
    print(reports.stage_table(result.records))
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
    settings = resolve_settings(args)
    method = build_config(PruningConfig, settings)
    result = experiment.run_pruning(
        experiment_config(settings, not args.no_progress), args.command, method, args.out,
        overwrite=args.overwrite,
    )
    answer = result.answer
    print()
    print(reports.stage_table(result.records))
    print(
        f"\nAnswer: round {answer['stage']}, sparsity {100 * answer.get('sparsity', 0):.1f}%, "
        f"{answer['sites_linearized']}/{answer['sites_total']} sites removed, test top-1 "
        f"{answer['test_top1']:.2f} (dense {result.records[0]['test_top1']:.2f}). "
        f"Stopped: {result.stop_reason}."
    )
    print(f"Records, checkpoints and summary.md in {args.out}")
    return 0


def cmd_layer_folding(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    method = build_config(LayerFoldingConfig, settings)
    result = experiment.run_layer_folding(
        experiment_config(settings, not args.no_progress), method, args.out,
        overwrite=args.overwrite,
    )
    print()
    print(reports.stage_table(result.records))
    slopes = ", ".join(f"{site} {alpha:.2f}" for site, alpha in result.answer["alphas"].items())
    print(f"\nSlopes: {slopes}")
    print(f"Records, checkpoints and summary.md in {args.out}")
    return 0


def cmd_progressive(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    method = build_config(ProgressiveConfig, settings)
    result = experiment.run_progressive(
        experiment_config(settings, not args.no_progress), method, args.out,
        overwrite=args.overwrite)
    answer = result.answer
    print()
    print(reports.stage_table(result.records))
    print(f"\nAnswer: stage {answer['stage']}, {answer['sites_linearized']}/"
          f"{answer['sites_total']} sites linearized after {answer['total_epochs']} total "
          f"epochs, test top-1 {answer['test_top1']:.2f} (dense "
          f"{result.records[0]['test_top1']:.2f}). Stopped: {result.stop_reason}.")
    print(f"Records, checkpoints and summary.md in {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    report = experiment.run_comparison(
        experiment_config(settings, not args.no_progress), settings["methods"], args.out,
        easier_config=build_config(EasierConfig, settings),
        pruning_config=build_config(PruningConfig, settings),
        folding_config=build_config(LayerFoldingConfig, settings),
        progressive_config=build_config(ProgressiveConfig, settings),
        fair_reference=not args.no_fair_reference, overwrite=args.overwrite,
    )
    print(report.read_text())
    print(f"Report, tables and plots in {report.parent}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    report = reports.build_report(args.runs, args.out, measure=not args.no_measure,
                                  progress=not args.no_progress)
    print(report.read_text())
    print(f"Report, tables and plots in {report.parent}")
    return 0


def cmd_entropy(args: argparse.Namespace) -> int:
    report = workflows.entropy_report(
        args.checkpoint, dataset=args.dataset, data_root=args.data_root,
        cache_dir=args.cache_dir, split=args.split, samples=args.samples,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
    print(report.text())
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    result = workflows.fold_checkpoint(
        args.checkpoint, args.out, policy=args.policy, export=args.export,
        dataset=args.dataset, data_root=args.data_root, cache_dir=args.cache_dir,
        samples=args.samples, batch_size=args.batch_size, device=args.device,
        progress=not args.no_progress)
    print(result.text())
    return 0


def cmd_heal(args: argparse.Namespace) -> int:
    result = workflows.heal(
        args.folded, args.out, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        train_subset=args.train_subset, seed=args.seed, dataset=args.dataset,
        data_root=args.data_root, cache_dir=args.cache_dir, samples=args.samples,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
    print(result.text())
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    result = experiment.resume_run(args.resume, progress=not args.no_progress)
    print()
    print(reports.stage_table(result.records))
    answer = result.answer
    print(f"\nResumed and finished: answer stage {answer['stage']}, test top-1 "
          f"{answer['test_top1']:.2f}. Stopped: {result.stop_reason}. Run in {args.resume}")
    return 0


def _write_traceback(error: BaseException) -> str:
    """Save `error`'s traceback to a file in the temporary folder ($TMPDIR); its path, or
    "stderr" when no file can be written (the traceback is printed there instead)."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    try:
        with tempfile.NamedTemporaryFile("w", prefix="depthcut-traceback-", suffix=".txt",
                                         delete=False) as file:
            file.write(text)
        return file.name
    except OSError:
        print(text, file=sys.stderr, end="")
        return "stderr"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"easier": cmd_easier, "nepenthe": cmd_pruning, "egp": cmd_pruning,
                "imp": cmd_pruning, "layer-folding": cmd_layer_folding, "entropy": cmd_entropy,
                "fold": cmd_fold, "heal": cmd_heal, "compare": cmd_compare,
                "report": cmd_report, "progressive": cmd_progressive}
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
    except Exception as error:  # noqa: BLE001 - a bug in depthcut, not the user's input
        path = _write_traceback(error)
        print(f"depthcut {args.command}: internal error: {type(error).__name__}: {error} "
              f"(traceback written to {path}); please report it", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
