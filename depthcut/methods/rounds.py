"""The pruning-round loop shared by NEPENTHE, EGP and IMP (METHODS section 4).

Each round: prune (the method's step), retrain with the masks, count neuron states, remove the
sites that reached zero entropy, evaluate, record. A zero-entropy site is replaced by the linear
map it computes on the measured data (`sites.freeze`): Identity when every neuron is always ON
("linearized"), `Zero` when every neuron's output is zero ("silenced": `fold` removes the branch),
else a per-channel `ChannelScale` ("scaled": 0/1 per neuron, or LeakyReLU/PReLU's slope where
OFF). All three count as removed sites. A silenced site with no skip around it would cut the
network (layer collapse): it is kept, and the run stops saying so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from depthcut.data import DataSplits
from depthcut.entropy import ENTROPY_VARIANTS, SiteCounts, layer_entropies
from depthcut.errors import ConfigError
from depthcut.masks import sparsity
from depthcut.options import Option
from depthcut.pruning import REALLOCATE, causes_layer_collapse, zero_entropy_sites
from depthcut.sites import ZERO_SURROGATE_TYPES, find_sites, freeze, frozen_form
from depthcut.stages import (
    ENTROPY_VARIANT_OPTION,
    FINETUNE_PRESETS,
    Method,
    MethodResult,
    StageRecord,
    StageRun,
    run_stages,
)
from depthcut.train import TrainConfig
from depthcut.transfer import TRANSFER_PRESETS

# A method's pruning step: prunes `model` in place, given the counts measured on it, and
# returns how many weights it pruned per layer (or per group of layers).
PruneStep = Callable[[nn.Module, dict[str, SiteCounts | None]], dict[str, int]]


@dataclass
class PruningConfig:
    zeta: float = 0.5  # fraction of the remaining weights pruned per round
    temperature: float = 1.0  # softmax temperature of the budget allocation (EGP, NEPENTHE)
    theta: float = 0.99  # NEPENTHE: go on while val top-1 >= theta * dense val top-1
    delta: float = 1.0  # EGP and IMP: go on while dense - val top-1 <= delta points
    rounds: int | None = 5  # at most this many rounds (None: until the stop rule)
    finetune: TrainConfig = field(default_factory=TrainConfig)
    entropy_mode: str = "eval"
    remove_zero_entropy: bool = True  # replace sites that reached H = 0 by their linear map
    reallocate: str = "fixed"  # budget of capped layers: "fixed" irrelevances or "recompute"
    entropy_variant: str = "paper"  # counting rule (depthcut.entropy.ENTROPY_VARIANTS)

    def __post_init__(self) -> None:
        checks = [
            (0 < self.zeta <= 1, f"zeta (fraction pruned per round) must be in (0, 1], got "
                                 f"{self.zeta}"),
            (self.temperature > 0 and math.isfinite(self.temperature),
             f"temperature must be a positive number, got {self.temperature}"),
            (0 < self.theta <= 1, f"theta (relative top-1 kept) must be in (0, 1], got "
                                  f"{self.theta}"),
            (self.delta >= 0 and math.isfinite(self.delta),
             f"delta must be a finite number >= 0 (top-1 points), got {self.delta}"),
            (self.rounds is None or self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.entropy_variant in ENTROPY_VARIANTS,
             f"entropy_variant must be one of {', '.join(ENTROPY_VARIANTS)}, got "
             f"{self.entropy_variant!r}"),
            (self.reallocate in REALLOCATE, f"reallocate must be one of {', '.join(REALLOCATE)}, "
                                            f"got {self.reallocate!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def acceptable(self, rule: str, dense_val: float, val: float) -> bool:
        """The method's stop rule: theta (relative, NEPENTHE) or delta (points, EGP and IMP)."""
        if rule == "theta":
            return val >= self.theta * dense_val
        return dense_val - val <= self.delta

    def describe(self, rule: str, metric: str = "top-1") -> str:
        """The stop rule in words; `metric` names the score compared (`StageRun.metric_label`)."""
        if rule == "theta":
            return f"theta {self.theta} (val {metric} >= theta x dense val {metric})"
        return f"delta {self.delta} {metric} points (validation split)"


