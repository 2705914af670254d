"""One experiment, end to end: data, dense model, a method's stages, run directory, summary.

This is the Python API behind the CLI: `run_easier(ExperimentConfig(...), EasierConfig(...))`,
`run_pruning(ExperimentConfig(...), "nepenthe" | "egp" | "imp", PruningConfig(...))`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from depthcut import distributed
from depthcut.data import DataSplits, load_dataset, make_splits
from depthcut.faults import die_at
from depthcut.fold import fold, median_seconds
from depthcut.memory_format import MemoryFormat, choose_memory_format
from depthcut.methods.easier import EasierConfig, EasierResult, MethodResult, easier
from depthcut.methods.imp import imp
from depthcut.methods.layer_folding import LayerFoldingConfig, LayerFoldingResult, layer_folding
from depthcut.methods.nepenthe import egp, nepenthe
from depthcut.methods.rounds import PruningConfig, PruningResult
from depthcut.models import ModelSpec, count_parameters, default_activation
from depthcut.reports import stage_table, summary_markdown
from depthcut.run import (
    RunDir,
    RunDirError,
    load_checkpoint,
    save_checkpoint,
    save_folded,
    write_json,
)
from depthcut.sites import find_sites
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
    dataset = load_dataset(
        config.dataset, config.data_root, cache_dir=config.cache_dir, progress=config.progress
    )
    spec = ModelSpec(
        name=config.model,
        num_classes=dataset.num_classes,
        in_channels=dataset.in_channels,
        width=config.width,
        activation=config.activation or default_activation(config.model),
    )
    dense, info = None, None
    if config.dense_checkpoint:
        dense, info = load_checkpoint(config.dense_checkpoint)
        mismatched = [f"{key} {getattr(info['spec'], key)} (asked: {getattr(spec, key)})"
                      for key in ("name", "num_classes", "in_channels", "width", "activation")
                      if getattr(info["spec"], key) != getattr(spec, key)]
        if mismatched:
            raise ValueError(
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
) -> tuple[nn.Module, dict, ModelSpec]:
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
    record = {
        "method": "dense",
        "stage": 0,
        "sites_total": len(sites) + len(linearized),
        "sites_linearized": len(linearized),
        "linearized": list(linearized),
        "chosen": [],
        "entropy": {},
        "val_top1": evaluate(model, splits.val) if splits.val is not None else None,
        "test_top1": evaluate(model, splits.test),
        "drop": 0.0,
        "within_delta": True,
        "epochs": epochs,
        "total_epochs": trained,
        "parameters": count_parameters(model),
        "seconds": time.perf_counter() - start,
    }
    record["checkpoint"] = str(run.checkpoint_path(0).relative_to(run.path))
    save_checkpoint(run.checkpoint_path(0), model, spec, linearized,
                    _origin(config, record, splits))
    run.add_record(record)
    return model, record, spec


def _origin(config: ExperimentConfig, record: dict, splits: DataSplits | None = None) -> dict:
    """What a checkpoint keeps about where it came from: the data (for `depthcut entropy`),
    its record, and the training loader's epoch counter (to resume batch for batch)."""
    origin = {"dataset": config.dataset, "data_root": config.data_root, "record": record}
    if splits is not None:
        origin["loader_epoch"] = splits.train.epoch
    return origin


@dataclass
class Stages:
    """What a method loop gets from the run: stages already done (when resuming), the callback
    that records each new stage, and epoch-level snapshots for its training calls."""

    history: list[dict]
    on_stage: Callable[[dict, nn.Module], None]
    snapshots: Callable[[str], object]


def run_easier(
    config: ExperimentConfig, method: EasierConfig, out: str | Path, *, overwrite: bool = False,
    resume: bool = False,
) -> EasierResult:
    """Train (or load) the dense model, run EASIER, write records, checkpoints and summary."""

    def run(model: nn.Module, splits: DataSplits, dense: dict, stages: Stages) -> EasierResult:
        return easier(model, splits, method, dense_record=dense, history=stages.history,
                      on_stage=stages.on_stage, progress=config.progress,
                      snapshots=stages.snapshots)

    def check(prepared: Prepared) -> None:
        sites = len(find_sites(prepared.dense_model or prepared.spec.build()))
        if method.k > sites:
            raise ValueError(f"k={method.k} sites per stage, but the model has only {sites} "
                             "sites left to linearize")

    rule = f"delta {method.delta} top-1 points (validation split)"
    return _run_method(config, "easier", method, run, rule, out, overwrite, check, resume)


