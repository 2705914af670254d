"""Progressive linearization: EASIER's depth for a fraction of its finetuning.

EASIER pays one finetune per removed site. This method takes several sites per stage and
never shocks the network with a sudden removal: during a stage's (short) finetune each chosen
activation is blended into the identity,

    y = (1 - t) * act(x) + t * x,    t rising linearly from 0 to 1 over the first `blend`
                                     share of the finetune's steps, then held at 1,

so the weights follow the change, and at the end the blend is replaced by the identity exactly
(t = 1: nothing changes). Sites are ranked on the current model by the scorer `choose` names
(entropy by default, as EASIER) or the one passed in (`depthcut.scorers`). The number of
sites is searched, not fixed: a stage that ends beyond delta is undone (the model goes back
to the last accepted stage) and the step halves; the search stops when a single site is too
many, or at `max_sites` / `max_stages`.
Undone stages are recorded (their epochs count in `total_epochs`) with "continue_from" naming
the stage the next one starts from, so a resumed run restarts from the right weights. The
finetune may distill from the dense model (`TrainConfig.distill`), which softens the removal
further.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from depthcut.data import DataSplits
from depthcut.errors import ConfigError
from depthcut.masks import clone_model
from depthcut.methods import MethodSpec, register
from depthcut.options import Option
from depthcut.scorers import Candidates, Scorer, choose_sites, scorer_for
from depthcut.scorers.choice import CHOICE_OPTIONS, ChoiceSettings, choice_suffix
from depthcut.sites import find_sites, replace_module
from depthcut.stages import (
    ENTROPY_VARIANT_OPTION,
    FINETUNE_OPTIONS,
    FINETUNE_PRESETS,
    Method,
    MethodResult,
    StageRecord,
    StageRun,
    answer_stage,
    run_stages,
    within_delta,
)
from depthcut.train import TrainConfig
from depthcut.transfer import TRANSFER_PRESETS


@dataclass
class ProgressiveConfig(ChoiceSettings):
    """Progressive linearization's settings (see the module docstring); which sites go first
    is `choose` (`ChoiceSettings`)."""

    delta: float = 1.0  # validation points the answer may lose against the dense model
    first_step: int = 4  # sites per stage at first; halved after a stage beyond delta
    max_sites: int | None = None  # stop once this many sites are linear
    max_stages: int | None = None  # stop after this many stages (undone ones included)
    blend: float = 0.5  # share of each finetune over which the chosen activations become linear
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1))
    entropy_mode: str = "eval"
    entropy_variant: str = "paper"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.delta >= 0 and math.isfinite(self.delta)):
            raise ConfigError(f"delta must be a finite number >= 0, got {self.delta}")
        if self.first_step < 1:
            raise ConfigError(f"first_step (sites per stage) must be >= 1, got {self.first_step}")
        for name in ("max_sites", "max_stages"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if not 0 < self.blend <= 1:
            raise ConfigError(f"blend (share of the finetune) must be in (0, 1], got {self.blend}")


ONE_SHOT = 10**6  # a first step no model's site count reaches: take the whole plan at once


class Blend(nn.Module):
    """(1 - t) act(x) + t x, t = min(1, training forwards so far / ramp_steps).

    The step count is a buffer, so an epoch snapshot (and a resumed stage) keeps the ramp."""

    def __init__(self, act: nn.Module, ramp_steps: int) -> None:
        super().__init__()
        if hasattr(act, "inplace"):
            act.inplace = False  # x is needed after act(x)
        self.act = act
        self.ramp_steps = max(int(ramp_steps), 1)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @property
    def t(self) -> Tensor:
        return (self.steps.double() / self.ramp_steps).clamp(max=1.0).float()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self.steps += 1
        y = self.act(x)
        return y + self.t.to(x.dtype) * (x - y)


class Progressive(Method):
    """Blends the lowest-entropy sites (or those `scorer` ranks lowest) into identity during
    short finetunes; halves the step after a stage beyond delta (undoing it)."""

    name, title, needs_val = "progressive", "Progressive", True

    def __init__(self, config: ProgressiveConfig, scorer: Scorer | None = None) -> None:
        self.config = config
        self.scorer = scorer if scorer is not None else scorer_for(config)
        self.finetune = config.finetune
        self.previous: tuple[nn.Module, list[str]] | None = None

    def begin(self, run: StageRun) -> str | None:
        self.rule = (f"delta {self.config.delta} {run.metric_label} points (validation split); a "
                     "stage beyond it is undone and the step halved")
        self.linearized = list(answer_stage(run.records)["linearized"])
        self.step = run.last.get("next_step", self.config.first_step)
        return None if self.step > 0 else self._too_many(run.last)

    def stop_before(self, run: StageRun) -> str | None:
        limit = self.config.max_stages
        if limit is not None and run.last.stage - run.dense.stage >= limit:
            return f"max_stages={limit} reached"
        cap = self.config.max_sites
        if cap is not None and len(self.linearized) >= cap:
            return f"max_sites={cap} reached"
        left = len(self.linearized) < run.dense.sites_total  # none left: find_sites refuses
        self.remaining = find_sites(run.model) if left else []
        return None if self.remaining else "no site left to linearize"

    def change(self, run: StageRun) -> dict | str:
        candidates = Candidates.from_counts(run.model, run.count(self.remaining, self.config),
                                            run.splits.train_eval, run.last.stage + 1,
                                            run.teacher, run.records)
        scored = self.scorer.score(candidates)
        count = self.step
        if self.config.max_sites is not None:
            count = min(count, self.config.max_sites - len(self.linearized))
        chosen = choose_sites(scored.scores, count)
        if not chosen:
            return scored.nothing_chosen or "no remaining site was reached by the forward pass"
        self.previous = (clone_model(run.model), list(self.linearized))
        epochs = self.finetune.epochs
        ramp = self.config.blend * epochs * max(len(run.splits.train), 1)
        for name in chosen:
            replace_module(run.model, name, Blend(run.model.get_submodule(name), round(ramp)))
        self.chosen = chosen
        self.linearized += chosen
        return {"sites_linearized": len(self.linearized), "linearized": list(self.linearized),
                "chosen": chosen, "entropy": candidates.entropies, **scored.record,
                "step": len(chosen)}

    def after(self, run: StageRun) -> dict:
        """The blends have reached t = 1 (with epochs > 0): the identity is now exact."""
        for name in self.chosen:
            replace_module(run.model, name, nn.Identity())
        return {}

    def accept(self, run: StageRun, record: StageRecord) -> bool:
        within = within_delta(run.score(run.dense), run.score(record), self.config.delta)
        # The search state goes into the record (written before `stop_after`), for resuming.
        record.extras["next_step"] = self.step if within else self.step // 2
        if not within:
            record.extras["continue_from"] = answer_stage(run.records)["stage"]
        return within

    def stop_after(self, run: StageRun, record: StageRecord) -> str | None:
        if record.within_delta:
            return None
        run.model, self.linearized = self.previous  # undo the stage
        self.step //= 2
        return None if self.step > 0 else self._too_many(record)

    def _too_many(self, record: StageRecord) -> str:
        return (f"stage {record.stage}: one more site lost {record.drop:.2f} validation points "
                f"> delta {self.config.delta}")


def progressive(model: nn.Module, splits: DataSplits, config: ProgressiveConfig,
                scorer: Scorer | None = None, **kwargs) -> MethodResult:
    """Run progressive linearization from a trained model (see `run_stages` for the keyword
    arguments), ranking sites with `scorer` (default: by entropy). Its answer (the last
    accepted stage) is the model `run_stages` returns only when the last stage was accepted:
    read the answer's checkpoint otherwise."""
    return run_stages(Progressive(config, scorer), model, splits, **kwargs)


