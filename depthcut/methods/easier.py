"""EASIER (METHODS section 3, Alg. 1): linearize the lowest-entropy site, finetune, repeat.

The loop stops at the first stage whose validation top-1 falls more than `delta` points below the
dense model's (or validation balanced accuracy: the run's metric, `StageRun.score`); the answer
is the last stage within delta. Which sites go first is a scorer's call (`depthcut.scorers`):
the one `choose` names, or the one passed in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from depthcut.data import DataSplits
from depthcut.entropy import ENTROPY_VARIANTS
from depthcut.errors import ConfigError
from depthcut.methods import MethodSpec, register
from depthcut.options import Option
from depthcut.scorers import Candidates, Scorer, choose_sites, scorer_for
from depthcut.scorers.choice import CHOICE_OPTIONS, ChoiceSettings, choice_suffix
from depthcut.sites import find_sites, linearize
from depthcut.stages import (
    ENTROPY_VARIANT_OPTION,
    FINETUNE_OPTIONS,
    FINETUNE_PRESETS,
    Method,
    MethodResult,
    StageRecord,
    StageRun,
    run_stages,
    within_delta,
)
from depthcut.train import TrainConfig
from depthcut.transfer import TRANSFER_PRESETS


@dataclass
class EasierConfig(ChoiceSettings):
    """EASIER's settings.

    Site choice (`choose`, `ChoiceSettings`): a scorer's name (`depthcut.scorers.SCORERS`).
    "entropy" (default, the paper) linearizes the k sites of lowest layer entropy; "payoff"
    scores each reached site by entropy - payoff_weight * saving, the fraction of the folded
    cost (`payoff_cost`: MACs or latency) that linearizing it would save, with one pair of
    look-ahead (`depthcut.scorers.payoff`); its stage records gain "payoff", "payoff_pairs" and
    "score"; "random" and "last" are the baselines for choice.
    """

    delta: float = 1.0  # top-1 points the answer may lose against the dense model
    k: int = 1  # sites linearized per stage (EASIER k-x)
    max_stages: int | None = None  # stop after this many stages even within delta
    finetune: TrainConfig = field(default_factory=TrainConfig)
    entropy_mode: str = "eval"  # ignored by "easier-code", which counts in train() mode
    # Counting rule (depthcut.entropy): "paper" on the unaugmented training split; "easier-code"
    # counts on a replay of the augmented training loader's last epoch; "egp-code" as "paper".
    entropy_variant: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
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


class Easier(Method):
    """Chooses the k sites its scorer ranks lowest (by default the one `config.choose` names),
    linearizes them; stops beyond delta."""

    name, title, needs_val = "easier", "EASIER", True

    def __init__(self, config: EasierConfig, scorer: Scorer | None = None) -> None:
        self.config = config
        self.scorer = scorer if scorer is not None else scorer_for(config)
        self.finetune = config.finetune
        self.rule = f"delta {config.delta} top-1 points (validation split)"

    def begin(self, run: StageRun) -> str | None:
        self.rule = f"delta {self.config.delta} {run.metric_label} points (validation split)"
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
        candidates = Candidates.from_counts(run.model, run.count(self.remaining, self.config),
                                            run.splits.train_eval, run.last.stage + 1,
                                            run.teacher, run.records)
        scored = self.scorer.score(candidates)
        chosen = choose_sites(scored.scores, self.config.k)
        if not chosen:
            return scored.nothing_chosen or "no remaining site was reached by the forward pass"
        linearize(run.model, chosen)
        self.linearized += chosen
        return {"sites_linearized": len(self.linearized), "linearized": list(self.linearized),
                "chosen": chosen, "entropy": candidates.entropies, **scored.record}

    def accept(self, run: StageRun, record: StageRecord) -> bool:
        return within_delta(run.score(run.dense), run.score(record), self.config.delta)

    def stop_after(self, run: StageRun, record: StageRecord) -> str | None:
        if record.within_delta:
            return None
        return (f"stage {record.stage} lost {record.drop:.2f} val {run.metric_label} points > "
                f"delta {self.config.delta}")


def easier(model: nn.Module, splits: DataSplits, config: EasierConfig,
           scorer: Scorer | None = None, **kwargs) -> MethodResult:
    """Run EASIER from a trained model (see `run_stages` for the keyword arguments), choosing
    with `scorer` (default: the one `config.choose` names). Sites already linearized in the
    model are simply not found again."""
    return run_stages(Easier(config, scorer), model, splits, **kwargs)


# ---------------------------------------------------------------------------------------------
# The method's spec (depthcut.methods): how the CLI, compare and reports know EASIER.

OPTIONS = (
    Option("delta", "top-1 points the answer may lose against dense (default 1.0)",
           argparse={"type": float}),
    Option("k", "sites linearized per stage (EASIER k-x; default 1)", argparse={"type": int}),
    Option("max_stages", "stop after this many stages (quick preset: 8; paper: no limit)",
           argparse={"type": int}),
    *CHOICE_OPTIONS,
    ENTROPY_VARIANT_OPTION,
)


def _check(config: EasierConfig, sites: int) -> None:
    if config.k > sites:
        raise ConfigError(f"k={config.k} sites per stage, but the model has only {sites} sites "
                          "left to linearize")


def _label(settings: Mapping) -> str:
    label = "EASIER"
    if (settings.get("k") or 1) > 1:
        label += f" {settings['k']}-x"
    return label + choice_suffix(settings)


def _describe(result: MethodResult) -> str:
    answer = result.answer
    lines = [f"\nAnswer: stage {answer['stage']}, {answer['sites_linearized']}/"
             f"{answer['sites_total']} sites linearized, test top-1 {answer['test_top1']:.2f} "
             f"(dense {result.records[0]['test_top1']:.2f}). Stopped: {result.stop_reason}."]
    folded = result.folded
    if folded:
        lines.append(f"Answer folded ({folded['policy']}): test top-1 "
                     f"{folded['top1_folded']:.2f}, MACs/image {folded['macs_unfolded']:,} -> "
                     f"{folded['macs_folded']:,}, batch-1 latency "
                     f"({folded.get('latency_backend', 'eager')}) "
                     f"{folded['latency_ms_batch1_unfolded']:.2f} -> "
                     f"{folded['latency_ms_batch1_folded']:.2f} ms")
    return "\n".join(lines)


SPEC = register(MethodSpec(
    name="easier", config=EasierConfig, runner=easier, label="EASIER",
    help="EASIER: linearize low-entropy sites", options=OPTIONS,
    training_options=FINETUNE_OPTIONS, compare_title="EASIER (delta also serves EGP and IMP)",
    presets={"quick": {"max_stages": 8, **FINETUNE_PRESETS["quick"]},
             "paper": {"max_stages": None, **FINETUNE_PRESETS["paper"]},
             **{name: {"max_stages": None, **FINETUNE_PRESETS[name]}
                for name in TRANSFER_PRESETS}},
    variants={"easier-k2": {"k": 2}, "easier-payoff": {"choose": "payoff"},
              "easier-random": {"choose": "random"}, "easier-last": {"choose": "last"},
              "easier-dp": {"choose": "dp"}},  # dp: --latency-budget is needed
    depth_reference=True, check=_check, label_of=_label, describe=_describe, order=10))