def run_layer_folding(
    config: ExperimentConfig, method: LayerFoldingConfig, out: str | Path, *,
    overwrite: bool = False, resume: bool = False,
) -> LayerFoldingResult:
    """Train (or load) the dense model, run the Layer Folding baseline, write the run."""

    def run(model: nn.Module, splits: DataSplits, dense: dict,
            stages: Stages) -> LayerFoldingResult:
        return layer_folding(model, splits, method, dense_record=dense, history=stages.history,
                             on_stage=stages.on_stage, progress=config.progress,
                             snapshots=stages.snapshots)

    rule = (f"linearize the {method.k} sites with slope closest to 1" if method.k is not None
            else f"linearize sites with slope >= {method.threshold}")
    return _run_method(config, "layer_folding", method, run, rule, out, overwrite,
                       resume=resume)


def run_dense_longer(
    config: ExperimentConfig, finetune: TrainConfig, chunks: int, out: str | Path, *,
    overwrite: bool = False, resume: bool = False,
):
    """The fair-compute reference: keep training the dense model in `chunks` runs of the
    methods' finetune schedule, recording test top-1 after each (no site removed)."""
    if chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")

    def run(model: nn.Module, splits: DataSplits, dense: dict, stages: Stages) -> MethodResult:
        records = [dense, *stages.history]
        total = records[-1].get("total_epochs", 0)
        for chunk in range(records[-1]["stage"] + 1, chunks + 1):
            start = time.perf_counter()
            fit = train(model, splits.train, finetune, progress=config.progress,
                        desc=f"dense chunk {chunk}",
                        checkpointing=stages.snapshots(f"dense chunk {chunk}"))
            total += finetune.epochs
            val = evaluate(model, splits.val) if splits.val is not None else None
            record = {
                "method": "dense_longer", "stage": chunk, "sites_total": dense["sites_total"],
                "sites_linearized": len(dense.get("linearized", [])),
                "linearized": list(dense.get("linearized", [])), "chosen": [], "entropy": {},
                "val_top1": val, "test_top1": evaluate(model, splits.test),
                "drop": (dense["val_top1"] - val) if val is not None else None,
                "within_delta": True, "epochs": finetune.epochs, "total_epochs": total,
                "train_loss": fit.epochs[-1].loss if fit.epochs else None,
                "seconds": time.perf_counter() - start,
            }
            records.append(record)
            stages.on_stage(record, model)
        return MethodResult(records=records, answer=records[-1],
                            stop_reason=f"{chunks} chunks trained", model=model)

    settings = {"finetune": dataclasses.asdict(finetune), "chunks": chunks}
    return _run_method(config, "dense_longer", settings, run,
                       "none (reference: no site removed)", out, overwrite, resume=resume)


PRUNING_METHODS = ("nepenthe", "egp", "imp")
COMPARABLE = ("easier", "easier-k2", *PRUNING_METHODS, "layer-folding")


