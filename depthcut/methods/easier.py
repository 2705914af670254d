"""EASIER (METHODS section 3, Alg. 1): linearize the lowest-entropy site, finetune, repeat.

The loop stops at the first stage whose validation top-1 falls more than `delta` points below the
dense model's; the answer is the last stage within delta.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from depthcut.data import DataSplits
from depthcut.entropy import ENTROPY_VARIANTS, measure_entropy
from depthcut.run import answer_stage
from depthcut.sites import find_sites, linearize
from depthcut.train import Checkpointing, TrainConfig, evaluate, train


@dataclass
class EasierConfig:
    delta: float = 1.0  # top-1 points the answer may lose against the dense model
    k: int = 1  # sites linearized per stage (EASIER k-x)
    max_stages: int | None = None  # stop after this many stages even within delta
    finetune: TrainConfig = field(default_factory=TrainConfig)
    entropy_mode: str = "eval"  # ignored by "easier-code", which counts in train() mode
    # Counting rule (depthcut.entropy): "paper" on the unaugmented training split; "easier-code"
    # counts on a replay of the augmented training loader's last epoch; "egp-code" as "paper".
    entropy_variant: str = "paper"

    def __post_init__(self) -> None:
        if not (self.delta >= 0 and math.isfinite(self.delta)):
            raise ValueError(f"delta must be a finite number >= 0 (top-1 points), got {self.delta}")
        if self.k < 1:
            raise ValueError(f"k (sites per stage) must be >= 1, got {self.k}")
        if self.max_stages is not None and self.max_stages < 1:
            raise ValueError(f"max_stages must be >= 1, got {self.max_stages}")
        if self.entropy_variant not in ENTROPY_VARIANTS:
            raise ValueError(
                f"entropy_variant must be one of {', '.join(map(repr, ENTROPY_VARIANTS))}, "
                f"got {self.entropy_variant!r}"
            )


def replay_last_epoch(loader):
    """A shallow copy of the training loader that yields its last epoch's batches again.

    The copy's epoch counter is `loader.epoch - 1` (0 if none was run): the same shuffle and
    augmentation as the last epoch the loader served (the previous finetune's, or the dense
    training's), while `loader.epoch`, which the next finetune and a resumed run start from, is
    not advanced. BatchLoader reseeds its augmentation generator at
    every iter(), so sharing it with the copy changes nothing for training. A loader without an
    epoch counter is returned as it is.
    """
    if not hasattr(loader, "epoch"):
        return loader
    replay = copy.copy(loader)
    replay.epoch = max(loader.epoch - 1, 0)
    return replay


def entropy_batches_and_mode(splits: DataSplits, config: EasierConfig):
    """Where and how a stage counts: the augmented training batches in train() mode for
    "easier-code" (the authors' setting, weights frozen here), else the unaugmented split."""
    if config.entropy_variant == "easier-code":
        return replay_last_epoch(splits.train), "train"
    return splits.train_eval, config.entropy_mode


def choose_sites(entropies: dict[str, float], k: int) -> list[str]:
    """The k sites of lowest entropy; ties keep forward order; unreached (NaN) sites are skipped."""
    measured = [(h, i, name) for i, (name, h) in enumerate(entropies.items()) if not math.isnan(h)]
    return [name for _, _, name in sorted(measured)[:k]]


def within_delta(dense_top1: float, top1: float, delta: float) -> bool:
    """The stop rule: a stage is acceptable while dense - current <= delta."""
    return dense_top1 - top1 <= delta


@dataclass
class MethodResult:
    """What every method returns (EASIER, the pruning rounds, Layer Folding, dense longer)."""

    records: list[dict]
    answer: dict
    stop_reason: str
    model: nn.Module  # the model of the last stage run (not necessarily the answer)
    folded: dict | None = None  # the answer stage folded and measured (set by the run)


EasierResult = MethodResult


def easier(
    model: nn.Module,
    splits: DataSplits,
    config: EasierConfig,
    *,
    dense_record: dict,
    history: Sequence[dict] = (),
    on_stage: Callable[[dict, nn.Module], None] | None = None,
    progress: bool = True,
    snapshots: Callable[[str], Checkpointing] | None = None,
) -> EasierResult:
    """Run EASIER from a trained model whose metrics are `dense_record` (stage 0).

    `on_stage(record, model)` is called after every stage (the run directory uses it to write the
    record and checkpoint). Sites already linearized in the model are simply not found again.
    To resume, pass the stages already done as `history` and the model of the last one;
    `snapshots(name)` gives each finetune its epoch-level checkpointing.
    """
    if splits.val is None:
        raise ValueError("EASIER needs a validation split for its stop rule: use val_fraction > 0")
    dense_val = dense_record["val_top1"]
    records = [dense_record, *history]
    last = records[-1]
    linearized = list(last.get("linearized", []))
    sites_total = dense_record["sites_total"]
    total_epochs = last.get("total_epochs", 0)
    stop_reason = "no site left to linearize"
    stage = last["stage"]
    if not last.get("within_delta", True):
        stage = -1  # the run already ended on this stage: nothing left to do
        stop_reason = (f"stage {last['stage']} lost {last['drop']:.2f} val top-1 points > "
                       f"delta {config.delta}")
    while stage >= 0:
        if config.max_stages is not None and stage - dense_record["stage"] >= config.max_stages:
            stop_reason = f"max_stages={config.max_stages} reached"
            break
        remaining = find_sites(model) if len(linearized) < sites_total else []
        if not remaining:
            break
        stage += 1
        start = time.perf_counter()
        batches, mode = entropy_batches_and_mode(splits, config)
        entropies = measure_entropy(
            model, batches, remaining, mode=mode, progress=progress,
            variant=config.entropy_variant,
        )
        chosen = choose_sites(entropies, config.k)
        if not chosen:
            stop_reason = "no remaining site was reached by the forward pass"
            break
        linearize(model, chosen)
        linearized += chosen
        fit = train(model, splits.train, config.finetune, progress=progress, desc=f"stage {stage}",
                    checkpointing=snapshots(f"stage {stage}") if snapshots else None)
        total_epochs += config.finetune.epochs
        val_top1 = evaluate(model, splits.val)
        record = {
            "method": "easier",
            "stage": stage,
            "sites_total": sites_total,
            "sites_linearized": len(linearized),
            "linearized": list(linearized),
            "chosen": chosen,
            "entropy": entropies,
            "val_top1": val_top1,
            "test_top1": evaluate(model, splits.test),
            "drop": dense_val - val_top1,
            "within_delta": within_delta(dense_val, val_top1, config.delta),
            "epochs": config.finetune.epochs,
            "total_epochs": total_epochs,
            "train_loss": fit.epochs[-1].loss if fit.epochs else None,
            "seconds": time.perf_counter() - start,
        }
        records.append(record)
        if on_stage is not None:
            on_stage(record, model)
        if not record["within_delta"]:
            stop_reason = (
                f"stage {stage} lost {record['drop']:.2f} val top-1 points > delta {config.delta}"
            )
            break
    return EasierResult(
        records=records, answer=answer_stage(records), stop_reason=stop_reason, model=model
    )
