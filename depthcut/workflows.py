"""Work on saved models: the API behind `depthcut entropy`, `depthcut fold` and `depthcut heal`.

    report = entropy_report("run/checkpoints/stage_03.pt", samples=1000)
    print(report.text())
    result = fold_checkpoint("run/checkpoints/stage_03.pt", "folded.pt", policy="all")
    healed = heal("folded.pt", "healed.pt", epochs=1)
    imported = import_model("mynet.py:MyNet", "weights.pt", "mynet.pt", dataset="cifar10",
                            data_root="data")

Each function loads the model, the dataset it was trained on (unless `dataset` and `data_root`
name another), does its work and returns a small result whose `text()` is what the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from depthcut.cost import DEFAULT_TIMER, get_timer
from depthcut.data import (
    ArrayDataset,
    BatchLoader,
    input_shape_mismatch,
    load_dataset,
    make_splits,
)
from depthcut.entropy import SiteCounts, count_states
from depthcut.errors import ConfigError
from depthcut.experiment import ExperimentConfig, absolute_paths, prepare
from depthcut.export import export_onnx
from depthcut.fold import FoldReport, LatencyPolicy, fold
from depthcut.reports import entropy_table
from depthcut.run import check_writable, load_checkpoint, load_folded, save_checkpoint, save_folded
from depthcut.sites import find_sites
from depthcut.train import TrainConfig, evaluate, resolve_device, seed_everything, train

__all__ = ["EntropyReport", "FoldResult", "HealResult", "ImportResult", "PlanResult",
           "entropy_report", "fold_checkpoint", "heal", "import_model", "plan_checkpoint"]


@dataclass
class EntropyReport:
    """Per-site sign counts of a checkpoint on `images` images of a dataset split."""

    checkpoint: Path
    model: str  # the model's name and width, e.g. "resnet18 x0.25"
    linearized: list[str]
    dataset: str
    split: str
    images: int
    counts: dict[str, SiteCounts | None]

    def header(self) -> str:
        return (f"{self.checkpoint}: {self.model}, {len(self.linearized)} site(s) linearized; "
                f"{self.images} images of the {self.dataset} {self.split} split")

    def table(self) -> str:
        return entropy_table(self.counts)

    def text(self) -> str:
        return f"{self.header()}\n{self.table()}"


@dataclass
class FoldResult:
    """A checkpoint folded and saved to `out` (and `onnx`, when exported)."""

    checkpoint: Path
    out: Path
    module: nn.Module  # the folded torch.fx GraphModule
    report: FoldReport
    model: str
    linearized: list[str]
    dataset: str
    images: int  # test images the report's agreement and top-1 were measured on
    onnx: dict | None = None  # export_onnx's {"path", "checked", "max_abs_diff"}
    latency_timer: str | None = None  # policy "latency": the backend it timed merges on

    def text(self) -> str:
        lines = [
            f"{self.checkpoint}: {self.model}, {len(self.linearized)} site(s) linearized; "
            f"checked on {self.images} {self.dataset} test images",
            self.report.markdown(),
            f"\nFolded model saved to {self.out}",
        ]
        if self.latency_timer is not None:
            lines.append(f"Merges timed on {self.latency_timer}.")
        if not self.report.exact:
            lines.append("Border-approximate merges changed the function near image borders; "
                         f"`depthcut heal --folded {self.out} --out HEALED.pt` finetunes it "
                         "briefly.")
        if self.onnx is not None:
            checked = (f"checked with onnxruntime: max |onnx - torch| "
                       f"{self.onnx['max_abs_diff']:.3g}" if self.onnx["checked"]
                       else "not checked (onnxruntime not installed)")
            lines.append(f"ONNX written to {self.onnx['path']}; {checked}")
        return "\n".join(lines)


@dataclass
class HealResult:
    """A folded model finetuned briefly and saved to `out`; test top-1 before and after."""

    folded: Path
    out: Path
    module: nn.Module
    epochs: int
    lr: float
    top1_before: float
    top1_after: float
    top1_unfolded: float | None = None  # of the model before folding, from the fold report
    extra: dict = field(default_factory=dict)

    def text(self) -> str:
        unfolded = ("" if self.top1_unfolded is None
                    else f" (unfolded model: {self.top1_unfolded:.2f})")
        return (f"{self.folded}: test top-1 of the folded model {self.top1_before:.2f} before "
                f"heal, {self.top1_after:.2f} after {self.epochs} epoch(s) at lr {self.lr}"
                f"{unfolded}\nHealed model saved to {self.out}")


@dataclass
class ImportResult:
    """The user's model and weights saved as a depthcut checkpoint at `out`."""

    out: Path
    model: str  # the name the checkpoint records (a model file's absolute path)
    weights: Path
    dataset: str
    test_top1: float
    reset: list[str]  # classifier keys --reset-head started afresh

    def text(self) -> str:
        reset = (f"; {', '.join(self.reset)} started afresh (--reset-head), so the top-1 is "
                 "that of an untrained head" if self.reset else "")
        return (f"{self.weights} loaded into {self.model}: test top-1 {self.test_top1:.2f} on "
                f"{self.dataset}{reset}\nCheckpoint saved to {self.out} (use it with "
                "`depthcut entropy|fold --checkpoint` or `--dense-checkpoint`)")


