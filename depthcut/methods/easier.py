"""EASIER (METHODS section 3, Alg. 1): linearize the lowest-entropy site, finetune, repeat.

The loop stops at the first stage whose validation top-1 falls more than `delta` points below the
dense model's; the answer is the last stage within delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from depthcut.data import DataSplits
from depthcut.entropy import ENTROPY_VARIANTS, layer_entropies
from depthcut.errors import ConfigError
from depthcut.sites import find_sites, linearize
from depthcut.stages import Method, MethodResult, StageRecord, StageRun, run_stages
from depthcut.train import TrainConfig


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
            raise ConfigError(
                f"delta must be a finite number >= 0 (top-1 points), got {self.delta}")
        if self.k < 1:
            raise ConfigError(f"k (sites per stage) must be >= 1, got {self.k}")
        if self.max_stages is not None and self.max_stages < 1:
            raise ConfigError(f"max_stages must be >= 1, got {self.max_stages}")
        if self.entropy_variant not in ENTROPY_VARIANTS:
            raise ConfigError(
                f"entropy_variant must be one of {', '.join(map(repr, ENTROPY_VARIANTS))}, "
                f"got {self.entropy_variant!r}"
            )


def choose_sites(entropies: dict[str, float], k: int) -> list[str]:
    """The k sites of lowest entropy; ties keep forward order; unreached (NaN) sites are skipped."""
    measured = [(h, i, name) for i, (name, h) in enumerate(entropies.items()) if not math.isnan(h)]
    return [name for _, _, name in sorted(measured)[:k]]


def within_delta(dense_top1: float, top1: float, delta: float) -> bool:
    """The stop rule: a stage is acceptable while dense - current <= delta."""
    return dense_top1 - top1 <= delta


class Easier(Method):
    """Chooses the k lowest-entropy sites, linearizes them; stops beyond delta."""

    name, title, needs_val = "easier", "EASIER", True

    def __init__(self, config: EasierConfig) -> None:
        self.config = config
        self.finetune = config.finetune
        self.rule = f"delta {config.delta} top-1 points (validation split)"

    def begin(self, run: StageRun) -> str | None:
        self.linearized = list(run.last.linearized)
        return self.stop_after(run, run.last)  # a resumed run may have ended on its last stage

    def stop_before(self, run: StageRun) -> str | None:
        limit = self.config.max_stages
        if limit is not None and run.last.stage - run.dense.stage >= limit:
            return f"max_stages={limit} reached"
        left = len(self.linearized) < run.dense.sites_total
        self.remaining = find_sites(run.model) if left else []
        return None if self.remaining else "no site left to linearize"

    def change(self, run: StageRun) -> dict | str:
        entropies = layer_entropies(run.count(self.remaining, self.config))
        chosen = choose_sites(entropies, self.config.k)
        if not chosen:
            return "no remaining site was reached by the forward pass"
        linearize(run.model, chosen)
        self.linearized += chosen
        return {"sites_linearized": len(self.linearized), "linearized": list(self.linearized),
                "chosen": chosen, "entropy": entropies}

    def accept(self, run: StageRun, record: StageRecord) -> bool:
        return within_delta(run.dense.val_top1, record.val_top1, self.config.delta)

    def stop_after(self, run: StageRun, record: StageRecord) -> str | None:
        if record.within_delta:
            return None
        return (f"stage {record.stage} lost {record.drop:.2f} val top-1 points > "
                f"delta {self.config.delta}")


def easier(model: nn.Module, splits: DataSplits, config: EasierConfig, **kwargs) -> MethodResult:
    """Run EASIER from a trained model (see `run_stages` for the keyword arguments). Sites
    already linearized in the model are simply not found again."""
    return run_stages(Easier(config), model, splits, **kwargs)
