"""One experiment, end to end: data, dense model, a method's stages, run directory, summary.

This is the Python API behind the CLI: `run_method(ExperimentConfig(...), "easier",
EasierConfig(...), out)` for any registered method (`depthcut.methods.methods()`), and
`run_comparison` for several from one dense model. Nothing here names a method: what differs
between methods is in their `MethodSpec`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from depthcut import distributed
from depthcut.cost import DEFAULT_TIMER, TIMERS, get_timer
from depthcut.data import (
    NORMALIZE_HELP,
    ArrayDataset,
    DataSplits,
    ImageDataset,
    TokenDataset,
    data_origin,
    data_record,
    dataset_names,
    dataset_settings,
    dataset_spec,
    input_shape_mismatch,
    load_dataset,
    make_splits,
    recipe_names,
)
from depthcut.errors import ConfigError, DepthcutError
from depthcut.faults import die_at
from depthcut.fold import FoldPolicy
from depthcut.measure import measure_stage
from depthcut.memory_estimate import check_fits, estimate_training_memory, meta_model
from depthcut.memory_format import MemoryFormat, choose_memory_format
from depthcut.methods import MethodSpec, comparable, get_method, reference_method
from depthcut.models import (
    ACTIVATIONS,
    MODELS,
    ModelSpec,
    canonical_name,
    count_parameters,
    default_activation,
    reads_tokens,
    takes_image_size,
    takes_width,
)
from depthcut.options import Option
from depthcut.reports import build_report, stage_table, summary_markdown
from depthcut.run import (
    RunDir,
    RunDirError,
    check_writable,
    load_checkpoint,
    read_records,
    save_checkpoint,
    save_folded,
    write_json,
)
from depthcut.run_lock import RunLock
from depthcut.scorers import SCORERS
from depthcut.scorers.dp import answer_fold_policy
from depthcut.sites import find_sites
from depthcut.stages import (
    METRICS,
    MethodResult,
    StageRecord,
    TrainingHooks,
    check_metric,
    evaluate_stage,
)
from depthcut.train import (
    TrainConfig,
    prepare_model,
    resolve_device,
    seed_everything,
    train,
)
from depthcut.transfer import TRANSFER_PRESETS
from depthcut.weights import check_before_data, load_weights


@dataclass
class ExperimentConfig:
    """Data, model and dense-training settings shared by every method."""

    dataset: str = "cifar10-jpeg"
    data_root: str = "../shared/data"
    cache_dir: str | None = None
    # Image folders: the side images are resized and centre-cropped to (None: the first
    # image's), files that cannot be read left out instead of refused; any image dataset: the
    # training augmentation recipe and the normalisation (None: the dataset's own).
    image_size: int | None = None
    skip_unreadable: bool = False
    augment: str | None = None
    normalize: str | None = None
    model: str = "resnet18"
    width: float = 0.25
    activation: str | None = None  # None: the architecture's own default
    val_fraction: float = 0.1
    train_subset: int | None = None
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    # "auto": channels_last on CPU unless a strided 1x1 conv has < 16 input channels (a oneDNN
    # bug, see memory_format); "on"/"off" force it. Old configs' None/True/False are accepted.
    channels_last: str | bool | None = "auto"
    dense: TrainConfig = field(default_factory=TrainConfig)
    dense_checkpoint: str | None = None  # start from this trained model instead of training
    # The user's weights file (a state_dict; depthcut.weights): the dense training starts from
    # it, or, with weights_trained, it is the dense model. reset_head: a classifier that does
    # not fit the dataset's classes starts afresh.
    weights: str | None = None
    reset_head: bool = False
    weights_trained: bool = False
    amp: bool = False  # bf16 autocast for training, evaluation and entropy counting alike
    # What every method's stop rule compares on the validation split: "top1" or "balanced"
    # (balanced accuracy, the mean per-class recall: for unbalanced classes).
    metric: str = "top1"
    # How a text file's rows name their text and label (DatasetSpec.settings of textfile).
    text_field: str = "text"
    label_field: str = "label"
    # The timer (depthcut.cost.TIMERS) the folded answer and the report's Table 3 are timed on;
    # the same key sets the latency-aware site choice's backend (scorers.choice.ChoiceSettings).
    latency_backend: str = DEFAULT_TIMER
    progress: bool = True

    def __post_init__(self) -> None:
        get_timer(self.latency_backend)
        if isinstance(self.model, nn.Module):
            raise ConfigError(
                f"ExperimentConfig.model names a model ('resnet18', 'timm:NAME', "
                f"'path/file.py:factory'); for your own {type(self.model).__name__} object use "
                "depthcut.easier(model, train, val, ...) (or depthcut.<method>: depthcut.api)")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The settings of ExperimentConfig: the CLI's "data and model" group, then the dense training's
# epochs and lr, which head its "training" group (depthcut.train.TRAIN_OPTIONS follow them).
DATA_MODEL_OPTIONS: tuple[Option, ...] = (
    Option("model", f"{', '.join(sorted(MODELS))}, torchvision:NAME / timm:NAME (optional "
           "packages; random init, stem adapted to 32x32), or your own: path/to/file.py:FACTORY "
           "or package.module:FACTORY (options after a second colon: :key=value,...)",
           argparse={"metavar": "MODEL"}),
    Option("width", "width multiplier", argparse={"type": float}),
    Option("activation", "default: the architecture's own",
           argparse={"choices": sorted(ACTIVATIONS)}),
    Option("dataset", argparse={"choices": dataset_names}),
    Option("data_root", "folder holding the dataset (textfile: the file itself)"),
    Option("cache_dir", "where decoded datasets are cached"),
    Option("image_size", "image folders: resize (shorter side) and centre-crop every image to "
           "this many pixels (default: the first training image's shorter side)",
           argparse={"type": int}),
    Option("skip_unreadable", "image folders: leave out image files that cannot be read "
           "(default: refuse the data, naming them)", argparse={"action": "store_true"}),
    Option("augment", "training augmentation recipe (default: the dataset's own; cifar: "
           "pad-crop + flip; domainbed: random-resized crop + flip + colour jitter 0.4; "
           "flowers: flips + rotation + crop; none)", argparse={"choices": recipe_names}),
    Option("normalize", NORMALIZE_HELP),
    Option("val_fraction", "share of the training split held out for validation",
           argparse={"type": float}),
    Option("train_subset", "train on only this many images of the training split",
           argparse={"type": int}),
    Option("batch_size", argparse={"type": int}),
    Option("seed", argparse={"type": int}),
    Option("device", "auto, cpu, cuda, cuda:1, ..."),
    Option("channels_last", "memory format of images and convolutions: on, off, or auto "
           "(default): depthcut picks per model: channels_last on CPU, but contiguous when a "
           "strided 1x1 convolution has fewer than 16 input channels (a oneDNN bug on some "
           "CPUs); contiguous on GPU", argparse={"choices": ("on", "off", "auto")}),
    Option("channels_last", "same as --channels-last off", flags=("--no-channels-last",),
           argparse={"action": "store_const", "const": "off"}),
    Option("amp", "bf16 autocast for training, evaluation and entropy counting",
           argparse={"action": "store_true"}),
    Option("dense_checkpoint",
           "start from this trained checkpoint instead of training a dense model"),
    Option("weights", "load this weights file (a state_dict, a checkpoint dict holding one, or "
           ".safetensors) into the model strictly; dense training starts from it",
           argparse={"metavar": "FILE"}),
    Option("reset_head", "with --weights: a classifier whose shape does not fit the dataset's "
           "classes starts afresh (every other tensor must fit)",
           argparse={"action": "store_true"}),
    Option("weights_trained", "with --weights: the weights are the trained dense model: no "
           "dense training, stage 0 is the loaded model evaluated",
           argparse={"action": "store_true"}),
    Option("metric", "what every method's stop rule (delta, theta) compares on the validation "
           "split: top1 (default) or balanced (balanced accuracy, the mean per-class recall: "
           "for unbalanced classes)", argparse={"choices": tuple(METRICS)}),
    Option("text_field", "textfile: the JSONL key or CSV column of the texts (default text)"),
    Option("label_field", "textfile: the JSONL key or CSV column of the labels (default "
           "label)"),
    Option("latency_backend", "where latency is measured (the folded answer, the report's "
           "Table 3, latency-aware site choice): eager (PyTorch as it is, default), onnxruntime "
           "(ONNX Runtime CPU; pip install 'depthcut[onnx]'), compile (torch.compile, "
           "inductor), cuda (CUDA events), or another registered timer",
           argparse={"choices": lambda: tuple(TIMERS)}),
)
DENSE_TRAINING_OPTIONS: tuple[Option, ...] = (
    Option("epochs", "dense training epochs", path="dense.epochs", argparse={"type": int}),
    Option("lr", "dense learning rate (quick: 0.1; paper: Table 4 per model: 0.1 ResNet-18 and "
           "MobileNetV2, 0.01 VGG-16, 0.001 Swin-T; 0.1 for models Table 4 does not list)",
           path="dense.lr", argparse={"type": float}),
)
# The presets' data, model and training values (every training of a run); each method adds its
# own (`MethodSpec.presets`). quick: minutes on a 2-core CPU (a narrow ResNet-18, short cosine
# training). paper: EASIER Table 4 (CIFAR-10): full width, 160 epochs per stage, lr per
# architecture (`depthcut.models.paper_lr`; None here), milestones 80/120, gamma 0.1, momentum
# 0.9, weight decay 1e-4 on every parameter as in the authors' code.
EXPERIMENT_PRESETS: dict[str, dict] = {
    "quick": {
        "width": 0.25,
        "epochs": 15,
        "lr": 0.1,
        "schedule": "cosine",
        "weight_decay": 5e-4,
        "decay_norm_and_bias": False,  # no weight decay on BatchNorm weights and biases
        "nesterov": True,
    },
    "paper": {
        "width": 1.0,
        "epochs": 160,
        "lr": None,  # paper_lr of the model
        "schedule": "multistep",
        "milestones": [80, 120],
        "gamma": 0.1,
        "weight_decay": 1e-4,
        "decay_norm_and_bias": True,
        "nesterov": False,
    },
    **TRANSFER_PRESETS,  # Table 4's transfer rows: transfer-adam, transfer-sgd
}


@dataclass
class Prepared:
    """What a run needs before it starts: the data, the model's spec (None for a model built
    in Python), where it runs."""

    splits: DataSplits
    spec: ModelSpec | None
    device: torch.device
    channels_last: bool = False
    memory_format: MemoryFormat | None = None  # the choice and its reason (config.json)
    dense_model: nn.Module | None = None  # loaded from config.dense_checkpoint, checked
    dense_info: dict | None = None
    # The model's structure without weights (meta device; a real model where it cannot be
    # built there): its sites and memory format are read from it.
    skeleton: nn.Module | None = None
    # A model built in Python (`depthcut.api`): the dense model its checkpoints are rebuilt from
    # (no spec), and the user's own training loop.
    template: nn.Module | None = None
    hooks: TrainingHooks | None = None
    initial_model: nn.Module | None = None  # config.weights loaded: dense training starts here
    reset_keys: list[str] = field(default_factory=list)  # the classifier --reset-head renewed


def load_stage(prepared: Prepared, path: str | Path) -> tuple[nn.Module, dict]:
    """A stage checkpoint of this run, rebuilt by spec or from the run's template."""
    return load_checkpoint(path, template=prepared.template)


