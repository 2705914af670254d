"""The stage record every method writes and the one stage loop every method plugs into.

A method (`Method`) says only what makes it that method: how it chooses, how it changes the
model, when it stops. The loop does the rest the same way for all: resuming from the stages
already done, entropy counts when asked, the finetune (with epoch snapshots), evaluation, the
record, the callback that writes it, and the answer.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from torch import nn

from depthcut.data import DataSplits
from depthcut.entropy import ENTROPY_VARIANTS, SiteCounts, count_states
from depthcut.errors import ConfigError
from depthcut.options import Option
from depthcut.train import Checkpointing, TrainConfig, TrainResult, evaluate, train
from depthcut.transfer import TRANSFER_PRESETS


class _Unset:
    """A field this stage does not have (written nowhere, unlike None, which is written null)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()

# Where a method's extra record fields sit in a JSON line: before this common key. Each method
# declares its own (`MethodSpec.record_fields`, placed here when it registers); extras not
# listed follow `seconds`. Keeping the places keeps records.jsonl unchanged.
_EXTRA_BEFORE: dict[str, str] = {}


def place_extras(places: Mapping[str, str]) -> None:
    """Write each extra record field `name` before the common key `places[name]`."""
    unknown = set(places.values()) - {f.name for f in fields(StageRecord)}
    if unknown:
        raise ValueError(f"extras placed before unknown record keys: {sorted(unknown)}")
    _EXTRA_BEFORE.update(places)


@dataclass
class StageRecord(Mapping):
    """One stage of a run (stage 0: the dense model), as written to records.jsonl.

    It reads like its JSON line (`record["val_top1"]`, `record.get("sparsity")`), so reports and
    the CLI take records from a run directory and from a method alike.
    """

    method: str
    stage: int
    sites_total: int = 0
    sites_linearized: int = 0
    linearized: list[str] = field(default_factory=list)
    chosen: list[str] = field(default_factory=list)
    entropy: dict[str, float] = field(default_factory=dict)
    val_top1: float | None = None
    test_top1: float | None = None
    # Balanced accuracy (mean per-class recall, percent); unset in records of older versions.
    val_balanced: float | None = UNSET
    test_balanced: float | None = UNSET
    drop: float | None = None  # dense - this stage, validation, in the run's metric
    within_delta: bool = True  # within the method's stop rule (the answer is the last such)
    epochs: int = 0
    total_epochs: int = 0
    train_loss: float | None = UNSET  # the finetune's last epoch loss (stage 0 has none)
    seconds: float = 0.0
    # Set by the run when it writes the stage (not by a method).
    parameters: int = UNSET
    elapsed_s: float = UNSET
    checkpoint: str = UNSET
    extras: dict[str, Any] = field(default_factory=dict)  # what only this method records

    def to_dict(self) -> dict:
        """The JSON line: common keys, extras in their places, unset fields left out."""
        names = [f.name for f in fields(self) if f.name != "extras"]
        if self.stage == 0:  # stage 0 has always been written with its size before its time
            names.remove("parameters")
            names.insert(names.index("seconds"), "parameters")
        out: dict[str, Any] = {}
        for name in names:
            for key, value in self.extras.items():
                if _EXTRA_BEFORE.get(key, "parameters") == name:
                    out[key] = value
            value = getattr(self, name)
            if value is not UNSET:
                out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping) -> StageRecord:
        """A record from its JSON line; keys a method added become extras, missing ones default
        (records written by older versions load too)."""
        if isinstance(data, StageRecord):
            return data
        names = {f.name for f in fields(cls)} - {"extras"}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extras={k: v for k, v in data.items() if k not in names})

    def __getitem__(self, key: str) -> Any:
        if key != "extras" and key in _FIELD_NAMES:
            value = getattr(self, key)
            if value is UNSET:
                raise KeyError(key)
            return value
        return self.extras[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())


_FIELD_NAMES = frozenset(f.name for f in fields(StageRecord))


# The validation score a stop rule reads (`--metric`): the record key and how text names it.
METRICS = {"top1": ("val_top1", "top-1"), "balanced": ("val_balanced", "balanced accuracy")}


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ConfigError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    return metric


def metric_label(metric: str) -> str:
    """How summaries and stop reasons name the metric: "top-1" or "balanced accuracy"."""
    return METRICS[check_metric(metric)][1]


