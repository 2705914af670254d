"""One experiment, end to end: data, dense model, a method's stages, run directory, summary.

This is the Python API behind the CLI: `run_easier(ExperimentConfig(...), EasierConfig(...))`,
`run_pruning(ExperimentConfig(...), "nepenthe" | "egp" | "imp", PruningConfig(...))`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from depthcut import distributed
from depthcut.data import DataSplits, load_dataset, make_splits
from depthcut.errors import ConfigError
from depthcut.external import is_external
from depthcut.faults import die_at
from depthcut.measure import measure_stage
from depthcut.memory_format import MemoryFormat, choose_memory_format
from depthcut.methods.dense_longer import DenseLongerConfig, dense_longer
from depthcut.methods.easier import EasierConfig, easier
from depthcut.methods.imp import imp
from depthcut.methods.layer_folding import LayerFoldingConfig, layer_folding
from depthcut.methods.nepenthe import egp, nepenthe
from depthcut.methods.progressive import ProgressiveConfig, progressive
from depthcut.methods.rounds import PruningConfig
from depthcut.models import ModelSpec, count_parameters, default_activation
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
from depthcut.stages import MethodResult, StageRecord, check_metric
from depthcut.text import TEXT_DATASETS, is_text
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
        config.dataset, config.data_root, cache_dir=config.cache_dir, progress=config.progress
    )
    # A text dataset's byte tokens need the sequence model, built for its vocabulary, length
    # and padding id (kept in the spec, so checkpoints rebuild the same model).
    sequence = {}
    if is_text(dataset):
        if config.model != "transformer":
            raise ConfigError(f"{dataset.name} holds byte tokens, not images: use --model "
                              f"transformer (got {config.model!r})")
        sequence = {"vocab_size": dataset.vocab_size, "max_len": dataset.seq_len,
                    "pad_id": dataset.pad_id}
    elif config.model == "transformer":
        raise ConfigError(f"the transformer reads token ids, {dataset.name} holds images: use a "
                          f"text dataset ({', '.join(TEXT_DATASETS)}) or an image model")
    elif is_external(config.model):  # built for the dataset's image size (a ViT's img_size)
        sequence = {"image_size": dataset.image_size}
    spec = ModelSpec(
        name=config.model,
        num_classes=dataset.num_classes,
        in_channels=dataset.in_channels,
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
    if splits is not None:
        origin["loader_epoch"] = splits.train.epoch
    return origin


# A method's runner: (model, splits, its config, *, dense_record, history, on_stage, progress,
# snapshots) -> MethodResult, as `depthcut.stages.run_stages` takes them.
Runner = Callable[..., MethodResult]

# Every method a run can use, by the name its records and config.json carry: its settings
# class and its runner. Adding a method is one line here (and one in the CLI's method table).
METHODS: dict[str, tuple[type, Runner]] = {
    "easier": (EasierConfig, easier),
    "nepenthe": (PruningConfig, nepenthe),
    "egp": (PruningConfig, egp),
    "imp": (PruningConfig, imp),
    "layer_folding": (LayerFoldingConfig, layer_folding),
    "progressive": (ProgressiveConfig, progressive),
    "dense_longer": (DenseLongerConfig, dense_longer),
}


def run_easier(
    config: ExperimentConfig, method: EasierConfig, out: str | Path, *, overwrite: bool = False,
    resume: bool = False,
) -> MethodResult:
    """Train (or load) the dense model, run EASIER, write records, checkpoints and summary."""

    def check(prepared: Prepared) -> None:
        sites = len(find_sites(prepared.dense_model or prepared.spec.build()))
        if method.k > sites:
            raise ConfigError(f"k={method.k} sites per stage, but the model has only {sites} "
                              "sites left to linearize")

    return _run_method(config, "easier", method, out, overwrite, resume, check)


def run_layer_folding(
    config: ExperimentConfig, method: LayerFoldingConfig, out: str | Path, *,
    overwrite: bool = False, resume: bool = False,
) -> MethodResult:
    """Train (or load) the dense model, run the Layer Folding baseline, write the run."""
    return _run_method(config, "layer_folding", method, out, overwrite, resume)


def run_progressive(
    config: ExperimentConfig, method: ProgressiveConfig, out: str | Path, *,
    overwrite: bool = False, resume: bool = False,
) -> MethodResult:
    """Train (or load) the dense model, run progressive linearization, write the run."""
    return _run_method(config, "progressive", method, out, overwrite, resume)


def run_dense_longer(
    config: ExperimentConfig, finetune: TrainConfig, chunks: int, out: str | Path, *,
    overwrite: bool = False, resume: bool = False,
) -> MethodResult:
    """The fair-compute reference: keep training the dense model in `chunks` runs of the
    methods' finetune schedule, recording test top-1 after each (no site removed)."""
    method = DenseLongerConfig(finetune=finetune, chunks=chunks)
    return _run_method(config, "dense_longer", method, out, overwrite, resume)


PRUNING_METHODS = ("nepenthe", "egp", "imp")
# EASIER with other settings, as `compare` runs them beside plain EASIER (same dense model).
EASIER_VARIANTS = {"easier-k2": {"k": 2}, "easier-payoff": {"choose": "payoff"}}
COMPARABLE = ("easier", *EASIER_VARIANTS, *PRUNING_METHODS, "layer-folding", "progressive")