def check_memory(config: ExperimentConfig, spec: ModelSpec, input_shape: tuple[int, ...] | None,
                 device: torch.device, batch_size: int | None = None) -> nn.Module | None:
    """Refuse a run whose model and batch cannot fit in `device`'s memory
    (`depthcut.memory_estimate`; without `input_shape`, the weights alone); returns the model
    built on the meta device (None where it cannot be built there)."""
    skeleton = meta_model(spec)
    if skeleton is not None:
        estimate = estimate_training_memory(
            skeleton, input_shape, batch_size or config.batch_size,
            tokens=spec.name == "transformer", amp=config.amp)
        check_fits(estimate, device, f"{spec.name} x{spec.width:g}")
    return skeleton


def _provisional_spec(config: ExperimentConfig) -> ModelSpec | None:
    """The model an image dataset will need, known before its files are decoded, for a check
    of its weights (a batch's size is not known yet: the training split may be smaller).
    Unknowns are set low so the estimate stays a floor: 2 classes (the smallest classifier),
    1 channel where the dataset's format does not say. None for text datasets and external
    models whose image size the format does not fix."""
    data = dataset_spec(config.dataset)
    shape = data.sample_shape
    if data.kind != "images" or config.model == "transformer":
        return None
    sequence = {}
    if takes_image_size(config.model):  # built for its image size
        if shape is None:
            return None
        sequence = {"image_size": shape[-1]}
    return ModelSpec(name=config.model, num_classes=2, in_channels=shape[0] if shape else 1,
                     width=config.width,
                     activation=config.activation or default_activation(config.model),
                     **sequence)