def run_comparison(
    config: ExperimentConfig, methods: Sequence[str], out: str | Path, *,
    easier_config: EasierConfig, pruning_config: PruningConfig,
    folding_config: LayerFoldingConfig, fair_reference: bool = True, overwrite: bool = False,
) -> Path:
    """Train the dense model once (inside the first run), run every method from it into
    `out/<method>`, the fair-compute reference into `out/dense_longer`, and the report into
    `out/report`. Layer Folding linearizes as many sites as EASIER's answer when k is unset."""
    from depthcut.compare import build_report

    unknown = [m for m in methods if m not in COMPARABLE]
    if unknown or not methods:
        raise ValueError(f"unknown or no methods {unknown}; choose from {', '.join(COMPARABLE)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dirs: list[Path] = []
    answers: dict[str, dict] = {}
    for method in methods:
        run_config = config
        if dirs:
            run_config = dataclasses.replace(
                config, dense_checkpoint=str(dirs[0] / "checkpoints" / "stage_00.pt"))
        target = out / method
        if method in ("easier", "easier-k2"):
            k = 2 if method == "easier-k2" else easier_config.k
            result = run_easier(run_config, dataclasses.replace(easier_config, k=k), target,
                                overwrite=overwrite)
        elif method in PRUNING_METHODS:
            result = run_pruning(run_config, method, pruning_config, target, overwrite=overwrite)
        else:
            k = folding_config.k
            if k is None and "easier" in answers:
                k = answers["easier"]["sites_linearized"]
            result = run_layer_folding(run_config, dataclasses.replace(folding_config, k=k),
                                       target, overwrite=overwrite)
        answers[method] = result.answer
        dirs.append(target)
    if fair_reference:
        dense_epochs = _dense_epochs(dirs[0])
        extra = max(a.get("total_epochs", 0) - dense_epochs for a in answers.values())
        chunk = max(easier_config.finetune.epochs, 1)
        chunks = max(1, math.ceil(extra / chunk))
        run_dense_longer(dataclasses.replace(
            config, dense_checkpoint=str(dirs[0] / "checkpoints" / "stage_00.pt")),
            easier_config.finetune, chunks, out / "dense_longer", overwrite=overwrite)
        dirs.append(out / "dense_longer")
    return build_report(dirs, out / "report", progress=config.progress)


def _dense_epochs(run_dir: Path) -> int:
    from depthcut.run import read_records

    return read_records(run_dir)[0].get("total_epochs", 0)


def run_pruning(
    config: ExperimentConfig, method_name: str, method: PruningConfig, out: str | Path, *,
    overwrite: bool = False, resume: bool = False,
) -> PruningResult:
    """Train (or load) the dense model, run NEPENTHE, EGP or IMP rounds, write the run."""
    runners = {"nepenthe": nepenthe, "egp": egp, "imp": imp}
    if method_name not in runners:
        raise ValueError(f"unknown pruning method {method_name!r}; choose one of "
                         f"{', '.join(PRUNING_METHODS)}")

    def run(model: nn.Module, splits: DataSplits, dense: dict, stages: Stages) -> PruningResult:
        return runners[method_name](model, splits, method, dense_record=dense,
                                    history=stages.history, on_round=stages.on_stage,
                                    progress=config.progress, snapshots=stages.snapshots)

    rule = method.describe("theta" if method_name == "nepenthe" else "delta")
    return _run_method(config, method_name, method, run, rule, out, overwrite, resume=resume)


def _run_method(config: ExperimentConfig, name: str, method, run, rule: str,
                out: str | Path, overwrite: bool, check=None, resume: bool = False):
    """What every method shares: run directory, dense stage 0, per-stage records and
    checkpoints, the folded answer, and the summary. Every input is checked (data, dense
    checkpoint, `check(prepared)`) before anything is written. With `resume`, the stages in
    the run directory are kept and the method goes on from the last one (and from the last
    finished epoch of the stage that was interrupted)."""
    run_start = time.perf_counter()
    run_dir = RunDir(out, overwrite=overwrite, resume=resume)
    settings = {"method": name, "experiment": config.to_dict(),
                name: method if isinstance(method, dict) else dataclasses.asdict(method)}
    prepared = prepare(config)
    find_sites(prepared.dense_model or prepared.spec.build())  # model errors before any write
    if check is not None:
        check(prepared)
    settings["memory_format"] = prepared.memory_format.to_dict()
    run_dir.start()
    history = run_dir.records if resume else []
    if not resume:
        run_dir.write_config(settings)
    if history:
        model, info = load_checkpoint(run_dir.path / history[-1]["checkpoint"])
        model = prepare_model(model, prepared.device, prepared.channels_last)
        prepared.splits.train.epoch = info["extra"].get("loader_epoch", 0)
        dense, spec = history[0], info["spec"]
        run_start -= history[-1].get("elapsed_s", 0.0)
    else:
        with _autocast(config, prepared):
            model, dense, spec = dense_model(config, prepared, run_dir)

    def on_stage(record: dict, stage_model: nn.Module) -> None:
        record["parameters"] = count_parameters(stage_model)
        record["elapsed_s"] = time.perf_counter() - run_start
        record["checkpoint"] = str(run_dir.checkpoint_path(record["stage"])
                                   .relative_to(run_dir.path))
        save_checkpoint(run_dir.checkpoint_path(record["stage"]), stage_model, spec,
                        record["linearized"], _origin(config, record, prepared.splits),
                        silenced=record.get("silenced", ()))
        run_dir.add_record(record)
        die_at("stage-end")
        if config.progress:
            print(stage_table([record], header=record["stage"] == 1), flush=True)

    stages = Stages(history=history[1:], on_stage=on_stage, snapshots=run_dir.snapshot)
    with _autocast(config, prepared):
        result = run(model, prepared.splits, dense, stages)
    distributed.barrier()  # rank 0 has written every checkpoint
    answer_model, _ = load_checkpoint(run_dir.path / result.answer["checkpoint"])
    folded_model, folded = fold_and_measure(answer_model, prepared.splits)
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
            rule=rule,
            folded=folded,
        )
    )
    return result