class PruningRounds(Method):
    """A round: the method's pruning step, the retraining, then the sites that reached zero
    entropy replaced by their linear map; stops by theta or delta, at layer collapse, or when
    every site is removed."""

    needs_val = True

    def __init__(self, config: PruningConfig, *, name: str, prune_step: PruneStep, rule: str,
                 prunable: dict[str, list[str]] | None = None) -> None:
        self.config, self.prune_step, self.kind, self.prunable = config, prune_step, rule, prunable
        self.name = self.title = name
        self.finetune = config.finetune
        self.rule = config.describe(rule)

    def training(self, stage: int) -> str:
        return f"round {stage}"

    def removed(self) -> int:
        return len(self.linearized) + len(self.silenced) + len(self.scaled)

    def begin(self, run: StageRun) -> str | None:
        self.rule = self.config.describe(self.kind, run.metric_label)
        last = run.last
        self.linearized, self.silenced, self.scaled, self.surrogates = (
            list(last.get(key, [])) for key in ("linearized", "silenced", "scaled", "surrogates"))
        reason = None
        if not last.within_delta or last.get("layer_collapse"):
            reason = (f"round {last.stage} ended the run (layer collapse or the stop rule: "
                      f"{self.rule})")
        left = find_sites(run.model) if self.removed() < run.dense.sites_total else []
        if not left and reason is None:
            reason = "every site removed"
        batches = next(b for b in (run.splits.test, run.splits.val, run.splits.train_eval)
                       if b is not None)
        self.example = next(iter(batches))[0][:4]
        self.counts = {} if reason is not None else run.count(left, self.config)
        return reason

    def stop_before(self, run: StageRun) -> str | None:
        rounds = self.config.rounds
        if rounds is not None and run.last.stage - run.dense.stage >= rounds:
            return f"rounds={rounds} done"
        return None

    def change(self, run: StageRun) -> dict:
        entropy_before = layer_entropies(self.counts)
        return {"entropy_before": entropy_before, "pruned": self.prune_step(run.model, self.counts)}

    def after(self, run: StageRun) -> dict:
        model = run.model
        self.remaining = find_sites(model) if self.removed() < run.dense.sites_total else []
        counts = run.count(self.remaining, self.config)
        zero = zero_entropy_sites(counts)
        chosen, collapse = [], []
        if self.config.remove_zero_entropy:
            forms = {site: frozen_form(model.get_submodule(site), counts[site].always_on())[0]
                     for site in zero}
            off = [site for site, form in forms.items() if form == "off"]
            collapse = [site for site in off
                        if causes_layer_collapse(model, [*self.silenced, site], self.example)]
            off = [site for site in off if site not in collapse]
            if off and causes_layer_collapse(model, [*self.silenced, *off], self.example):
                collapse, off = collapse + off, []  # only together do they cut every path
            chosen = [site for site in zero if forms[site] != "off" or site in off]
            self.surrogates += [site for site in chosen
                                if isinstance(model.get_submodule(site), ZERO_SURROGATE_TYPES)]
            freeze(model, {site: counts[site].always_on() for site in chosen})
            self.linearized += [site for site in chosen if forms[site] == "on"]
            self.silenced += [site for site in chosen if forms[site] == "off"]
            self.scaled += [site for site in chosen if forms[site] == "scale"]
            counts = {site: c for site, c in counts.items() if site not in set(chosen)}
        self.counts = counts
        shares = sparsity(model)
        fields = {
            "sites_linearized": self.removed(),
            "linearized": list(self.linearized),
            "silenced": list(self.silenced),
            "scaled": list(self.scaled),
            "surrogates": list(self.surrogates),
            "chosen": chosen,
            "zero_entropy": zero,
            "layer_collapse": collapse,
            "entropy": layer_entropies(counts),
            "sparsity": shares["overall"],
            "sparsity_layers": shares["modules"],
        }
        if self.prunable is not None:
            fields["prunable_layers"] = self.prunable
        return fields

    def accept(self, run: StageRun, record: StageRecord) -> bool:
        ok = self.config.acceptable(self.kind, run.score(run.dense), run.score(record))
        return ok and not record["layer_collapse"]

    def stop_after(self, run: StageRun, record: StageRecord) -> str | None:
        if record["layer_collapse"]:
            return (f"layer collapse at round {record.stage}: "
                    f"{', '.join(record['layer_collapse'])} always OFF with no skip around it, "
                    "so removing it would leave a constant classifier; it was kept and the run "
                    "stopped")
        if not record.within_delta:
            return f"round {record.stage} broke the stop rule ({self.rule})"
        if not self.remaining or self.removed() >= run.dense.sites_total:
            return "every site removed"
        return None