def _check_weights_settings(config: ExperimentConfig) -> None:
    if not config.weights and (config.reset_head or config.weights_trained):
        raise ConfigError("--reset-head and --weights-trained need --weights FILE")
    if config.weights and config.dense_checkpoint:
        raise ConfigError("choose one of --weights and --dense-checkpoint")
    if config.reset_head and config.weights_trained:
        raise ConfigError("--reset-head starts the classifier afresh, so the weights are not a "
                          "trained model: drop --weights-trained (dense training trains it)")


def prepare(config: ExperimentConfig) -> Prepared:
    """Check that the model fits in memory (before decoding the data where the dataset's
    format fixes its image size), check the model and its weights file, load the dataset,
    check the dense checkpoint, choose the memory format, build the splits."""
    config = absolute_paths(config)
    device = resolve_device(config.device)
    check_metric(config.metric)
    _check_weights_settings(config)
    provisional = _provisional_spec(config)
    if provisional is not None:
        check_memory(config, provisional, None, device)
    state = check_before_data(config.model, config.width, config.activation, config.dataset,
                              config.weights, config.reset_head)
    dataset = load_dataset(
        config.dataset, config.data_root, cache_dir=config.cache_dir, progress=config.progress,
        settings=config.to_dict(),
        image_size=config.image_size, skip_unreadable=config.skip_unreadable,
        augment=config.augment, normalize=config.normalize,
    )
    # A text dataset's byte tokens need the sequence model, built for its vocabulary, length
    # and padding id (kept in the spec, so checkpoints rebuild the same model).
    sequence = {}
    if isinstance(dataset, TokenDataset):
        if config.model != "transformer" and not reads_tokens(config.model):
            raise ConfigError(f"{dataset.name} holds byte tokens, not images: use --model "
                              f"transformer (got {config.model!r})")
        sequence = {"vocab_size": dataset.vocab_size, "max_len": dataset.seq_len,
                    "pad_id": dataset.pad_id}
    elif config.model == "transformer":
        raise ConfigError(f"the transformer reads token ids, {dataset.name} holds images: use a "
                          f"text dataset ({', '.join(dataset_names(kind='tokens'))}) or an image "
                          "model")
    elif takes_image_size(config.model):  # built for the dataset's size (a ViT's img_size)
        sequence = {"image_size": dataset.image_size}
    spec = ModelSpec(
        name=config.model,
        num_classes=dataset.num_classes,
        in_channels=dataset.in_channels if isinstance(dataset, ImageDataset) else 1,
        width=config.width if takes_width(config.model) else 1.0,
        activation=config.activation or default_activation(config.model),
        **sequence,
    )
    # A batch never holds more than the training split.
    batch = min(config.batch_size, max(len(dataset.train_inputs), 1))
    skeleton = check_memory(config, spec, tuple(dataset.test_inputs.shape[1:]), device, batch)
    dense, info, initial, reset = None, None, None, []
    if config.weights:
        seed_everything(config.seed)  # a renewed classifier's init, as dense training's
        initial = spec.build()
        reset = load_weights(initial, spec, state, config.weights, reset_head=config.reset_head)
        if reset and config.progress:
            print(f"--reset-head: {', '.join(reset)} start afresh for {spec.num_classes} "
                  "classes", flush=True)
        if config.weights_trained:
            dense, info = initial, {"spec": spec, "linearized": [], "extra": {}}
    if config.dense_checkpoint:
        dense, info = load_checkpoint(config.dense_checkpoint)
        mismatched = [f"{key} {getattr(info['spec'], key)} (asked: {getattr(spec, key)})"
                      for key in ("name", "num_classes", "in_channels", "width", "activation",
                                  "vocab_size", "max_len", "pad_id", "image_size")
                      if getattr(info["spec"], key) != getattr(spec, key)]
        mismatched += input_shape_mismatch(info.get("extra", {}), dataset)
        if mismatched:
            raise ConfigError(
                f"--dense-checkpoint {config.dense_checkpoint} does not match this run's model "
                f"and data: {'; '.join(mismatched)}. Pass matching --model/--width/--activation "
                "or another checkpoint."
            )
    if skeleton is None:
        skeleton = spec.build()
    built = next(m for m in (dense, initial, skeleton) if m is not None)
    memory_format = choose_memory_format(built, device,
                                         config.channels_last)
    splits = make_splits(
        dataset,
        val_fraction=config.val_fraction,
        train_subset=config.train_subset,
        batch_size=config.batch_size,
        seed=config.seed,
        device=device,
        channels_last=memory_format.channels_last,
    )
    return Prepared(splits=splits, spec=spec, device=device,
                    channels_last=memory_format.channels_last, memory_format=memory_format,
                    dense_model=dense, dense_info=info, skeleton=skeleton,
                    initial_model=initial, reset_keys=reset)


