"""One experiment, end to end: data, dense model, a method's stages, run directory, summary.

This is the Python API behind the CLI: `run_method(ExperimentConfig(...), "easier",
EasierConfig(...), out)` for any registered method (`depthcut.methods.methods()`), and
`run_comparison` for several from one dense model. Nothing here names a method: what differs
between methods is in their `MethodSpec`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from depthcut import distributed
from depthcut.data import (
    NORMALIZE_HELP,
    DataSplits,
    ImageDataset,
    TokenDataset,
    data_origin,
    data_record,
    dataset_names,
    input_shape_mismatch,
    load_dataset,
    make_splits,
    recipe_names,
)
from depthcut.errors import ConfigError
from depthcut.faults import die_at
from depthcut.measure import measure_stage
from depthcut.memory_format import MemoryFormat, choose_memory_format
from depthcut.methods import MethodSpec, comparable, get_method, reference_method
from depthcut.models import (
    ACTIVATIONS,
    MODELS,
    ModelSpec,
    count_parameters,
    default_activation,
    takes_image_size,
)
from depthcut.options import Option
from depthcut.reports import build_report, stage_table, summary_markdown
from depthcut.run import (
    RunDir,
    RunDirError,
    load_checkpoint,
    read_records,
    save_checkpoint,
    save_folded,
    write_json,
)
from depthcut.sites import find_sites
from depthcut.stages import METRICS, MethodResult, StageRecord, check_metric
from depthcut.train import (
    TrainConfig,
    evaluate,
    prepare_model,
    resolve_device,
    seed_everything,
    train,
)


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
    amp: bool = False  # bf16 autocast for training, evaluation and entropy counting alike
    # What every method's stop rule compares on the validation split: "top1" or "balanced"
    # (balanced accuracy, the mean per-class recall: for unbalanced classes).
    metric: str = "top1"
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The settings of ExperimentConfig: the CLI's "data and model" group, then the dense training's
# epochs and lr, which head its "training" group (depthcut.train.TRAIN_OPTIONS follow them).
DATA_MODEL_OPTIONS: tuple[Option, ...] = (
    Option("model", f"{', '.join(sorted(MODELS))}, or torchvision:NAME / timm:NAME (optional "
           "packages; random init, stem adapted to 32x32)", argparse={"metavar": "MODEL"}),
    Option("width", "width multiplier", argparse={"type": float}),
    Option("activation", "default: the architecture's own",
           argparse={"choices": sorted(ACTIVATIONS)}),
    Option("dataset", argparse={"choices": dataset_names}),
    Option("data_root", "folder holding the dataset"),
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
    Option("metric", "what every method's stop rule (delta, theta) compares on the validation "
           "split: top1 (default) or balanced (balanced accuracy, the mean per-class recall: "
           "for unbalanced classes)", argparse={"choices": tuple(METRICS)}),
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
}


@dataclass
class Prepared:
    splits: DataSplits
    spec: ModelSpec
    device: torch.device
    channels_last: bool = False
    memory_format: MemoryFormat | None = None  # the choice and its reason (config.json)
    dense_model: nn.Module | None = None  # loaded from config.dense_checkpoint, checked
    dense_info: dict | None = None


def prepare(config: ExperimentConfig) -> Prepared:
    """Load the dataset, check the dense checkpoint, choose the memory format, build the splits."""
    device = resolve_device(config.device)
    check_metric(config.metric)
    dataset = load_dataset(
        config.dataset, config.data_root, cache_dir=config.cache_dir, progress=config.progress,
        image_size=config.image_size, skip_unreadable=config.skip_unreadable,
        augment=config.augment, normalize=config.normalize,
    )
    # A text dataset's byte tokens need the sequence model, built for its vocabulary, length
    # and padding id (kept in the spec, so checkpoints rebuild the same model).
    sequence = {}
    if isinstance(dataset, TokenDataset):
        if config.model != "transformer":
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
        width=config.width,
        activation=config.activation or default_activation(config.model),
        **sequence,
    )
    dense, info = None, None
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
    memory_format = choose_memory_format(dense if dense is not None else spec.build(), device,
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
                    dense_model=dense, dense_info=info)


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
        model = prepare_model(spec.build(), prepared.device, channels_last)
        train(model, splits.train, config.dense, progress=config.progress, desc="dense",
              checkpointing=run.snapshot("dense"))
    sites = find_sites(model)
    val = (evaluate(model, splits.val, balanced=True) if splits.val is not None
           else (None, None))
    test = evaluate(model, splits.test, balanced=True)
    record = StageRecord(
        method="dense",
        stage=0,
        sites_total=len(sites) + len(linearized),
        sites_linearized=len(linearized),
        linearized=list(linearized),
        val_top1=val[0],
        test_top1=test[0],
        val_balanced=val[1],
        test_balanced=test[1],
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
              "record": record.to_dict()}
    if splits is not None:  # what a checkpoint must be used on (checked when it is reused)
        origin.update(data_origin(splits.dataset, config.image_size))
    if splits is not None:
        origin["loader_epoch"] = splits.train.epoch
    return origin


def run_method(config: ExperimentConfig, method: str | MethodSpec, settings: object | None,
               out: str | Path, *, overwrite: bool = False, resume: bool = False
               ) -> MethodResult:
    """Train (or load) the dense model, run `method` (a registered method's name or spec) with
    `settings` (its config dataclass; None: the defaults), write records, checkpoints, the
    folded answer and summary.md into `out`."""
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    if settings is None:
        settings = spec.config()
    if not isinstance(settings, spec.config):
        raise ConfigError(f"{spec.label} takes a {spec.config.__name__}, got "
                          f"{type(settings).__name__}")
    return _run_method(config, spec, settings, out, overwrite, resume)


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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dirs: list[Path] = []
    answers: dict[str, Mapping] = {}
    depth: int | None = None
    used: list = []  # the settings each method ran with
    for method in methods:
        spec, variant = names[method]
        run_config = config
        if dirs:
            run_config = dataclasses.replace(
                config, dense_checkpoint=str(dirs[0] / "checkpoints" / "stage_00.pt"))
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
        _run_method(dataclasses.replace(
            config, dense_checkpoint=str(dirs[0] / "checkpoints" / "stage_00.pt")),
            reference, settings, out / reference.name, overwrite)
        dirs.append(out / reference.name)
    return build_report(dirs, out / "report", progress=config.progress)


def _run_method(config: ExperimentConfig, method_spec: MethodSpec, method, out: str | Path,
                overwrite: bool, resume: bool = False) -> MethodResult:
    """What every method shares: run directory, dense stage 0, per-stage records and
    checkpoints, the folded answer, and the summary. Every input is checked (data, dense
    checkpoint, the method's settings against the model's sites) before anything is written.
    With `resume`, the stages in the run directory are kept and the method goes on from the
    last one (and from the last finished epoch of the stage that was interrupted)."""
    run_start = time.perf_counter()
    run_dir = RunDir(out, overwrite=overwrite, resume=resume)
    name = method_spec.name
    settings = {"method": name, "experiment": config.to_dict(), name: dataclasses.asdict(method)}
    prepared = prepare(config)
    # Model errors before any write.
    sites = find_sites(prepared.dense_model or prepared.spec.build())
    if method_spec.check is not None:
        method_spec.check(method, len(sites))
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
    run_dir.start()
    history = run_dir.records if resume else []
    if not resume:
        run_dir.write_config(settings)
    if history:
        model, info = load_checkpoint(run_dir.path / history[-1]["checkpoint"])
        prepared.splits.train.epoch = info["extra"].get("loader_epoch", 0)
        if "continue_from" in history[-1]:  # the method undid that stage: go on from this one
            stage = history[-1]["continue_from"]
            source = next(r for r in history if r["stage"] == stage)
            model, _ = load_checkpoint(run_dir.path / source["checkpoint"])
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
                        teacher=_teacher(method, run_dir, prepared))
    distributed.barrier()  # rank 0 has written every checkpoint
    answer_model, _ = load_checkpoint(run_dir.path / result.answer["checkpoint"])
    folded_model, folded = fold_answer(answer_model, prepared.splits)
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


def _teacher(method, run_dir: RunDir, prepared: Prepared) -> nn.Module | None:
    """The run's dense model (its stage 0 checkpoint) when a training of `method` distills."""
    trainings = [value for value in vars(method).values() if isinstance(value, TrainConfig)]
    if not any(training.distill > 0 for training in trainings):
        return None
    teacher, _ = load_checkpoint(run_dir.checkpoint_path(0))
    return prepare_model(teacher, prepared.device, prepared.channels_last).eval()


def _autocast(config: ExperimentConfig, prepared: Prepared) -> torch.autocast:
    """bf16 autocast around a method when asked: training, evaluation and entropy counting then
    all see the same (bf16-computed) pre-activations. Folding and its checks stay float32."""
    return torch.autocast(prepared.device.type, dtype=torch.bfloat16, enabled=config.amp)


def fold_answer(model: nn.Module, splits: DataSplits, policy: str = "macs"
                ) -> tuple[nn.Module, dict]:
    """Fold `model` on a test batch and measure it: test top-1 of both, MACs, batch-1 latency."""
    example = next(iter(splits.test))[0].cpu()
    return measure_stage(model, example, policy=policy,
                         data=((x.cpu(), y.cpu()) for x, y in splits.test))


def _settings(cls: type, values: dict):
    """A settings dataclass from its config.json form (training schedules rebuilt)."""
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}
    return cls(**{key: TrainConfig(**value) if kinds.get(key) in ("TrainConfig", TrainConfig)
                  else value for key, value in values.items()})


def resume_run(path: str | Path, *, progress: bool = True) -> MethodResult:
    """Continue the interrupted run in `path` with the settings it was started with."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise RunDirError(f"nothing to resume in {path}: it holds no run (no config.json)")
    settings = json.loads(config_path.read_text())
    name = settings.get("method")
    try:
        spec = get_method(name)
    except ConfigError:
        raise RunDirError(f"{path} holds a run of unknown method {name!r}") from None
    config = _settings(ExperimentConfig, {**settings["experiment"], "progress": progress})
    method = _settings(spec.config, settings[name])
    return _run_method(config, spec, method, path, overwrite=False, resume=True)