def pruning_rounds(model: nn.Module, splits: DataSplits, config: PruningConfig, *, method: str,
                   prune_step: PruneStep, rule: str,
                   prunable: dict[str, list[str]] | None = None, **kwargs) -> MethodResult:
    """Run pruning rounds from a trained model (see `run_stages` for the keyword arguments).
    `prunable` (the site -> layers grouping the step prunes by) is kept in every round record;
    a resumed run is given the model with its masks."""
    rounds = PruningRounds(config, name=method, prune_step=prune_step, rule=rule,
                           prunable=prunable)
    return run_stages(rounds, model, splits, **kwargs)


# What NEPENTHE, EGP and IMP share for their specs (depthcut.methods.MethodSpec).
ZETA = Option("zeta", "fraction of remaining weights pruned per round (default 0.5)",
              argparse={"type": float})
TEMPERATURE = Option("temperature", "softmax temperature of the budget allocation (default 1)",
                     argparse={"type": float})
THETA = Option("theta", "stop when val top-1 < theta x dense val top-1 (default 0.99)",
               argparse={"type": float})
REALLOCATE_OPTION = Option(
    "reallocate", "when a capped layer's share is re-allocated: fixed = keep the first step's "
    "irrelevances (default); recompute = recompute them over the layers still uncapped (the EGP "
    "code)", argparse={"choices": REALLOCATE})
ROUNDS = Option("rounds", "at most this many rounds (quick preset: 5; paper: no limit)",
                argparse={"type": int})
DELTA = Option("delta", "answer: last round within delta val top-1 points (default 1)",
               argparse={"type": float})
ENTROPY_VARIANT = ENTROPY_VARIANT_OPTION
PRUNING_PRESETS = {"quick": {"rounds": 5, **FINETUNE_PRESETS["quick"]},
                   # None: until the rule
                   "paper": {"rounds": None, **FINETUNE_PRESETS["paper"]},
                   **{name: {"rounds": None, **FINETUNE_PRESETS[name]}
                      for name in TRANSFER_PRESETS}}
# The fields a round adds to its record, and the common key each is written before.
PRUNING_RECORD_FIELDS = {
    "silenced": "chosen", "scaled": "chosen", "surrogates": "chosen",
    "zero_entropy": "entropy", "layer_collapse": "entropy",
    "entropy_before": "val_top1", "pruned": "val_top1", "sparsity": "val_top1",
    "sparsity_layers": "val_top1",
}


def describe_rounds(result: MethodResult) -> str:
    """The CLI's closing line for a pruning run."""
    answer = result.answer
    return (f"\nAnswer: round {answer['stage']}, sparsity {100 * answer.get('sparsity', 0):.1f}%, "
            f"{answer['sites_linearized']}/{answer['sites_total']} sites removed, test top-1 "
            f"{answer['test_top1']:.2f} (dense {result.records[0]['test_top1']:.2f}). "
            f"Stopped: {result.stop_reason}.")