def dense_model(
    config: ExperimentConfig, prepared: Prepared, run: RunDir
) -> tuple[nn.Module, StageRecord, ModelSpec]:
    """Train the dense model (or load `dense_checkpoint`), evaluate it and record it as stage 0."""
    splits = prepared.splits
    start = time.perf_counter()
    channels_last = prepared.channels_last
    if prepared.dense_model is not None:
        model, info = prepared.dense_model, prepared.dense_info
        spec, linearized, epochs = info["spec"], info["linearized"], 0
        trained = info.get("extra", {}).get("record", {}).get("total_epochs", 0)
        prepare_model(model, prepared.device, channels_last)
    else:
        seed_everything(config.seed)
        spec, linearized, epochs = prepared.spec, [], config.dense.epochs
        trained = epochs
        start_from = prepared.initial_model
        model = prepare_model(spec.build() if start_from is None else start_from,
                              prepared.device, channels_last)
        train(model, splits.train, config.dense, progress=config.progress, desc="dense",
              checkpointing=run.snapshot("dense"))
    sites = find_sites(model)
    scores = evaluate_stage(model, splits, prepared.hooks)
    record = StageRecord(
        method="dense",
        stage=0,
        sites_total=len(sites) + len(linearized),
        sites_linearized=len(linearized),
        linearized=list(linearized),
        **scores,
        drop=0.0,
        epochs=epochs,
        total_epochs=trained,
        parameters=count_parameters(model),
        seconds=time.perf_counter() - start,
        checkpoint=str(run.checkpoint_path(0).relative_to(run.path)),
    )
    save_checkpoint(run.checkpoint_path(0), model, spec, linearized,
                    _origin(config, record, splits))
    run.add_record(record.to_dict())
    return model, record, spec


