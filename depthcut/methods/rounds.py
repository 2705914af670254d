"""The pruning-round loop shared by NEPENTHE, EGP and IMP (METHODS section 4).

Each round: prune (the method's step), retrain with the masks, count neuron states, remove the
sites that reached zero entropy (always ON: linearize; always OFF: silence, which `fold` turns
into a removed branch), evaluate, record. A site that is always OFF with no skip around it
would cut the network (layer collapse): it is not silenced, and the run stops saying so.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from depthcut.data import DataSplits
from depthcut.entropy import SiteCounts, count_states, layer_entropies
from depthcut.methods.easier import MethodResult
from depthcut.pruning import causes_layer_collapse, sparsity, zero_entropy_sites
from depthcut.run import answer_stage
from depthcut.sites import find_sites, linearize, silence
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
    remove_zero_entropy: bool = True  # linearize / silence sites that reached H = 0

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
    history: Sequence[dict] = (),
    on_round: Callable[[dict, nn.Module], None] | None = None,
    progress: bool = True,
    snapshots: Callable[[str], Checkpointing] | None = None,
) -> PruningResult:
    """Run pruning rounds from a trained model whose metrics are `dense_record` (round 0).

    To resume, pass the rounds already done as `history` and the model (with its masks) of
    the last one; `snapshots(name)` gives each retraining its epoch-level checkpointing.
    """
    if splits.val is None:
        raise ValueError(f"{method} needs a validation split for its stop rule: "
                         "use val_fraction > 0")
    dense_val = dense_record["val_top1"]
    records = [dense_record, *history]
    last = records[-1]
    linearized = list(last.get("linearized", []))
    silenced = list(last.get("silenced", []))
    sites_total = dense_record["sites_total"]
    total_epochs = last.get("total_epochs", 0)
    stop_reason = f"rounds={config.rounds} done"
    stage = last["stage"]
    finished = not last.get("within_delta", True) or bool(last.get("layer_collapse"))
    if finished:
        stop_reason = (f"round {stage} ended the run (layer collapse or the stop rule: "
                       f"{config.describe(rule)})")
    left = find_sites(model) if len(linearized) + len(silenced) < sites_total else []
    if not left and not finished:
        finished, stop_reason = True, "every site removed"
    example = next(iter(splits.test))[0][:4]
    counts = {} if finished else count_states(model, splits.train_eval, left,
                                              mode=config.entropy_mode, progress=progress)
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
        removed = len(linearized) + len(silenced)
        remaining = find_sites(model) if removed < sites_total else []
        counts = count_states(model, splits.train_eval, remaining, mode=config.entropy_mode,
                              progress=progress)
        zero = zero_entropy_sites(counts)
        chosen, collapse = [], []
        if config.remove_zero_entropy:
            on = [site for site, kind in zero.items() if kind == "on"]
            off = [site for site, kind in zero.items() if kind == "off"]
            collapse = [site for site in off
                        if causes_layer_collapse(model, [*silenced, site], example)]
            off = [site for site in off if site not in collapse]
            if off and causes_layer_collapse(model, [*silenced, *off], example):
                collapse, off = collapse + off, []  # only together do they cut every path
            linearize(model, on)
            silence(model, off)
            linearized += on
            silenced += off
            chosen = on + off
            counts = {site: c for site, c in counts.items() if site not in set(chosen)}
        val_top1 = evaluate(model, splits.val)
        shares = sparsity(model)
        record = {
            "method": method,
            "stage": stage,
            "sites_total": sites_total,
            "sites_linearized": len(linearized) + len(silenced),
            "linearized": list(linearized),
            "silenced": list(silenced),
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
        if not remaining or len(linearized) + len(silenced) >= sites_total:
            stop_reason = "every site removed"
            break
    return PruningResult(records=records, answer=answer_stage(records), stop_reason=stop_reason,
                         model=model)