def _check_samples(samples: int | None) -> None:
    if samples is not None and samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")


def _model_name(info: dict) -> str:
    return f"{info['spec'].name} x{info['spec'].width}"


def _dataset_for(origin: dict, dataset: str | None, data_root: str | Path | None,
                 cache_dir: str | Path | None, progress: bool) -> ArrayDataset:
    """The dataset a model was trained on, unless `dataset` / `data_root` name another."""
    name = dataset or origin.get("dataset")
    root = data_root or origin.get("data_root")
    if not name or not root:
        raise ConfigError("the model names no dataset: pass --dataset and --data-root")
    if data_root is None and not Path(root).expanduser().exists():
        raise ConfigError(f"the model was trained on {name} data in {root}, which does not "
                          "exist (any more): pass --data-root to point to the dataset's place")
    # Its own data is loaded as it was trained on: a text file's field names, an image folder
    # at the same size (unless another dataset is named).
    own = name == origin.get("dataset")
    settings = origin.get("dataset_settings", {}) if own else {}
    size = origin.get("image_size") if own else None
    data = load_dataset(name, root, cache_dir=cache_dir, progress=progress, settings=settings,
                        image_size=size)
    mismatch = input_shape_mismatch(origin, data)
    if mismatch:
        raise ConfigError(f"the model was made at another {mismatch[0]}")
    return data


def _loader(images, labels, dataset: ArrayDataset, samples: int | None, batch_size: int,
            device) -> BatchLoader:
    if samples is not None:
        images, labels = images[:samples], labels[:samples]
    return BatchLoader(images, labels, batch_size=batch_size, device=device,
                       **dataset.batch_options(train=False))


def entropy_report(
    checkpoint: str | Path, *, dataset: str | None = None, data_root: str | Path | None = None,
    cache_dir: str | Path | None = None, split: str = "train", samples: int | None = None,
    batch_size: int = 512, device: str = "auto", progress: bool = True,
) -> EntropyReport:
    """Count the sign states of every site of a stage checkpoint on a split (no augmentation):
    on its first `samples` images, or all of them."""
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    _check_samples(samples)
    checkpoint = Path(checkpoint)
    model, info = load_checkpoint(checkpoint)
    torch_device = resolve_device(device)
    data = _dataset_for(info.get("extra", {}), dataset, data_root, cache_dir, progress)
    images, labels = ((data.train_inputs, data.train_labels) if split == "train"
                      else (data.test_inputs, data.test_labels))
    loader = _loader(images, labels, data, samples, batch_size, torch_device)
    model.to(torch_device)
    counts = count_states(model, loader, find_sites(model), progress=progress)
    return EntropyReport(checkpoint=checkpoint, model=_model_name(info),
                         linearized=list(info.get("linearized", [])), dataset=data.name,
                         split=split, images=len(loader.inputs), counts=dict(counts))