def _origin(config: ExperimentConfig, record: StageRecord, splits: DataSplits | None = None
            ) -> dict:
    """What a checkpoint keeps about where it came from: the data (for `depthcut entropy`),
    its record, and the training loader's epoch counter (to resume batch for batch)."""
    origin = {"dataset": config.dataset, "data_root": config.data_root,
              "dataset_settings": dataset_settings(config.dataset, config.to_dict()),
              "record": record.to_dict()}
    if splits is not None and isinstance(splits.dataset, ArrayDataset):
        # What a checkpoint must be used on (checked when it is reused); a user's own data
        # (depthcut.api) records its input shape in config.json only.
        origin.update(data_origin(splits.dataset, config.image_size))
    if splits is not None:
        origin["loader_epoch"] = getattr(splits.train, "epoch", 0)
    return origin


def run_method(config: ExperimentConfig, method: str | MethodSpec, settings: object | None,
               out: str | Path, *, overwrite: bool = False, resume: bool = False
               ) -> MethodResult:
    """Train (or load) the dense model, run `method` (a registered method's name or spec) with
    `settings` (its config dataclass; None: the defaults), write records, checkpoints, the
    folded answer and summary.md into `out`."""
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    return _run_method(config, spec, spec.settings_or_defaults(settings), out, overwrite,
                       resume)


def run_comparison(
    config: ExperimentConfig, methods: Sequence[str], out: str | Path, *,
    method_configs: Mapping[str, object] | None = None, fair_reference: bool = True,
    overwrite: bool = False,
) -> Path:
    """Train the dense model once (inside the first run), run every method (a command name or
    a variant, `depthcut.methods.comparable()`) from it into `out/<method>`, the fair-compute
    reference into `out/<reference>`, and the report into `out/report`. `method_configs` maps a
    method's name to its settings (default: the config class's defaults); a variant replaces
    some of them. A method with `with_depth` (Layer Folding) gets the depth reference's
    (EASIER's) answer count."""
    names = comparable()
    unknown = [m for m in methods if m not in names]
    if unknown or not methods:
        raise ConfigError(f"unknown or no methods {unknown}; choose from {', '.join(names)}")
    configs = dict(method_configs or {})
    for method in methods:  # a variant's settings that do not hold fail before any training
        spec, variant = names[method]
        dataclasses.replace(configs.get(spec.name) or spec.config(), **variant)
    out = Path(out)
    check_writable(out, folder=True)
    out.mkdir(parents=True, exist_ok=True)
    # The runs inside have their own locks; this one keeps a second comparison out (rank 0
    # holds it under torch.distributed).
    with RunLock(out) if distributed.is_main() else contextlib.nullcontext():
        return _compare(config, methods, out, names, configs, fair_reference, overwrite)


