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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from depthcut.data import DataSplits
from depthcut.entropy import ENTROPY_VARIANTS, SiteCounts, count_states, layer_entropies
from depthcut.methods.easier import MethodResult, entropy_batches_and_mode
from depthcut.pruning import REALLOCATE, causes_layer_collapse, sparsity, zero_entropy_sites
from depthcut.run import answer_stage
from depthcut.sites import ZERO_SURROGATE_TYPES, find_sites, freeze, frozen_form
from depthcut.train import Checkpointing, TrainConfig, evaluate, train

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
                raise ValueError(message)

    def acceptable(self, rule: str, dense_val: float, val: float) -> bool:
        """The method's stop rule: theta (relative, NEPENTHE) or delta (points, EGP and IMP)."""
        if rule == "theta":
            return val >= self.theta * dense_val
        return dense_val - val <= self.delta

    def describe(self, rule: str) -> str:
        if rule == "theta":
            return f"theta {self.theta} (val top-1 >= theta x dense val top-1)"
        return f"delta {self.delta} top-1 points (validation split)"


PruningResult = MethodResult


def pruning_rounds(
    model: nn.Module,
    splits: DataSplits,
    config: PruningConfig,
    *,
    method: str,
    prune_step: PruneStep,
    rule: str,
    dense_record: dict,
    prunable: dict[str, list[str]] | None = None,
    history: Sequence[dict] = (),
    on_round: Callable[[dict, nn.Module], None] | None = None,
    progress: bool = True,
    snapshots: Callable[[str], Checkpointing] | None = None,
) -> PruningResult:
    """Run pruning rounds from a trained model whose metrics are `dense_record` (round 0).

    To resume, pass the rounds already done as `history` and the model (with its masks) of
    the last one; `snapshots(name)` gives each retraining its epoch-level checkpointing.
    `prunable` (the site -> layers grouping the step prunes by) is kept in every round record.
    """
    if splits.val is None:
        raise ValueError(f"{method} needs a validation split for its stop rule: "
                         "use val_fraction > 0")
    dense_val = dense_record["val_top1"]
    records = [dense_record, *history]
    last = records[-1]
    linearized = list(last.get("linearized", []))
    silenced = list(last.get("silenced", []))
    scaled = list(last.get("scaled", []))
    surrogates = list(last.get("surrogates", []))
    sites_total = dense_record["sites_total"]
    total_epochs = last.get("total_epochs", 0)
    stop_reason = f"rounds={config.rounds} done"
    stage = last["stage"]
    finished = not last.get("within_delta", True) or bool(last.get("layer_collapse"))
    if finished:
        stop_reason = (f"round {stage} ended the run (layer collapse or the stop rule: "
                       f"{config.describe(rule)})")
    left = find_sites(model) if len(linearized) + len(silenced) + len(scaled) < sites_total else []
    if not left and not finished:
        finished, stop_reason = True, "every site removed"
    example = next(iter(splits.test))[0][:4]

    def count(sites: list[str]) -> dict[str, SiteCounts | None]:
        batches, mode = entropy_batches_and_mode(splits, config)
        return count_states(model, batches, sites, mode=mode, progress=progress,
                            variant=config.entropy_variant)

    counts = {} if finished else count(left)
    while not finished and (config.rounds is None
                            or stage - dense_record["stage"] < config.rounds):
        stage += 1
        start = time.perf_counter()
        entropy_before = layer_entropies(counts)
        pruned = prune_step(model, counts)
        fit = train(model, splits.train, config.finetune, progress=progress,
                    desc=f"round {stage}",
                    checkpointing=snapshots(f"round {stage}") if snapshots else None)
        total_epochs += config.finetune.epochs
        removed = len(linearized) + len(silenced) + len(scaled)
        remaining = find_sites(model) if removed < sites_total else []
        counts = count(remaining)
        zero = zero_entropy_sites(counts)
        chosen, collapse = [], []
        if config.remove_zero_entropy:
            forms = {site: frozen_form(model.get_submodule(site), counts[site].always_on())[0]
                     for site in zero}
            off = [site for site, form in forms.items() if form == "off"]
            collapse = [site for site in off
                        if causes_layer_collapse(model, [*silenced, site], example)]
            off = [site for site in off if site not in collapse]
            if off and causes_layer_collapse(model, [*silenced, *off], example):
                collapse, off = collapse + off, []  # only together do they cut every path
            chosen = [site for site in zero if forms[site] != "off" or site in off]
            surrogates += [site for site in chosen
                           if isinstance(model.get_submodule(site), ZERO_SURROGATE_TYPES)]
            freeze(model, {site: counts[site].always_on() for site in chosen})
            linearized += [site for site in chosen if forms[site] == "on"]
            silenced += [site for site in chosen if forms[site] == "off"]
            scaled += [site for site in chosen if forms[site] == "scale"]
            counts = {site: c for site, c in counts.items() if site not in set(chosen)}
        val_top1 = evaluate(model, splits.val)
        shares = sparsity(model)
        record = {
            "method": method,
            "stage": stage,
            "sites_total": sites_total,
            "sites_linearized": len(linearized) + len(silenced) + len(scaled),
            "linearized": list(linearized),
            "silenced": list(silenced),
            "scaled": list(scaled),
            "surrogates": list(surrogates),
            "chosen": chosen,
            "zero_entropy": zero,
            "layer_collapse": collapse,
            "entropy": layer_entropies(counts),
            "entropy_before": entropy_before,
            "pruned": pruned,
            "sparsity": shares["overall"],
            "sparsity_layers": shares["modules"],
            "val_top1": val_top1,
            "test_top1": evaluate(model, splits.test),
            "drop": dense_val - val_top1,
            "within_delta": config.acceptable(rule, dense_val, val_top1) and not collapse,
            "epochs": config.finetune.epochs,
            "total_epochs": total_epochs,
            "train_loss": fit.epochs[-1].loss if fit.epochs else None,
            "seconds": time.perf_counter() - start,
        }
        if prunable is not None:
            record["prunable_layers"] = prunable
        records.append(record)
        if on_round is not None:
            on_round(record, model)
        if collapse:
            stop_reason = (
                f"layer collapse at round {stage}: {', '.join(collapse)} always OFF with no "
                "skip around it, so removing it would leave a constant classifier; it was kept "
                "and the run stopped"
            )
            break
        if not record["within_delta"]:
            stop_reason = f"round {stage} broke the stop rule ({config.describe(rule)})"
            break
        if not remaining or len(linearized) + len(silenced) + len(scaled) >= sites_total:
            stop_reason = "every site removed"
            break
    return PruningResult(records=records, answer=answer_stage(records), stop_reason=stop_reason,
                         model=model)