def fold_checkpoint(
    checkpoint: str | Path, out: str | Path, *, policy: str = "macs", export: str | None = None,
    dataset: str | None = None, data_root: str | Path | None = None,
    cache_dir: str | Path | None = None, samples: int | None = None, batch_size: int = 128,
    device: str = "cpu", progress: bool = True, latency_backend: str = DEFAULT_TIMER,
) -> FoldResult:
    """Fold a stage checkpoint under `policy`, check it on the test split (its first `samples`
    images, or all), save it to `out`; with `export="onnx"`, also write `out` with suffix .onnx.
    Policy "latency" times merges on `latency_backend` (a `depthcut.cost` timer's name)."""
    if export not in (None, "onnx"):
        raise ConfigError(f"export must be 'onnx' or None, got {export!r}")
    _check_samples(samples)
    checkpoint, out = Path(checkpoint), Path(out)
    check_writable(out, folder=False)
    model, info = load_checkpoint(checkpoint)
    torch_device = resolve_device(device)
    data = _dataset_for(info.get("extra", {}), dataset, data_root, cache_dir, progress)
    loader = _loader(data.test_inputs, data.test_labels, data, samples, batch_size,
                     torch_device)
    example = next(iter(loader))[0]
    timer = get_timer(latency_backend)
    chosen = LatencyPolicy(timer=timer) if policy == LatencyPolicy.name else policy
    folded = fold(model.to(torch_device), example, chosen, data=loader)
    linearized = list(info.get("linearized", []))
    extra = {**info.get("extra", {}), "source": str(checkpoint), "linearized": linearized,
             "spec": info["spec"].to_dict()}
    save_folded(out, folded, extra)
    exported = None
    if export == "onnx":
        exported = export_onnx(folded, example[:1].cpu(), out.with_suffix(".onnx"))
    return FoldResult(checkpoint=checkpoint, out=out, module=folded,
                      report=folded.fold_report, model=_model_name(info),
                      linearized=linearized, dataset=data.name, images=len(loader.inputs),
                      onnx=exported,
                      latency_timer=timer.describe() if chosen is not policy else None)


def heal(
    folded: str | Path, out: str | Path, *, epochs: int = 1, lr: float = 0.001,
    weight_decay: float = 5e-4, train_subset: int | None = None, seed: int = 0,
    dataset: str | None = None, data_root: str | Path | None = None,
    cache_dir: str | Path | None = None, samples: int | None = None, batch_size: int = 128,
    device: str = "cpu", progress: bool = True,
) -> HealResult:
    """Finetune a folded model (from `fold_checkpoint`) briefly on its training split, e.g. to
    mend border-approximate merges; evaluate on the test split (its first `samples` images, or
    all) before and after; save it to `out`. A small `lr`: a folded model has no BatchNorm left
    to steady training."""
    config = TrainConfig(epochs=epochs, lr=lr, weight_decay=weight_decay)
    _check_samples(samples)
    folded, out = Path(folded), Path(out)
    check_writable(out, folder=False)
    module, info = load_folded(folded)
    torch_device = resolve_device(device)
    data = _dataset_for(info.get("extra", {}), dataset, data_root, cache_dir, progress)
    splits = make_splits(data, val_fraction=0.0, train_subset=train_subset,
                         batch_size=batch_size, seed=seed, device=torch_device)
    test = _loader(data.test_inputs, data.test_labels, data, samples, batch_size, torch_device)
    module.to(torch_device)
    before = evaluate(module, test)
    seed_everything(seed)
    train(module, splits.train, config, progress=progress, desc="heal")
    module.eval()
    after = evaluate(module, test)
    unfolded = (info.get("report") or {}).get("top1_unfolded")
    extra = {**info.get("extra", {}), "heal": {"epochs": epochs, "lr": lr,
                                               "top1_before": before, "top1_after": after}}
    module.fold_report = None
    save_folded(out, module, extra)
    return HealResult(folded=folded, out=out, module=module, epochs=epochs, lr=lr,
                      top1_before=before, top1_after=after, top1_unfolded=unfolded, extra=extra)