def val_score(record: Mapping, metric: str = "top1") -> float | None:
    """The validation score of `record` in `metric`: val top-1 or val balanced accuracy."""
    return record.get(METRICS[check_metric(metric)][0])


def within_delta(dense_score: float, score: float, delta: float) -> bool:
    """The delta stop rule (EASIER, progressive): a stage is acceptable while dense - current
    <= delta (in the run's metric: top-1 or balanced accuracy, `StageRun.score`)."""
    return dense_score - score <= delta


def answer_stage(records: Sequence[Mapping]) -> Mapping:
    """The answer of a run: its last stage within the method's stop rule (stage 0 always is)."""
    return [r for r in records if r.get("within_delta", True)][-1]


# Settings every method with a finetune shares (the CLI shows them in each method's group).
FINETUNE_EPOCHS = Option("finetune_epochs", "retraining epochs per stage/round (quick: 3; "
                         "paper: 160)", path="finetune.epochs", argparse={"type": int})
FINETUNE_OPTIONS: tuple[Option, ...] = (
    FINETUNE_EPOCHS,
    Option("distill", "weight in [0, 1] of distillation from the dense model's logits in every "
           "finetune (default 0: off; the fair-compute reference never distills)",
           owner=TrainConfig, argparse={"type": float}),
    Option("distill_temperature", "softmax temperature of the distillation (default 4)",
           owner=TrainConfig, argparse={"type": float}),
    Option("finetune_lr", "retraining learning rate (default: preset; paper: same as --lr)",
           path="finetune.lr", argparse={"type": float}),
    Option("entropy_mode", "model mode while counting: eval (default) or train (BatchNorm "
           "batch statistics)", argparse={"choices": ("eval", "train")}),
)
ENTROPY_VARIANT_OPTION = Option(
    "entropy_variant", "how site entropy is counted: paper = the METHODS definition (default); "
    "easier-code = the EASIER authors' counting rule (z >= 0 is ON, per-batch entropies "
    "averaged, train mode on augmented batches); egp-code = the EGP code's rule (average only "
    "over non-constant channels per batch). IMP chooses by magnitude but still records it",
    argparse={"choices": ENTROPY_VARIANTS})
# The finetune's preset values (None: the dense lr, see depthcut.settings). As in the paper
# preset, a transfer preset finetunes each stage as long as its dense training (Table 4).
FINETUNE_PRESETS = {"quick": {"finetune_epochs": 3, "finetune_lr": 0.02},
                    "paper": {"finetune_epochs": 160, "finetune_lr": None},
                    **{name: {"finetune_epochs": values["epochs"], "finetune_lr": None}
                       for name, values in TRANSFER_PRESETS.items()}}


@dataclass
class MethodResult:
    """What every method returns."""

    records: list[StageRecord]
    answer: StageRecord
    stop_reason: str
    model: nn.Module  # the model of the last stage run (not necessarily the answer)
    folded: dict | None = None  # the answer stage folded and measured (set by the run)
    rule: str = ""  # the stop rule in words, for the summary
    answer_model: nn.Module | None = None  # the answer stage's model (set by the run)
    folded_model: nn.Module | None = None  # ... folded (set by the run)


@dataclass
class TrainingHooks:
    """A user's own training loop driving the stages (any loop: plain PyTorch, Lightning, a
    Hugging Face Trainer): `finetune(model, epochs)` trains the model in place where depthcut
    would finetune; `evaluate(model) -> score` returns the validation score in points (higher
    is better), which the stop rules compare with the dense model's as they do top-1. Trainings
    a method adds terms to (Layer Folding's slopes) stay depthcut's own."""

    finetune: Callable[[nn.Module, int], object] | None = None
    evaluate: Callable[[nn.Module], float] | None = None


def evaluate_stage(model: nn.Module, splits: DataSplits, hooks: TrainingHooks | None = None
                   ) -> dict[str, float | None]:
    """A stage's scores: validation (the user's `evaluate` when given, else top-1 and balanced
    accuracy) and test top-1 and balanced accuracy (None without a test split)."""
    scores: dict[str, float | None] = {"val_top1": None, "val_balanced": None,
                                       "test_top1": None, "test_balanced": None}
    if hooks is not None and hooks.evaluate is not None:
        was_training = model.training
        model.eval()
        scores["val_top1"] = float(hooks.evaluate(model))
        model.train(was_training)
    elif splits.val is not None:
        scores["val_top1"], scores["val_balanced"] = evaluate(model, splits.val, balanced=True)
    if splits.test is not None:
        scores["test_top1"], scores["test_balanced"] = evaluate(model, splits.test,
                                                                balanced=True)
    return scores