def _compare(config: ExperimentConfig, methods: Sequence[str], out: Path, names: dict,
             configs: dict, fair_reference: bool, overwrite: bool) -> Path:
    """`run_comparison` once `out` is checked and locked."""
    dirs: list[Path] = []
    answers: dict[str, Mapping] = {}
    depth: int | None = None
    used: list = []  # the settings each method ran with
    for method in methods:
        spec, variant = names[method]
        run_config = config
        if dirs:
            run_config = _from_dense(config, dirs[0])
        settings = configs.get(spec.name) or spec.config()
        settings = dataclasses.replace(settings, **variant)
        if spec.with_depth is not None and depth is not None:
            settings = spec.with_depth(settings, depth)
        used.append(settings)
        result = _run_method(run_config, spec, settings, out / method, overwrite)
        if spec.depth_reference and not variant and depth is None:
            depth = result.answer["sites_linearized"]
        answers[method] = result.answer
        dirs.append(out / method)
    reference = reference_method()
    if fair_reference and reference is not None:
        dense_epochs = read_records(dirs[0])[0].get("total_epochs", 0)
        extra = max(a.get("total_epochs", 0) - dense_epochs for a in answers.values())
        settings = configs.get(reference.name)
        if settings is None:  # train as the methods finetune (the first that does)
            finetunes = [c.finetune for c in used if hasattr(c, "finetune")]
            settings = reference.config(**({"finetune": finetunes[0]} if finetunes else {}))
        chunk = max(settings.finetune.epochs, 1)
        # The reference is plain training: no distillation even where the methods use it.
        settings = dataclasses.replace(
            settings, finetune=dataclasses.replace(settings.finetune, distill=0.0),
            chunks=max(1, math.ceil(extra / chunk)))
        _run_method(_from_dense(config, dirs[0]), reference, settings, out / reference.name,
                    overwrite)
        dirs.append(out / reference.name)
    return build_report(dirs, out / "report", progress=config.progress,
                        latency_backend=config.latency_backend)


def _from_dense(config: ExperimentConfig, first: Path) -> ExperimentConfig:
    """The settings of a compared method: from the first run's dense model (not the weights)."""
    return dataclasses.replace(config, dense_checkpoint=str(first / "checkpoints" / "stage_00.pt"),
                               weights=None, reset_head=False, weights_trained=False)


def _run_method(config: ExperimentConfig, method_spec: MethodSpec, method, out: str | Path,
                overwrite: bool, resume: bool = False) -> MethodResult:
    """What every method shares: run directory, dense stage 0, per-stage records and
    checkpoints, the folded answer, and the summary. Every input is checked (data, dense
    checkpoint, the method's settings against the model's sites) before anything is written.
    With `resume`, the stages in the run directory are kept and the method goes on from the
    last one (and from the last finished epoch of the stage that was interrupted)."""
    run_start = time.perf_counter()
    config = absolute_paths(config)
    run_dir = RunDir(out, overwrite=overwrite, resume=resume)
    prepared = prepare(config)
    settings = {}
    settings["memory_format"] = prepared.memory_format.to_dict()
    # The shape of one input image (a text's token count): the report times stages at it.
    settings["input_shape"] = list(prepared.splits.dataset.test_inputs.shape[1:])
    settings.update(data_record(prepared.splits.dataset))
    if isinstance(prepared.splits.dataset, TokenDataset):
        text = prepared.splits.dataset
        settings["text"] = {"seq_len": text.seq_len, "vocab_size": text.vocab_size,
                            "pad_id": text.pad_id, "classes": text.classes,
                            "train_texts": len(text.train_inputs),
                            "test_texts": len(text.test_inputs),
                            **{k: v for k, v in text.stats.items() if k != "cache"}}
    return run_prepared(config, method_spec, method, run_dir, prepared, settings,
                        resume=resume, run_start=run_start)