def import_model(
    model: str, weights: str | Path, out: str | Path, *, dataset: str,
    data_root: str | Path, cache_dir: str | Path | None = None, width: float = 0.25,
    activation: str | None = None, reset_head: bool = False, batch_size: int = 128,
    device: str = "cpu", progress: bool = True,
) -> ImportResult:
    """Load `weights` (a state_dict file) into `model` (any --model name, e.g. your own
    `mynet.py:MyNet`) built for `dataset`, strictly as a run does, evaluate it on the test split
    and save it as a depthcut checkpoint at `out`: the dense model for `entropy`, `fold` and
    `--dense-checkpoint`. `width` and `activation` matter to depthcut's own architectures only
    (give those the run's values)."""
    config = absolute_paths(ExperimentConfig(
        dataset=dataset, data_root=str(Path(data_root).expanduser().resolve()),
        cache_dir=None if cache_dir is None else str(cache_dir), model=model, width=width,
        activation=activation, weights=str(weights), reset_head=reset_head, val_fraction=0.0,
        batch_size=batch_size, device=device, progress=progress))
    prepared = prepare(config)
    imported = prepared.initial_model.to(prepared.device).eval()
    top1 = evaluate(imported, prepared.splits.test)
    origin = {"dataset": config.dataset, "data_root": config.data_root,
              "weights": config.weights, "reset_head": prepared.reset_keys,
              "record": {"stage": 0, "test_top1": top1, "total_epochs": 0}}
    out = Path(out)
    save_checkpoint(out, imported, prepared.spec, [], origin)
    return ImportResult(out=out, model=prepared.spec.name, weights=Path(config.weights),
                        dataset=prepared.splits.dataset.name, test_top1=top1,
                        reset=prepared.reset_keys)


@dataclass
class PlanResult:
    """`--choose dp`'s plan for a checkpoint, without training: the sites it would linearize,
    the table's predicted latency ratio, and (measured) the whole folded models' ratio."""

    checkpoint: Path
    model: str
    plan: dict  # the scorer's "dp" record
    cost: dict  # its "dp_cost" record: table hits, misses, seconds
    measured_ratio: float | None = None
    measured_ms: dict = field(default_factory=dict)  # dense and planned, folded as planned

    def text(self) -> str:
        plan = self.plan
        lines = [f"{self.checkpoint}: {self.model}; latency budget {plan['budget']:g} of the "
                 f"BN-folded dense model on {plan['backend']} at batch {plan['batch']}",
                 f"latency table {self.cost['table']}: {self.cost['hits']} entries read, "
                 f"{self.cost['misses']} timed, {self.cost['seconds']:.1f} s",
                 f"plan: linearize {len(plan['sites'])} site(s), keep {len(plan['kept'])}; "
                 + {"entropy": f"entropy removed {plan['removed']:.3f} bits",
                    "finetune": f"loss added {plan['removed']:.3f} (short finetunes)"}.get(
                     plan["importance"], f"{plan['importance']} worth removed "
                     f"{plan['removed']:.3f}")
                 + ("" if plan["within_budget"] else " (no plan meets the budget: the fastest)"),
                 "  " + (", ".join(plan["sites"]) or "(none)"),
                 "segments (merged form, linear sites inside, ms):"]
        lines += [f"  {s['from']} -> {s['to']}: {s['merge']}, {s['linear']}, {s['ms']:.3f}"
                  for s in plan["segments"] if s["linear"]]
        lines.append(f"predicted latency ratio {plan['predicted_ratio']:.3f} (dense estimate "
                     f"{plan['dense_ms']:.2f} ms)")
        if plan.get("checked_plans"):
            lines.append(f"the plan measured whole while planning: {plan['measured_ratio']:.3f} "
                         f"of dense ({plan['checked_plans']} plan(s) measured, the budget "
                         "tightened after each miss)")
        if self.measured_ratio is not None:
            lines.append(f"measured latency ratio {self.measured_ratio:.3f} (whole folded "
                         f"models: dense {self.measured_ms['dense']:.2f} ms, planned "
                         f"{self.measured_ms['planned']:.2f} ms)")
        return "\n".join(lines)


