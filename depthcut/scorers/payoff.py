"""Payoff-aware choice: entropy minus what folding would save once the site is linear.

Each remaining site s that the forward pass reached is scored

    score_s = H_s - weight * saving_s,    chosen: the k lowest scores

where H_s is its layer entropy in bits (in [0, 1]) and saving_s the fraction of the folded cost
that linearizing s alone would save: a dry run copies the current model, linearizes s, folds it
(`depthcut.fold`, policy "macs") on the first `PAYOFF_EXAMPLES` inputs of the unaugmented
training split, and compares with the current model folded the same way:
saving_s = (cost_now - cost_with_s) / cost_now, or, with one step of look-ahead, half of what s
saves together with a chain neighbour (a site one linear run away,
`depthcut.graph.chain_neighbours`) when that is more: a MobileNetV2 block folds into one
convolution only once both of its sites are linear, so neither saves anything alone; the half
credit lets the first be chosen, and the second then saves the whole amount. The cost is the
folded MACs ("macs", deterministic) or the median latency of the folded model on CPU at
`latency_batch` on the `latency_backend` timer ("latency"; noisy, and a saving may then come
out negative; the dry-run batch is repeated up to that batch size). Ties keep forward order, as
`choose_sites`. The trade-off: with weight w, a site whose linearization saves a fraction f of
the folded cost is worth w * f bits of entropy, so w = 1 lets a site that saves 10% beat one 0.1
bits less entropic; w = 0 chooses exactly as "entropy"; a large w chooses by saving, entropy
breaking ties. With k > 1 each site is scored alone (no joint savings). The stage record gains
"payoff" ({site: saving alone}), "payoff_pairs" ({"a+b": saving of the pair}) and "score"
({site: score}). Cost: one fold per candidate site and per neighbour pair per stage, fine at
these sizes; a candidate whose fold raises FoldError gets saving 0. The dry runs touch neither
the model nor the random number generators training uses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from depthcut.cost import DEFAULT_TIMER, get_timer
from depthcut.distributed import all_reduce_sum, world_size
from depthcut.errors import ConfigError
from depthcut.fold import FoldError, fold
from depthcut.graph import chain_neighbours
from depthcut.masks import clone_model
from depthcut.scorers import Candidates, Scorer, Scores, example_batch, register_scorer
from depthcut.sites import linearize

PAYOFF_EXAMPLES = 8  # inputs of the batch the dry-run folds run on (MACs scale with it)
PAYOFF_LATENCY_REPEATS = 10  # runs of each folded model; the median is its latency

FoldedCost = Callable[[nn.Module, Tensor], float]  # a model's cost once folded; FoldError


def folded_macs(model: nn.Module, example: Tensor) -> float:
    """The MACs of `model` folded (policy "macs") on `example`, for the whole batch."""
    return float(fold(model, example, "macs").fold_report.macs_after)


def folded_latency(model: nn.Module, example: Tensor, timer: str = DEFAULT_TIMER,
                   batch: int = 1) -> float:
    """The median seconds of one forward of `model` folded (policy "macs") at batch size
    `batch` (`example` repeated as needed), on `timer` (`depthcut.cost`)."""
    folded = fold(model, example, "macs")
    timed = example[torch.arange(batch) % len(example)]
    return get_timer(timer).seconds(folded, timed, repeats=PAYOFF_LATENCY_REPEATS)


FOLDED_COSTS: dict[str, FoldedCost] = {"macs": folded_macs, "latency": folded_latency}
PAYOFF_COSTS = tuple(FOLDED_COSTS)  # what a saving is measured in (`payoff_cost`)


def check_payoff_settings(weight: float, cost: str) -> None:
    """ConfigError unless `weight` is a finite number >= 0 and `cost` a key of FOLDED_COSTS
    (named as a method's config names them: payoff_weight, payoff_cost)."""
    if not (weight >= 0 and math.isfinite(weight)):
        raise ConfigError(f"payoff_weight must be a finite number >= 0, got {weight}")
    if cost not in FOLDED_COSTS:
        raise ConfigError(f"payoff_cost must be one of {', '.join(map(repr, FOLDED_COSTS))}, "
                          f"got {cost!r}")


def payoff_savings(model: nn.Module, example: Tensor, sites: Iterable[str],
                   cost: FoldedCost = folded_macs, groups: Iterable[Sequence[str]] = ()
                   ) -> dict[str, float]:
    """For each of `sites` (and each group of sites in `groups`, keyed by the names joined with
    "+"), the fraction of `model`'s folded cost that linearizing it alone saves:
    (cost_now - cost_after) / cost_now. Dry runs on CPU copies: `model` and the random number
    generators are left as they were. A site whose `cost` raises FoldError (or all, when the
    model itself does not fold) saves 0."""
    candidates = [[site] for site in sites] + [list(group) for group in groups]
    with torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False):
        base = clone_model(model).cpu()
        example = example.detach().cpu()
        try:
            now = cost(base, example)
        except FoldError:
            return {"+".join(group): 0.0 for group in candidates}
        savings = {}
        for group in candidates:
            key = "+".join(group)
            try:
                after = cost(linearize(clone_model(base), group), example)
            except FoldError:
                savings[key] = 0.0
                continue
            savings[key] = (now - after) / now if now > 0 else 0.0
    return savings