def run_comparison(
    config: ExperimentConfig, methods: Sequence[str], out: str | Path, *,
    easier_config: EasierConfig, pruning_config: PruningConfig,
    folding_config: LayerFoldingConfig, progressive_config: ProgressiveConfig | None = None,
    fair_reference: bool = True, overwrite: bool = False,
) -> Path:
    """Train the dense model once (inside the first run), run every method from it into
    `out/<method>`, the fair-compute reference into `out/dense_longer`, and the report into
    `out/report`. Layer Folding linearizes as many sites as EASIER's answer when k is unset."""
    unknown = [m for m in methods if m not in COMPARABLE]
    if unknown or not methods:
        raise ConfigError(f"unknown or no methods {unknown}; choose from "
                          f"{', '.join(COMPARABLE)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {EasierConfig: easier_config, PruningConfig: pruning_config,
                LayerFoldingConfig: folding_config,
                ProgressiveConfig: progressive_config or ProgressiveConfig()}
    dirs: list[Path] = []
    answers: dict[str, Mapping] = {}
    for method in methods:
        run_config = config
        if dirs:
            run_config = dataclasses.replace(
                config, dense_checkpoint=str(dirs[0] / "checkpoints" / "stage_00.pt"))
        name = "easier" if method in EASIER_VARIANTS else method.replace("-", "_")
        method_config = settings[METHODS[name][0]]
        if method in EASIER_VARIANTS:
            method_config = dataclasses.replace(method_config, **EASIER_VARIANTS[method])
        if name == "layer_folding" and method_config.k is None and "easier" in answers:
            method_config = dataclasses.replace(
                method_config, k=answers["easier"]["sites_linearized"])
        if name == "easier":  # with its check of k against the model
            result = run_easier(run_config, method_config, out / method, overwrite=overwrite)
        else:
            result = _run_method(run_config, name, method_config, out / method, overwrite)
        answers[method] = result.answer
        dirs.append(out / method)
    if fair_reference:
        dense_epochs = read_records(dirs[0])[0].get("total_epochs", 0)
        extra = max(a.get("total_epochs", 0) - dense_epochs for a in answers.values())
        chunk = max(easier_config.finetune.epochs, 1)
        chunks = max(1, math.ceil(extra / chunk))
        run_dense_longer(dataclasses.replace(
            config, dense_checkpoint=str(dirs[0] / "checkpoints" / "stage_00.pt")),
            # The reference is plain training: no distillation even where the methods use it.
            dataclasses.replace(easier_config.finetune, distill=0.0), chunks,
            out / "dense_longer", overwrite=overwrite)
        dirs.append(out / "dense_longer")
    return build_report(dirs, out / "report", progress=config.progress)


def run_pruning(
    config: ExperimentConfig, method_name: str, method: PruningConfig, out: str | Path, *,
    overwrite: bool = False, resume: bool = False,
) -> MethodResult:
    """Train (or load) the dense model, run NEPENTHE, EGP or IMP rounds, write the run."""
    if method_name not in PRUNING_METHODS:
        raise ConfigError(f"unknown pruning method {method_name!r}; choose one of "
                          f"{', '.join(PRUNING_METHODS)}")
    return _run_method(config, method_name, method, out, overwrite, resume)


def _run_method(config: ExperimentConfig, name: str, method, out: str | Path, overwrite: bool,
                resume: bool = False, check: Callable[[Prepared], None] | None = None
                ) -> MethodResult:
    """What every method shares: run directory, dense stage 0, per-stage records and
    checkpoints, the folded answer, and the summary. Every input is checked (data, dense
    checkpoint, `check(prepared)`) before anything is written. With `resume`, the stages in
    the run directory are kept and the method goes on from the last one (and from the last
    finished epoch of the stage that was interrupted)."""
    run_start = time.perf_counter()
    run_dir = RunDir(out, overwrite=overwrite, resume=resume)
    settings = {"method": name, "experiment": config.to_dict(), name: dataclasses.asdict(method)}
    prepared = prepare(config)
    find_sites(prepared.dense_model or prepared.spec.build())  # model errors before any write
    if check is not None:
        check(prepared)
    settings["memory_format"] = prepared.memory_format.to_dict()
    # The shape of one input image (a text's token count): the report times stages at it.
    settings["input_shape"] = list(prepared.splits.dataset.test_images.shape[1:])
    if is_text(prepared.splits.dataset):
        text = prepared.splits.dataset
        settings["text"] = {"seq_len": text.seq_len, "vocab_size": text.vocab_size,
                            "pad_id": text.pad_id, "classes": text.classes,
                            "train_texts": len(text.train_images),
                            "test_texts": len(text.test_images),
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

    runner = METHODS[name][1]
    with _autocast(config, prepared):
        result = runner(model, prepared.splits, method, dense_record=dense,
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
    if name not in METHODS:
        raise RunDirError(f"{path} holds a run of unknown method {name!r}")
    config = _settings(ExperimentConfig, {**settings["experiment"], "progress": progress})
    method = _settings(METHODS[name][0], settings[name])
    if name == "easier":
        return run_easier(config, method, path, resume=True)
    return _run_method(config, name, method, path, overwrite=False, resume=True)