class EntropySettings(Protocol):
    entropy_mode: str
    entropy_variant: str


def replay_last_epoch(loader):
    """A shallow copy of the training loader that yields its last epoch's batches again.

    The copy's epoch counter is `loader.epoch - 1` (0 if none was run): the same shuffle and
    augmentation as the last epoch the loader served (the previous finetune's, or the dense
    training's), while `loader.epoch`, which the next finetune and a resumed run start from, is
    not advanced. BatchLoader reseeds its augmentation generator at every iter(), so sharing it
    with the copy changes nothing for training. A loader without an epoch counter is returned
    as it is.
    """
    if not hasattr(loader, "epoch"):
        return loader
    replay = copy.copy(loader)
    replay.epoch = max(loader.epoch - 1, 0)
    return replay


def entropy_batches_and_mode(splits: DataSplits, settings: EntropySettings):
    """Where and how a stage counts: the augmented training batches in train() mode for
    "easier-code" (the authors' setting, weights frozen here), else the unaugmented split."""
    if settings.entropy_variant == "easier-code":
        return replay_last_epoch(splits.train), "train"
    return splits.train_eval, settings.entropy_mode


@dataclass
class StageRun:
    """What a method sees of the run in progress: the model, the data, the stages so far, and
    the shared ways to count neuron states and to train."""

    model: nn.Module
    splits: DataSplits
    records: list[StageRecord]
    progress: bool = True
    snapshots: Callable[[str], Checkpointing] | None = None
    metric: str = "top1"  # what stop rules compare: "top1" or "balanced" (validation split)
    teacher: nn.Module | None = None  # the dense model, for finetunes that distill
    hooks: TrainingHooks | None = None  # the user's own finetune and evaluation

    @property
    def dense(self) -> StageRecord:
        return self.records[0]

    @property
    def last(self) -> StageRecord:
        return self.records[-1]

    @property
    def metric_label(self) -> str:
        return metric_label(self.metric)

    def score(self, record: Mapping) -> float | None:
        """The validation score every method's stop rule reads: val top-1, or val balanced
        accuracy with metric "balanced" (the one place the metric is chosen)."""
        return val_score(record, self.metric)

    def count(self, sites: Sequence[str], settings: EntropySettings
              ) -> dict[str, SiteCounts | None]:
        """Sign counts of `sites` by the method's counting rule (depthcut.entropy)."""
        batches, mode = entropy_batches_and_mode(self.splits, settings)
        return count_states(self.model, batches, sites, mode=mode, progress=self.progress,
                            variant=settings.entropy_variant)

    def train(self, config: TrainConfig, name: str, **kwargs) -> TrainResult:
        """The shared training loop on the training split; `name` labels the progress bar and
        the epoch snapshots a resumed run continues from. With the user's own `finetune`
        (`TrainingHooks`), that trains instead, unless the method adds terms (`kwargs`)."""
        if self.hooks is not None and self.hooks.finetune is not None and not kwargs:
            self.model.train()
            self.hooks.finetune(self.model, config.epochs)
            return TrainResult(epochs=[])
        return train(self.model, self.splits.train, config, progress=self.progress, desc=name,
                     checkpointing=self.snapshots(name) if self.snapshots else None,
                     teacher=self.teacher, **kwargs)


class Method:
    """A method's essentials for `run_stages`. Per stage the loop calls `stop_before`, `change`,
    finetunes with `finetune`, then `after`, evaluates, builds the record with `accept`, writes
    it, and asks `stop_after`. Stop hooks return the reason to stop, or None to go on; record
    hooks return the record's method-specific fields (`linearized`, `chosen`, extras...)."""

    name = "?"  # the records' "method"
    title = ""  # how error messages name it (default: name)
    needs_val = False  # its stop rule reads validation top-1
    rule = ""  # its stop rule in words
    finetune: TrainConfig

    def begin(self, run: StageRun) -> str | None:
        """Pick up from the last stage done (the dense one, or a resumed run's last): the
        reason to stop when that stage already ended the run."""
        return None

    def stop_before(self, run: StageRun) -> str | None:
        """Whether to run another stage (limits, nothing left to remove)."""
        return None

    def change(self, run: StageRun) -> dict | str:
        """Choose and change the model for the next stage: its record fields, or the reason to
        stop when nothing can be chosen."""
        return {}

    def training(self, stage: int) -> str:
        """The finetune's name (progress and epoch snapshots)."""
        return f"stage {stage}"

    def epochs(self) -> int:
        """Training epochs one stage costs (the finetune and any training in `change`)."""
        return self.finetune.epochs

    def after(self, run: StageRun) -> dict:
        """Changes and measurements after the finetune: more record fields."""
        return {}

    def accept(self, run: StageRun, record: StageRecord) -> bool:
        """Whether the stage is within the stop rule (a candidate answer)."""
        return True

    def stop_after(self, run: StageRun, record: StageRecord) -> str | None:
        """Whether the stage just recorded ends the run."""
        return None