def mean_over_ranks(savings: dict[str, float], device: torch.device) -> dict[str, float]:
    """`savings` averaged over the DDP processes, so that every rank chooses alike."""
    keys = list(savings)
    summed = all_reduce_sum(torch.tensor([savings[k] for k in keys], dtype=torch.float64,
                                         device=device))
    return {k: float(v) / world_size() for k, v in zip(keys, summed.tolist(), strict=True)}


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


@register_scorer
@dataclass
class PayoffScorer(Scorer):
    """score = entropy - weight * saving (see the module docstring)."""

    name = "payoff"
    weight: float = 1.0  # bits of entropy a site saving the whole folded cost is worth
    cost: str = "macs"  # what a saving is measured in: a key of FOLDED_COSTS
    latency_backend: str = DEFAULT_TIMER  # "latency": the timer it is measured on
    latency_batch: int = 1  # "latency": the batch size it is measured at

    def __post_init__(self) -> None:
        check_payoff_settings(self.weight, self.cost)
        get_timer(self.latency_backend)

    @classmethod
    def from_config(cls, config: Any) -> PayoffScorer:
        return cls(weight=config.payoff_weight, cost=config.payoff_cost,
                   latency_backend=getattr(config, "latency_backend", DEFAULT_TIMER),
                   latency_batch=getattr(config, "latency_batch", 1))

    def folded_cost(self) -> FoldedCost:
        """What a saving is measured in, with the backend and batch size where it is latency."""
        if self.cost == "latency":
            return functools.partial(folded_latency, timer=self.latency_backend,
                                     batch=self.latency_batch)
        return FOLDED_COSTS[self.cost]

    def score(self, candidates: Candidates) -> Scores:
        model, entropies = candidates.model, candidates.entropies
        measured = [s for s, h in entropies.items() if not math.isnan(h)]
        neighbours = chain_neighbours(model, measured) if measured else {}
        pairs = sorted({tuple(sorted((site, other))) for site in measured
                        for other in neighbours[site] if other in measured})
        savings = payoff_savings(model, example_batch(candidates.examples, PAYOFF_EXAMPLES),
                                 measured, self.folded_cost(), pairs) if measured else {}
        if self.cost == "latency" and measured and world_size() > 1:
            # Timings differ between processes: average them so every rank chooses alike.
            savings = mean_over_ranks(savings, next(model.parameters()).device)
        scores = payoff_scores(entropies, pair_credit(savings, neighbours), self.weight)
        return Scores(scores, {
            "payoff": {site: savings[site] for site in measured},
            "payoff_pairs": {key: value for key, value in savings.items() if "+" in key},
            "score": scores})