def run_prepared(config: ExperimentConfig, method_spec: MethodSpec, method, run_dir: RunDir,
                 prepared: Prepared, extra_settings: dict, *, resume: bool = False,
                 run_start: float | None = None) -> MethodResult:
    """The run itself, once its data and model are prepared (by `prepare` from the config, or
    by `depthcut.api` from a user's own model and data): config.json (with
    `extra_settings`), stage 0, the method's stages, the folded answer and summary.md."""
    run_start = time.perf_counter() if run_start is None else run_start
    name = method_spec.name
    settings = {"method": name, "experiment": config.to_dict(), name: dataclasses.asdict(method),
                **extra_settings}
    # Model errors before any write.
    sites = find_sites(prepared.dense_model or prepared.skeleton or prepared.spec.build())
    if method_spec.check is not None:
        method_spec.check(method, len(sites))
    run_dir.start()
    try:
        history = run_dir.records if resume else []
        if not resume:
            run_dir.write_config(settings)
        else:
            _record_data_root(run_dir, config.data_root)
        if history:
            model, info = load_stage(prepared, run_dir.path / history[-1]["checkpoint"])
            prepared.splits.train.epoch = info["extra"].get("loader_epoch", 0)
            if "continue_from" in history[-1]:  # the method undid that stage: go on from this one
                stage = history[-1]["continue_from"]
                source = next(r for r in history if r["stage"] == stage)
                model, _ = load_stage(prepared, run_dir.path / source["checkpoint"])
            model = prepare_model(model, prepared.device, prepared.channels_last)
            dense, spec = StageRecord.from_dict(history[0]), info["spec"]
            run_start -= history[-1].get("elapsed_s", 0.0)
        else:
            with _autocast(config, prepared):
                model, dense, spec = dense_model(config, prepared, run_dir)

        def on_stage(record: StageRecord, stage_model: nn.Module) -> None:
            record.parameters = count_parameters(stage_model)
            record.elapsed_s = time.perf_counter() - run_start
            record.checkpoint = str(run_dir.checkpoint_path(record.stage).relative_to(run_dir.path))
            save_checkpoint(run_dir.checkpoint_path(record.stage), stage_model, spec,
                            record.linearized, _origin(config, record, prepared.splits),
                            silenced=record.get("silenced", ()))
            run_dir.add_record(record.to_dict())
            die_at("stage-end")
            if config.progress:
                print(stage_table([record], header=record.stage == 1), flush=True)

        with _autocast(config, prepared):
            result = method_spec.runner(model, prepared.splits, method, dense_record=dense,
                            history=history[1:], on_stage=on_stage, progress=config.progress,
                            snapshots=run_dir.snapshot, metric=config.metric,
                            teacher=_teacher(method, run_dir, prepared), hooks=prepared.hooks)
        distributed.barrier()  # rank 0 has written every checkpoint
        answer_model, _ = load_stage(prepared, run_dir.path / result.answer["checkpoint"])
        dense_stage, _ = load_stage(prepared, run_dir.checkpoint_path(0))
        # A dp plan's answer is folded as it planned each segment (its merge forms).
        policy = answer_fold_policy(result.records, result.answer["stage"])
        folded_model, folded = fold_answer(answer_model, prepared.splits, policy,
                                           timer=config.latency_backend, dense=dense_stage)
        result.answer_model, result.folded_model = answer_model, folded_model
        folded["stage"] = result.answer["stage"]
        folded["checkpoint"] = "checkpoints/answer_folded.pt"
        save_folded(run_dir.path / folded["checkpoint"], folded_model,
                    _origin(config, result.answer))
        write_json(run_dir.path / "folded_answer.json", folded)
        result.folded = folded
        run_dir.finish()
        run_dir.write_summary(
            summary_markdown(
                result.records,
                dataset=prepared.splits.dataset.name,
                settings=settings,
                answer=result.answer,
                stop_reason=result.stop_reason,
                wall_seconds=time.perf_counter() - run_start,
                rule=result.rule,
                folded=folded,
            )
        )
        return result
    finally:
        run_dir.release()  # finished, failed or interrupted: the folder is free


PATH_SETTINGS = ("data_root", "cache_dir", "dense_checkpoint", "weights")


def absolute_paths(config: ExperimentConfig) -> ExperimentConfig:
    """`config` with its paths absolute (data root, cache, dense checkpoint, weights file, a
    user's model file: `depthcut.models.canonical_name`), so that the run's config.json and
    checkpoints name the same files from any folder (`--resume`, `depthcut entropy`,
    `depthcut fold`). Idempotent."""
    paths = {key: os.path.abspath(os.path.expanduser(value))
             for key in PATH_SETTINGS if (value := getattr(config, key))}
    return dataclasses.replace(config, model=canonical_name(config.model), **paths)


