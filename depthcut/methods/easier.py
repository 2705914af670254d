"""EASIER (METHODS section 3, Alg. 1): linearize the lowest-entropy site, finetune, repeat.

The loop stops at the first stage whose validation top-1 falls more than `delta` points below the
dense model's (or validation balanced accuracy: the run's metric, `StageRun.score`); the answer
is the last stage within delta. With `choose="payoff"` a site's score
also weighs what folding would save once it is linear (see `EasierConfig`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from depthcut.data import DataSplits
from depthcut.distributed import all_reduce_sum, world_size
from depthcut.entropy import ENTROPY_VARIANTS, layer_entropies
from depthcut.errors import ConfigError
from depthcut.fold import FoldError, fold, median_seconds
from depthcut.graph import chain_neighbours
from depthcut.masks import clone_model
from depthcut.sites import find_sites, linearize
from depthcut.stages import Method, MethodResult, StageRecord, StageRun, run_stages
from depthcut.train import TrainConfig

CHOICES = ("entropy", "payoff")
PAYOFF_COSTS = ("macs", "latency")
PAYOFF_EXAMPLES = 8  # inputs of the batch the dry-run folds run on (MACs scale with it)
PAYOFF_LATENCY_REPEATS = 10  # batch-1 runs of each folded model; the median is its latency


@dataclass
class EasierConfig:
    """EASIER's settings.

    Site choice (`choose`): "entropy" (default, the paper) linearizes the k sites of lowest
    layer entropy. "payoff" scores each remaining site s that the forward pass reached by

        score_s = H_s - payoff_weight * saving_s,    chosen: the k lowest scores

    where H_s is its layer entropy in bits (in [0, 1]) and saving_s the fraction of the folded
    cost that linearizing s alone would save: a dry run copies the current model, linearizes s,
    folds it (`depthcut.fold`, policy "macs") on the first `PAYOFF_EXAMPLES` inputs of the
    unaugmented training split, and compares with the current model folded the same way:
    saving_s = (cost_now - cost_with_s) / cost_now, or, with one step of look-ahead, half of
    what s saves together with a chain neighbour (a site one linear run away,
    `depthcut.graph.chain_neighbours`) when that is more: a MobileNetV2 block folds into one
    convolution only once both of its sites are linear, so neither saves anything alone; the
    half credit lets the first be chosen, and the second then saves the whole amount. The cost
    (`payoff_cost`) is the folded MACs ("macs", deterministic) or the median batch-1 latency of
    the folded model on CPU ("latency"; noisy, and a saving may then come out negative). Ties
    keep forward order, as `choose_sites`. The trade-off: with payoff_weight w, a site whose
    linearization saves a fraction f of the folded cost is worth w * f bits of entropy, so w = 1
    lets a site that saves 10% beat one 0.1 bits less entropic; w = 0 chooses exactly as
    "entropy"; a large w chooses by saving, entropy breaking ties. With k > 1 each site is
    scored alone (no joint savings). The stage record gains "payoff" ({site: saving alone}),
    "payoff_pairs" ({"a+b": saving of the pair}) and "score" ({site: score}).
    Cost: one fold per candidate site and per neighbour pair per stage, fine at these sizes;
    a candidate whose fold raises FoldError gets saving 0. The dry runs touch neither the model
    nor the random number generators training uses.
    """

    delta: float = 1.0  # top-1 points the answer may lose against the dense model
    k: int = 1  # sites linearized per stage (EASIER k-x)
    max_stages: int | None = None  # stop after this many stages even within delta
    finetune: TrainConfig = field(default_factory=TrainConfig)
    entropy_mode: str = "eval"  # ignored by "easier-code", which counts in train() mode
    # Counting rule (depthcut.entropy): "paper" on the unaugmented training split; "easier-code"
    # counts on a replay of the augmented training loader's last epoch; "egp-code" as "paper".
    entropy_variant: str = "paper"
    choose: str = "entropy"  # "entropy" | "payoff" (see the class docstring)
    payoff_weight: float = 1.0  # w in score = entropy - w * saving ("payoff" only)
    payoff_cost: str = "macs"  # what a saving is measured in: "macs" | "latency"

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
        if self.choose not in CHOICES:
            raise ConfigError(
                f"choose must be one of {', '.join(map(repr, CHOICES))}, got {self.choose!r}")
        if not (self.payoff_weight >= 0 and math.isfinite(self.payoff_weight)):
            raise ConfigError(
                f"payoff_weight must be a finite number >= 0, got {self.payoff_weight}")
        if self.payoff_cost not in PAYOFF_COSTS:
            raise ConfigError(
                f"payoff_cost must be one of {', '.join(map(repr, PAYOFF_COSTS))}, "
                f"got {self.payoff_cost!r}")


def choose_sites(entropies: dict[str, float], k: int) -> list[str]:
    """The k sites of lowest entropy; ties keep forward order; unreached (NaN) sites are skipped."""
    measured = [(h, i, name) for i, (name, h) in enumerate(entropies.items()) if not math.isnan(h)]
    return [name for _, _, name in sorted(measured)[:k]]


def folded_cost(model: nn.Module, example: Tensor, cost: str = "macs") -> float:
    """The cost of `model` folded (policy "macs") on `example`: its MACs for the whole batch,
    or for "latency" the median seconds of one batch-1 forward. Raises FoldError."""
    folded = fold(model, example, "macs")
    if cost == "macs":
        return float(folded.fold_report.macs_after)
    x = example[:1]
    return median_seconds(lambda: folded(x), repeats=PAYOFF_LATENCY_REPEATS)


def payoff_savings(model: nn.Module, example: Tensor, sites: Iterable[str],
                   cost: str = "macs", groups: Iterable[Sequence[str]] = ()
                   ) -> dict[str, float]:
    """For each of `sites` (and each group of sites in `groups`, keyed by the names joined with
    "+"), the fraction of `model`'s folded cost (`folded_cost`) that linearizing it alone
    saves: (cost_now - cost_after) / cost_now. Dry runs on CPU copies: `model` and the random
    number generators are left as they were. A site whose fold raises FoldError (or all, when
    the model itself does not fold) saves 0."""
    candidates = [[site] for site in sites] + [list(group) for group in groups]
    with torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False):
        base = clone_model(model).cpu()
        example = example.detach().cpu()
        try:
            now = folded_cost(base, example, cost)
        except FoldError:
            return {"+".join(group): 0.0 for group in candidates}
        savings = {}
        for group in candidates:
            key = "+".join(group)
            try:
                after = folded_cost(linearize(clone_model(base), group), example, cost)
            except FoldError:
                savings[key] = 0.0
                continue
            savings[key] = (now - after) / now if now > 0 else 0.0
    return savings


def pair_credit(savings: dict[str, float], neighbours: dict[str, list[str]]) -> dict[str, float]:
    """A site's saving with one step of look-ahead: the larger of what it saves alone and half
    of what it saves together with a chain neighbour (`depthcut.graph.chain_neighbours`), so
    the first site of a pair that only pays together is worth choosing; once it is linear, the
    second saves the whole amount alone."""
    credit = {}
    for site, alone in ((s, v) for s, v in savings.items() if "+" not in s):
        pairs = [savings.get(f"{site}+{other}", savings.get(f"{other}+{site}", 0.0))
                 for other in neighbours.get(site, [])]
        credit[site] = max([alone, *(pair / 2 for pair in pairs)])
    return credit


def payoff_scores(entropies: dict[str, float], savings: dict[str, float], weight: float
                  ) -> dict[str, float]:
    """score = entropy - weight * saving per measured site (NaN entropies are left out)."""
    return {name: h - weight * savings.get(name, 0.0) for name, h in entropies.items()
            if not math.isnan(h)}


def example_batch(batches: Iterable, size: int = PAYOFF_EXAMPLES) -> Tensor:
    """The first `size` inputs of `batches`, read from a shallow copy so that a BatchLoader's
    epoch counter is not advanced."""
    inputs = next(iter(copy.copy(batches)))
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    return inputs[:size]


def within_delta(dense_top1: float, top1: float, delta: float) -> bool:
    """The stop rule: a stage is acceptable while dense - current <= delta (in the run's
    metric: top-1 or balanced accuracy, `StageRun.score`)."""
    return dense_top1 - top1 <= delta


class Easier(Method):
    """Chooses the k lowest-entropy sites (or lowest payoff scores), linearizes them; stops
    beyond delta."""

    name, title, needs_val = "easier", "EASIER", True

    def __init__(self, config: EasierConfig) -> None:
        self.config = config
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
        entropies = layer_entropies(run.count(self.remaining, self.config))
        extras = {}
        if self.config.choose == "payoff":
            extras = self.payoff(run, entropies)
            chosen = choose_sites(extras["score"], self.config.k)
        else:
            chosen = choose_sites(entropies, self.config.k)
        if not chosen:
            return "no remaining site was reached by the forward pass"
        linearize(run.model, chosen)
        self.linearized += chosen
        return {"sites_linearized": len(self.linearized), "linearized": list(self.linearized),
                "chosen": chosen, "entropy": entropies, **extras}

    def payoff(self, run: StageRun, entropies: dict[str, float]) -> dict:
        """The record's "payoff" (saving per measured site) and "score" (see EasierConfig)."""
        measured: Sequence[str] = [s for s, h in entropies.items() if not math.isnan(h)]
        neighbours = chain_neighbours(run.model, list(measured)) if measured else {}
        pairs = sorted({tuple(sorted((site, other))) for site in measured
                        for other in neighbours[site] if other in measured})
        savings = payoff_savings(run.model, example_batch(run.splits.train_eval), measured,
                                 self.config.payoff_cost, pairs) if measured else {}
        if self.config.payoff_cost == "latency" and measured and world_size() > 1:
            # Timings differ between processes: average them so every rank chooses alike.
            device = next(run.model.parameters()).device
            keys = list(savings)
            summed = all_reduce_sum(torch.tensor([savings[k] for k in keys],
                                               dtype=torch.float64, device=device))
            savings = {k: float(v) / world_size() for k, v in zip(keys, summed.tolist(),
                                                                   strict=True)}
        credit = pair_credit(savings, neighbours)
        return {"payoff": {site: savings[site] for site in measured},
                "payoff_pairs": {key: value for key, value in savings.items() if "+" in key},
                "score": payoff_scores(entropies, credit, self.config.payoff_weight)}

    def accept(self, run: StageRun, record: StageRecord) -> bool:
        return within_delta(run.score(run.dense), run.score(record), self.config.delta)

    def stop_after(self, run: StageRun, record: StageRecord) -> str | None:
        if record.within_delta:
            return None
        return (f"stage {record.stage} lost {record.drop:.2f} val {run.metric_label} points > "
                f"delta {self.config.delta}")


def easier(model: nn.Module, splits: DataSplits, config: EasierConfig, **kwargs) -> MethodResult:
    """Run EASIER from a trained model (see `run_stages` for the keyword arguments). Sites
    already linearized in the model are simply not found again."""
    return run_stages(Easier(config), model, splits, **kwargs)