OPTIONS = (
    Option("delta", "validation points the answer may lose against dense (default 1)",
           argparse={"type": float}),
    Option("max_stages", "stop after this many stages, undone ones included (quick: 8)",
           argparse={"type": int}),
    Option("progressive_epochs", "finetune epochs per progressive stage (quick: 1; paper: 40)",
           path="finetune.epochs", argparse={"type": int}),
    Option("first_step", "sites per progressive stage at first, halved after a stage beyond "
           "delta (default 4)", argparse={"type": int}),
    Option("max_sites", "progressive: stop once this many sites are linear (default: none)",
           argparse={"type": int}),
    Option("blend", "share of each progressive finetune over which the chosen activations blend "
           "into identity (default 0.5)", argparse={"type": float}),
    *CHOICE_OPTIONS,
    ENTROPY_VARIANT_OPTION,
)


def _describe(result: MethodResult) -> str:
    answer = result.answer
    return (f"\nAnswer: stage {answer['stage']}, {answer['sites_linearized']}/"
            f"{answer['sites_total']} sites linearized after {answer['total_epochs']} total "
            f"epochs, test top-1 {answer['test_top1']:.2f} (dense "
            f"{result.records[0]['test_top1']:.2f}). Stopped: {result.stop_reason}.")


SPEC = register(MethodSpec(
    name="progressive", config=ProgressiveConfig, runner=progressive, label="Progressive",
    help="progressive linearization: several sites per short finetune, blended into identity; "
    "the step halves after a stage beyond delta", title="progressive", options=OPTIONS,
    # Its finetune's epochs are --progressive-epochs (a quarter of an EASIER stage in the paper
    # preset, not from any paper).
    training_options=tuple(o for o in FINETUNE_OPTIONS if o.key != "finetune_epochs"),
    presets={"quick": {"progressive_epochs": 1, "max_stages": 8,
                       "finetune_lr": FINETUNE_PRESETS["quick"]["finetune_lr"]},
             "paper": {"progressive_epochs": 40, "max_stages": None,
                       "finetune_lr": FINETUNE_PRESETS["paper"]["finetune_lr"]},
             # a quarter of a stage, as under paper (40 of 160): 12 of 50, 7 of 30
             **{name: {"progressive_epochs": values["epochs"] // 4, "max_stages": None,
                       "finetune_lr": FINETUNE_PRESETS[name]["finetune_lr"]}
                for name, values in TRANSFER_PRESETS.items()}},
    variants={"progressive-random": {"choose": "random"},
              "progressive-last": {"choose": "last"},
              # one shot: the whole plan (--latency-budget) blended in during one finetune
              "progressive-dp": {"choose": "dp", "first_step": ONE_SHOT, "max_stages": 1}},
    label_of=lambda settings: "Progressive" + choice_suffix(settings),
    describe=_describe, order=60))