def run_stages(
    method: Method,
    model: nn.Module,
    splits: DataSplits,
    *,
    dense_record: Mapping,
    history: Sequence[Mapping] = (),
    on_stage: Callable[[StageRecord, nn.Module], None] | None = None,
    progress: bool = True,
    snapshots: Callable[[str], Checkpointing] | None = None,
    metric: str = "top1",
    teacher: nn.Module | None = None,
    hooks: TrainingHooks | None = None,
) -> MethodResult:
    """Run `method` from a trained model whose metrics are `dense_record` (stage 0).

    `metric` is the validation score the method's stop rule compares with the dense model's:
    "top1" or "balanced" (balanced accuracy; the dense record must have it).

    `teacher` (the dense model) is what finetunes with `distill` > 0 learn from.

    `hooks` (`TrainingHooks`): the user's own finetune and validation score.

    `on_stage(record, model)` is called after every stage (the run directory writes the record
    and checkpoint; it may set the record's run fields). To resume, pass the stages already
    done as `history` and the model of the last one; `snapshots(name)` gives each training call
    its epoch-level checkpointing.
    """
    own_score = hooks is not None and hooks.evaluate is not None
    if method.needs_val and splits.val is None and not own_score:
        raise ConfigError(f"{method.title or method.name} needs a validation split for its stop "
                         "rule: use val_fraction > 0")
    records = [StageRecord.from_dict(r) for r in (dense_record, *history)]
    check_metric(metric)
    if method.needs_val and val_score(records[0], metric) is None:
        raise ConfigError(f"{method.title or method.name}'s stop rule reads validation "
                          f"{metric_label(metric)}, which the dense record lacks (written by an "
                          "older version?): use metric top1 or evaluate the dense model again")
    run = StageRun(model, splits, records, progress=progress, snapshots=snapshots,
                   metric=metric, teacher=teacher, hooks=hooks)
    reason = method.begin(run)
    while reason is None:
        reason = method.stop_before(run) or _stage(method, run, on_stage)
    return MethodResult(records=run.records, answer=answer_stage(run.records),
                        stop_reason=reason, model=model, rule=method.rule)


def _stage(method: Method, run: StageRun, on_stage) -> str | None:
    """One stage: change, finetune, evaluate, record; the reason to stop, if any."""
    stage = run.last.stage + 1
    start = time.perf_counter()
    changed = method.change(run)
    if isinstance(changed, str):
        return changed
    fit = run.train(method.finetune, method.training(stage))
    changed = {**changed, **method.after(run)}
    scores = evaluate_stage(run.model, run.splits, run.hooks)
    val, val_balanced = scores["val_top1"], scores["val_balanced"]
    test, test_balanced = scores["test_top1"], scores["test_balanced"]
    dense_val, score = run.score(run.dense), run.score(scores)
    record = StageRecord.from_dict({
        "method": method.name,
        "stage": stage,
        "sites_total": run.dense.sites_total,
        **changed,
        "val_top1": val,
        "test_top1": test,
        "val_balanced": val_balanced,
        "test_balanced": test_balanced,
        "drop": dense_val - score if score is not None and dense_val is not None else None,
        "epochs": method.epochs(),
        "total_epochs": run.last.total_epochs + method.epochs(),
        "train_loss": fit.epochs[-1].loss if fit.epochs else None,
        "seconds": time.perf_counter() - start,
    })
    record.within_delta = method.accept(run, record)
    run.records.append(record)
    if on_stage is not None:
        on_stage(record, run.model)
    return method.stop_after(run, record)