def _record_data_root(run_dir: RunDir, data_root: str) -> None:
    """A run resumed from another data root (`--data-root`) records it in its config.json."""
    path = run_dir.path / "config.json"
    saved = json.loads(path.read_text())
    if saved["experiment"].get("data_root") != data_root:
        saved["experiment"]["data_root"] = data_root
        run_dir.write_config(saved)


def _teacher(method, run_dir: RunDir, prepared: Prepared) -> nn.Module | None:
    """The run's dense model (its stage 0 checkpoint) when a training of `method` distills or
    its site choice reads the dense model (`Scorer.needs_dense`: a latency budget relative to
    it, also in a resumed run); trainings without distillation ignore it."""
    trainings = [value for value in vars(method).values() if isinstance(value, TrainConfig)]
    choice = SCORERS.get(getattr(method, "choose", None) or "")
    if not (any(training.distill > 0 for training in trainings)
            or (choice is not None and choice.needs_dense)):
        return None
    distributed.barrier()  # under DDP, rank 0 has written stage 0 before any rank reads it
    teacher, _ = load_stage(prepared, run_dir.checkpoint_path(0))
    return prepare_model(teacher, prepared.device, prepared.channels_last).eval()


def _autocast(config: ExperimentConfig, prepared: Prepared) -> torch.autocast:
    """bf16 autocast around a method when asked: training, evaluation and entropy counting then
    all see the same (bf16-computed) pre-activations. Folding and its checks stay float32."""
    return torch.autocast(prepared.device.type, dtype=torch.bfloat16, enabled=config.amp)


def fold_answer(model: nn.Module, splits: DataSplits, policy: str | FoldPolicy = "macs", *,
                timer: str = DEFAULT_TIMER, dense: nn.Module | None = None
                ) -> tuple[nn.Module, dict]:
    """Fold `model` on a test batch and measure it: test top-1 of both, MACs, batch-1 latency
    on `timer` (without a test split: on the validation split; with neither, folded on a
    training batch and no top-1); with `dense`, the BN-folded dense model timed beside it."""
    held_out = splits.test if splits.test is not None else splits.val
    example = next(iter(held_out if held_out is not None else splits.train_eval))[0].cpu()
    data = None if held_out is None else ((x.cpu(), y.cpu()) for x, y in held_out)
    return measure_stage(model, example, policy=policy, data=data, timer=timer, baseline=dense)


def _settings(cls: type, values: dict):
    """A settings dataclass from its config.json form (training schedules rebuilt)."""
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    return cls(**{key: TrainConfig(**value) if kinds.get(key) in ("TrainConfig", TrainConfig)
                  else value for key, value in values.items()})


def resume_run(path: str | Path, *, progress: bool = True, method: str | None = None,
               data_root: str | Path | None = None) -> MethodResult:
    """Continue the interrupted run in `path` with the settings it was started with.

    `method` (a name or command): refuse a run of another method instead of resuming it.
    `data_root`: where the dataset is now, when it moved since the run started (recorded in
    the run's config.json); every other setting comes from config.json.
    """
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise RunDirError(f"nothing to resume in {path}: it holds no run (no config.json)")
    settings = json.loads(config_path.read_text())
    name = settings.get("method")
    try:
        spec = get_method(name)
    except ConfigError:
        raise RunDirError(f"{path} holds a run of unknown method {name!r}") from None
    if method is not None and get_method(method) is not spec:
        raise RunDirError(f"{path} holds {_article(spec.command)} {spec.command} run; resume it "
                          f"with `depthcut {spec.command} --resume {path}`")
    experiment = {**settings["experiment"], "progress": progress}
    if data_root is not None:
        experiment["data_root"] = str(data_root)
    config = _settings(ExperimentConfig, experiment)
    root = Path(config.data_root).expanduser()
    if not root.exists():
        given = "given with --data-root" if data_root is not None else "this run was trained on"
        raise DepthcutError(
            f"the data root {root} {given} does not exist (any more): pass --data-root to "
            f"point to the dataset's place (`depthcut {spec.command} --resume {path} "
            "--data-root FOLDER`)")
    return _run_method(config, spec, _settings(spec.config, settings[name]), path,
                       overwrite=False, resume=True)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
