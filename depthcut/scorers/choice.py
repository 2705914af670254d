"""The site-choice settings shared by every method that ranks sites (EASIER, progressive).

A method's config inherits `ChoiceSettings`, so `choose` and what the scorers read
(`Scorer.from_config`) are one set of fields and one set of options (`CHOICE_OPTIONS`) for
all of them: a new scorer's setting is added here once.
"""

from __future__ import annotations

from dataclasses import dataclass

from depthcut.cost import TIMERS, get_timer
from depthcut.errors import ConfigError
from depthcut.options import Option
from depthcut.scorers import SCORERS, check_choice
from depthcut.scorers.dp import (
    DEFAULT_SPAN,
    DP_IMPORTANCES,
    DP_MERGES,
    VERIFY_ROUNDS,
    check_dp_settings,
)
from depthcut.scorers.payoff import PAYOFF_COSTS, check_payoff_settings


@dataclass
class ChoiceSettings:
    """Which sites go first (`choose`: a scorer's name, `depthcut.scorers.SCORERS`) and the
    settings of the scorers that read them."""

    choose: str = "entropy"  # "entropy" (the papers) | "payoff" | "random" | "last" | ...
    payoff_weight: float = 1.0  # "payoff": w in score = entropy - w * saving
    payoff_cost: str = "macs"  # "payoff": what a saving is measured in: "macs" | "latency"
    choice_seed: int = 0  # "random": the seed of the random order (with the stage number)
    latency_backend: str = "eager"  # the timer (`depthcut.cost.TIMERS`) latency is measured on
    latency_budget: float | None = None  # "dp": latency allowed, a fraction of the dense model's
    latency_batch: int = 1  # the batch size latency-aware choice times at
    dp_span: int = DEFAULT_SPAN  # "dp": most sites inside one merged segment (table size)
    latency_table: str | None = None  # "dp": the table's JSON file (None: the default cache)
    dp_importance: str = "entropy"  # "dp": what a kept site is worth
    dp_verify: int = VERIFY_ROUNDS  # "dp": plans measured whole, the budget tightened on a miss
    dp_merge: str = "macs"  # "dp": how each segment is merged: "macs" | "fastest"

    def __post_init__(self) -> None:
        check_choice(self.choose)
        check_payoff_settings(self.payoff_weight, self.payoff_cost)
        get_timer(self.latency_backend)
        budget = self.latency_budget
        if self.latency_batch < 1:
            raise ConfigError(f"latency_batch must be >= 1, got {self.latency_batch}")
        check_dp_settings(budget, self.dp_span, self.dp_importance, self.dp_merge)
        if self.dp_verify < 0:
            raise ConfigError(f"dp_verify must be >= 0 (0: trust the table), got {self.dp_verify}")
        if self.choose == "dp" and budget is None:
            raise ConfigError("choose dp needs latency_budget (--latency-budget: a fraction of "
                              "the BN-folded dense model's latency, e.g. 0.6)")


CHOICE_OPTIONS = (
    Option("choose", "site choice: entropy = lowest entropy (default); payoff = lowest entropy - "
           "payoff weight x the fraction of the folded cost that linearizing the site would "
           "save (a dry-run fold per site per stage); random = a seeded random order "
           "(--choice-seed); last = the deepest site first; dp = the sites a dynamic programme "
           "removes to fit --latency-budget keeping the most entropy (a latency table)",
           argparse={"choices": lambda: tuple(SCORERS)}),
    Option("payoff_weight", "with --choose payoff: bits of entropy a site saving the whole "
           "folded cost is worth (default 1; 0 = entropy only)", argparse={"type": float}),
    Option("payoff_cost", "with --choose payoff: savings in folded MACs (default) or measured "
           "latency on --latency-backend (noisy)", argparse={"choices": PAYOFF_COSTS}),
    Option("choice_seed", "with --choose random or --dp-importance random: the seed of the "
           "random order (default 0)",
           argparse={"type": int}),
    Option("latency_backend", "where latency is measured: eager (PyTorch as it is, default), "
           "or another registered timer", argparse={"choices": lambda: tuple(TIMERS)}),
    Option("latency_budget", "with --choose dp: the latency allowed, a fraction of the "
           "BN-folded dense model's on --latency-backend at --latency-batch (0.6 = 60%%)",
           argparse={"type": float}),
    Option("latency_batch", "the batch size latency-aware site choice times at (default 1)",
           argparse={"type": int}),
    Option("dp_span", f"with --choose dp: most sites one merged segment may hold inside "
           f"(default {DEFAULT_SPAN}; bounds the latency table)", argparse={"type": int}),
    Option("latency_table", "with --choose dp: the latency table's JSON file (default "
           "$DEPTHCUT_LATENCY_TABLE, else ~/.cache/depthcut/latency/table.json)"),
    Option("dp_verify", "with --choose dp: how many plans are measured whole against the dense "
           f"model, the budget tightened after a miss (default {VERIFY_ROUNDS}; 0 = trust the "
           "latency table's estimate)", argparse={"type": int}),
    Option("dp_importance", "with --choose dp: what the plan keeps: entropy (default: a kept "
           "site is worth its entropy) or finetune (LayerMerge-like: the loss a segment's "
           "linearization adds after a short finetune of a copy; one per segment, dear); the "
           "controls at the same latency: random (seeded by --choice-seed) or last (deepest "
           "first)",
           argparse={"choices": DP_IMPORTANCES}),
    Option("dp_merge", "with --choose dp: how each segment is merged: macs (default: the exact "
           "fold of least MACs, in parts where merging whole costs more) or fastest (each "
           "segment also timed merged whole, every exact merge, and planned and folded in its "
           "faster form; the table times twice as many segments)",
           argparse={"choices": DP_MERGES}),
)


def choice_suffix(settings: dict) -> str:
    """What a method's label adds for a choice other than entropy: " (payoff)", " (random)"."""
    choose = settings.get("choose") or "entropy"
    return "" if choose == "entropy" else f" ({choose})"