def plan_checkpoint(
    checkpoint: str | Path, *, latency_budget: float, latency_backend: str = "eager",
    latency_batch: int = 1, dp_span: int | None = None, latency_table: str | None = None,
    dp_importance: str = "entropy", dp_verify: int | None = None, choice_seed: int = 0,
    dp_merge: str = "macs", dataset: str | None = None, data_root: str | Path | None = None,
    cache_dir: str | Path | None = None, samples: int | None = 1024, batch_size: int = 256,
    measure: bool = True, rounds: int = 5, progress: bool = True,
) -> PlanResult:
    """Plan as `--choose dp` would from a checkpoint (its model is the dense reference): the
    entropies on the training split's first `samples` images (no augmentation), the latency
    table (built or read), the DP; with `measure`, the plan folded whole and timed round-robin
    against the dense model folded (medians of `rounds`), to check the table's estimate."""
    from depthcut.cost.latency_table import measured_ratio  # noqa: PLC0415
    from depthcut.entropy import layer_entropies  # noqa: PLC0415
    from depthcut.masks import clone_model  # noqa: PLC0415
    from depthcut.scorers import Candidates  # noqa: PLC0415
    from depthcut.scorers.choice import ChoiceSettings  # noqa: PLC0415
    from depthcut.scorers.dp import DpScorer, plan_fold_policy  # noqa: PLC0415
    from depthcut.sites import linearize  # noqa: PLC0415

    _check_samples(samples)
    settings = ChoiceSettings(choose="dp", latency_budget=latency_budget,
                              latency_backend=latency_backend, latency_batch=latency_batch,
                              latency_table=latency_table, dp_importance=dp_importance,
                              choice_seed=choice_seed, dp_merge=dp_merge,
                              **({} if dp_span is None else {"dp_span": dp_span}),
                              **({} if dp_verify is None else {"dp_verify": dp_verify}))
    checkpoint = Path(checkpoint)
    model, info = load_checkpoint(checkpoint)
    model = model.cpu().eval()
    data = _dataset_for(info.get("extra", {}), dataset, data_root, cache_dir, progress)
    loader = _loader(data.train_inputs, data.train_labels, data, samples, batch_size, "cpu")
    counts = count_states(model, loader, find_sites(model), progress=progress)
    scorer = DpScorer.from_config(settings)
    scorer.progress = progress
    scored = scorer.score(Candidates(model, layer_entropies(dict(counts)), counts, loader))
    result = PlanResult(checkpoint, _model_name(info), scored.record["dp"],
                        scored.record["dp_cost"])
    if measure:
        planned = linearize(clone_model(model), result.plan["sites"])  # the scorer left it
        ratio, planned_s, dense_s = measured_ratio(
            planned, model, next(iter(loader))[0][:1], scorer.context(), rounds=rounds,
            policy=plan_fold_policy(result.plan["segments"]))
        result.measured_ms = {"dense": dense_s * 1e3, "planned": planned_s * 1e3}
        result.measured_ratio = ratio
    return result