def _autocast(config: ExperimentConfig, prepared: Prepared) -> torch.autocast:
    """bf16 autocast around a method when asked: training, evaluation and entropy counting then
    all see the same (bf16-computed) pre-activations. Folding and its checks stay float32."""
    return torch.autocast(prepared.device.type, dtype=torch.bfloat16, enabled=config.amp)


def fold_and_measure(model: nn.Module, splits: DataSplits, policy: str = "macs",
                     latency_repeats: int = 30) -> tuple[nn.Module, dict]:
    """Fold `model` on a test batch and measure it: test top-1 of both, MACs, batch-1 latency."""
    model = model.cpu().eval()
    example = next(iter(splits.test))[0].cpu()
    folded = fold(model, example, policy, data=((x.cpu(), y.cpu()) for x, y in splits.test))
    report = folded.fold_report
    one = example[:1]
    latency = {
        name: 1e3 * median_seconds(lambda m=m: m(one), repeats=latency_repeats)
        for name, m in (("unfolded", model), ("folded", folded))
    }
    batch = len(example)
    return folded, {
        "policy": policy,
        "top1_unfolded": report.top1_unfolded,
        "top1_folded": report.top1_folded,
        "agreement": report.agreement,
        "exact": report.exact,
        "max_abs_diff": report.max_abs_diff,
        "relative_error": report.relative_error,
        "macs_unfolded": report.macs_before // batch,
        "macs_folded": report.macs_after // batch,
        "params_unfolded": report.params_before,
        "params_folded": report.params_after,
        "ops_unfolded": report.ops_before,
        "ops_folded": report.ops_after,
        "depth_unfolded": report.depth_before,
        "depth_folded": report.depth_after,
        "latency_ms_batch1_unfolded": latency["unfolded"],
        "latency_ms_batch1_folded": latency["folded"],
        "merges_taken": sum(m.taken for m in report.merges),
    }


def _train_config(values: dict) -> TrainConfig:
    return TrainConfig(**{**values, "milestones": tuple(values.get("milestones", ()))})


def resume_run(path: str | Path, *, progress: bool = True):
    """Continue the interrupted run in `path` with the settings it was started with."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise RunDirError(f"nothing to resume in {path}: it holds no run (no config.json)")
    settings = json.loads(config_path.read_text())
    name = settings.get("method")
    experiment = dict(settings["experiment"])
    experiment["dense"] = _train_config(experiment["dense"])
    experiment["progress"] = progress
    config = ExperimentConfig(**experiment)
    method = dict(settings[name])
    if name == "easier":
        method["finetune"] = _train_config(method["finetune"])
        return run_easier(config, EasierConfig(**method), path, resume=True)
    if name in PRUNING_METHODS:
        method["finetune"] = _train_config(method["finetune"])
        return run_pruning(config, name, PruningConfig(**method), path, resume=True)
    if name == "layer_folding":
        method["finetune"] = _train_config(method["finetune"])
        method["slope_training"] = _train_config(method["slope_training"])
        return run_layer_folding(config, LayerFoldingConfig(**method), path, resume=True)
    if name == "dense_longer":
        return run_dense_longer(config, _train_config(method["finetune"]), method["chunks"],
                                path, resume=True)
    raise RunDirError(f"{path} holds a run of unknown method {name!r}")
