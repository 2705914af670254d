"""Latency-budgeted choice by dynamic programming ("dp"), after LayerMerge (Kim et al., ICML 2024)
with entropy as the cheap importance.

Sites s_1..s_n in forward order with sentinels s_0 (input) and s_{n+1} (output); a plan keeps
0 = a_0 < a_1 < ... < a_m = n+1 and linearizes every other site. Its latency is estimated as
the sum of its segments' measured latencies (`depthcut.cost.latency_table`: each segment
folded, cut out and timed on the chosen backend at its real input shape, cached on disk), and
`plan_sites` finds, exactly, the plan that keeps the most importance (default: the sum of the
kept sites' entropies, i.e. removes the least entropy) with estimated latency <= budget x the
dense model's (every site kept, BatchNorm folded, same backend, batch and table). How each
segment is merged (`dp_merge`): in the "macs" form, or ("fastest") in whichever of the "macs"
and "shallow" forms was timed faster, side by side; the plan records each segment's form and
modules, and the check and the run's folded answer fold it so (`plan_fold_policy`).

Exactness: for every boundary position the DP keeps the Pareto frontier of (latency, importance
removed) over partial plans ending there; a point dominated by another (no faster and no less
removed) cannot be part of a better plan, since both continue alike, and a point already over
the budget cannot come back under it (latencies are >= 0). The optimum over all plans whose
segments hold at most `span` sites inside is therefore on the frontier of the output sentinel.
Ties on importance go to the faster plan. Unreached sites (NaN entropy) are always kept. When
no plan meets the budget the fastest plan is returned with `feasible` False (best effort: the
scorer then warns and records it).

As a scorer: the planned sites get their worth (`dp_importance`: by default their entropy) as
score (so EASIER with k=1 takes the plan's lowest-entropy site, finetunes, and plans again on
the next stage's entropies; progressive takes up to its step of them), every other site NaN
(never chosen); the record gains "dp": the plan (sites, segments and their merge form, predicted
latency ratio, table hits and misses, seconds). Re-planning reads the cached table: no fold and
no timing once it exists.
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from depthcut.cost.latency_table import (
    DEFAULT_SPAN,
    LatencyTable,
    SegmentTable,
    TableContext,
    build_form_tables,
    build_segment_table,
    fastest_forms,
    measured_ratio,
)
from depthcut.distributed import broadcast_object, rank, world_size
from depthcut.errors import ConfigError
from depthcut.fold import FormsPolicy
from depthcut.masks import clone_model
from depthcut.scorers import Candidates, Scorer, Scores, example_batch, register_scorer
from depthcut.sites import find_sites, linearize

# What the plan keeps (`dp_importance`): "entropy" (a kept site is worth its entropy), or
# "finetune" (LayerMerge-like: a segment's cost is the loss its linearization adds after a
# short finetune of a copy; `finetune_importance`); the controls at the same latency: "random"
# (a seeded uniform worth per site, `choice_seed`) and "last" (a site is worth its depth from
# the end: the deepest goes first wherever latency allows).
DP_IMPORTANCES = ("entropy", "finetune", "random", "last")
FINETUNE_STEPS = 8  # SGD steps of each copy (dp_importance "finetune")
# A segment timed alone is not the same segment inside the whole model (a backend fuses and
# schedules across segment borders; ONNX Runtime at batch 128 summed MobileNetV2's segments to
# 2.3x its whole time): each plan is therefore measured whole, and while it misses the budget
# the DP plans again under a budget tightened by the miss, at most this many times.
VERIFY_ROUNDS = 4
FINETUNE_LR = 0.01
# How each segment is merged (`dp_merge`): "macs" (the exact fold of least multiply-adds, in
# parts where merging whole would cost more) or "fastest" (each segment also timed in the
# "shallow" form, every exact merge, and planned and folded in its faster form).
DP_MERGES = ("macs", "fastest")
MERGE_FORMS_OF = {"macs": ("macs",), "fastest": ("macs", "shallow")}


@dataclass
class Plan:
    """The DP's answer: boundary positions kept (0 and n+1 included), its estimated seconds,
    the importance it removes, and whether it meets the budget."""

    kept: list[int]
    seconds: float
    removed: float
    feasible: bool

    def linearized(self, n: int) -> list[int]:
        """Boundary positions (1..n) of the sites the plan linearizes."""
        kept = set(self.kept)
        return [k for k in range(1, n + 1) if k not in kept]


def plan_sites(importance: Sequence[float], seconds: Mapping[tuple[int, int], float],
               budget: float, overhead: float = 0.0,
               segment_cost: Mapping[tuple[int, int], float] | None = None) -> Plan:
    """The plan over len(importance) sites keeping the most importance with
    overhead + sum of its segments' `seconds` <= `budget` (see the module docstring).

    `importance[k]` belongs to boundary k+1; NaN marks a site that must stay. `seconds` holds
    the segments a plan may use (a missing one is not allowed). Infeasible: the fastest plan,
    `feasible` False. `segment_cost`, where given, is the importance a segment with sites
    inside removes (in place of the sum of their `importance`; still additive over segments,
    so the DP stays exact)."""
    n = len(importance)
    must_keep = [math.isnan(h) for h in importance]
    # Importance removed by a segment: the sites strictly inside it (prefix sums).
    prefix = [0.0]
    for h in importance:
        prefix.append(prefix[-1] + (0.0 if math.isnan(h) else h))

    def removed(i: int, j: int) -> float:
        if segment_cost is not None and j - i > 1:
            return segment_cost[(i, j)]
        return prefix[j - 1] - prefix[i]

    ends: dict[int, list[tuple[int, int]]] = {}
    for (i, j) in seconds:
        if any(must_keep[k] for k in range(i, j - 1)):
            continue
        ends.setdefault(j, []).append((i, j))
    # frontier[j]: Pareto points (seconds, removed, back pointer) of plans ending kept at j.
    Point = tuple[float, float, tuple[int, int] | None]
    frontier: dict[int, list[Point]] = {0: [(overhead, 0.0, None)]}
    fastest: dict[int, Point] = {0: (overhead, 0.0, None)}
    for j in range(1, n + 2):
        candidates: list[tuple[float, float, tuple[int, int]]] = []
        best_fast: Point | None = None
        for (i, _) in ends.get(j, []):
            cost = seconds[(i, j)]
            for index, (t, r, _) in enumerate(frontier.get(i, [])):
                if t + cost <= budget:
                    candidates.append((t + cost, r + removed(i, j), (i, index)))
            if i in fastest:
                t, r, _ = fastest[i]
                point = (t + cost, r + removed(i, j), (i, -1))
                if best_fast is None or point[:2] < best_fast[:2]:
                    best_fast = point
        candidates.sort(key=lambda p: (p[0], p[1]))
        kept_points: list[Point] = []
        for point in candidates:  # ascending seconds: keep strictly decreasing removal
            if not kept_points or point[1] < kept_points[-1][1]:
                kept_points.append(point)
        if kept_points:
            frontier[j] = kept_points
        if best_fast is not None:
            fastest[j] = best_fast

    def walk(j: int, index: int) -> list[int]:
        kept = [j]
        while j != 0:
            point = fastest[j] if index == -1 else frontier[j][index]
            j, index = point[2]
            kept.append(j)
        return kept[::-1]

    if n + 1 in frontier:
        best = min(range(len(frontier[n + 1])),
                   key=lambda k: (frontier[n + 1][k][1], frontier[n + 1][k][0]))
        t, r, _ = frontier[n + 1][best]
        return Plan(walk(n + 1, best), t, r, True)
    if n + 1 not in fastest:
        raise ConfigError("no plan: no chain of measured segments reaches the output")
    t, r, _ = fastest[n + 1]
    return Plan(walk(n + 1, -1), t, r, False)


@dataclass
class DenseReference:
    """The dense model's estimated seconds and the context it was read in."""

    seconds: float
    context: str


@register_scorer
@dataclass
class DpScorer(Scorer):
    """Plans the sites to linearize under a latency budget (see the module docstring)."""

    name = "dp"
    volatile_fields: ClassVar[tuple[str, ...]] = ("dp_cost",)
    needs_dense: ClassVar[bool] = True  # the budget is relative to the dense model
    budget: float = 0.6  # latency allowed, a fraction of the dense model's estimate
    backend: str = "eager"
    batch: int = 1
    span: int = DEFAULT_SPAN
    table_path: str | None = None  # None: $DEPTHCUT_LATENCY_TABLE or ~/.cache/depthcut/...
    importance: str = "entropy"
    seed: int = 0  # importance "random"
    verify: int = VERIFY_ROUNDS  # plans measured whole (and the budget tightened) at most
    merge: str = "macs"  # DP_MERGES: how each segment's merged form is chosen
    progress: bool = True  # a bar while the latency table is built
    dense: DenseReference | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_dp_settings(self.budget, self.span, self.importance, self.merge)

    @classmethod
    def from_config(cls, config: Any) -> DpScorer:
        if config.latency_budget is None:
            raise ConfigError("--choose dp needs --latency-budget (a fraction of the "
                              "BN-folded dense model's latency, e.g. 0.6)")
        return cls(budget=config.latency_budget, backend=config.latency_backend,
                   batch=config.latency_batch, span=getattr(config, "dp_span", DEFAULT_SPAN),
                   table_path=getattr(config, "latency_table", None),
                   importance=getattr(config, "dp_importance", "entropy"),
                   seed=getattr(config, "choice_seed", 0),
                   verify=getattr(config, "dp_verify", VERIFY_ROUNDS),
                   merge=getattr(config, "dp_merge", "macs"))

    def context(self, form: str = "macs") -> TableContext:
        """Where the table is read: backend, batch, device, threads, and the merge form ("macs":
        the dense reference's, the BN-folded dense model)."""
        device = "cuda" if self.backend == "cuda" else "cpu"
        return TableContext(self.backend, self.batch, device, form=form)

    def score(self, candidates: Candidates) -> Scores:
        """Under torch.distributed rank 0 alone builds the table, plans and measures, and
        every rank takes its answer (entropies are already summed over ranks): tables timed on
        every rank would be noisy, could plan differently and race on one file. A failure on
        rank 0 is sent too, so the others raise instead of waiting."""
        if world_size() <= 1:
            return self._score(candidates)
        answer: Scores | str | None = None
        if rank() == 0:
            try:
                answer = self._score(candidates)
            except Exception as error:
                broadcast_object(f"{type(error).__name__}: {error}")
                raise
        answer = broadcast_object(answer)
        if not isinstance(answer, Scores):
            raise ConfigError(f"--choose dp failed on rank 0: {answer}")
        return answer

    def _score(self, candidates: Candidates) -> Scores:
        start = time.perf_counter()
        entropies = candidates.entropies
        sites = list(entropies)
        sample = example_batch(candidates.examples, 1)
        table = LatencyTable(self.table_path)
        context = self.context()
        importance = site_importance(entropies, self.importance, self.seed)
        # The table is timed in float32 whatever autocast a run holds (`--amp`).
        with torch.random.fork_rng(devices=[]), torch.autocast("cpu", enabled=False):
            tables = build_form_tables(
                candidates.model, sample, context, table, sites, self.span,
                allowed=[not math.isnan(h) for h in importance], progress=self.progress,
                forms=MERGE_FORMS_OF[self.merge])
            # The dense reference is the BN-folded dense model: the "macs" form, every site kept.
            dense = self._dense_seconds(candidates, sample, context, table, tables["macs"],
                                        sites)
        segments = fastest_forms(list(tables.values()))
        segment_cost = None
        if self.importance == "finetune":
            with torch.random.fork_rng(devices="all" if torch.cuda.is_available() else []):
                segment_cost = finetune_importance(candidates.model, sites, segments.seconds,
                                                   candidates.examples)
        plan, measured, rounds = self._plan_and_check(
            candidates, sample, context, importance, segments, dense, segment_cost)
        chosen = [sites[k - 1] for k in plan.linearized(len(sites))]
        within = plan.feasible if measured is None else measured <= self.budget
        if not within:
            shown = plan.seconds / dense if measured is None else measured
            warnings.warn(f"dp: no plan meets latency budget {self.budget:g} ("
                          f"{'measured' if measured is not None else 'estimated'} "
                          f"{shown:.3f} of dense at best); taking the fastest found",
                          stacklevel=3)
        names = ["input", *sites, "output"]
        record = {
            "sites": chosen,
            "kept": [names[k] for k in plan.kept[1:-1]],
            "segments": _segment_records(plan, segments, names),
            "merge": self.merge,
            "budget": self.budget, "predicted_ratio": plan.seconds / dense,
            "within_budget": within, "importance": self.importance,
            "measured_ratio": measured, "checked_plans": rounds,
            "removed": plan.removed, "dense_ms": dense * 1e3, "backend": self.backend,
            "batch": self.batch, "span": self.span, "context": context.key()}
        cost = {**segments.to_dict(), "seconds": time.perf_counter() - start,
                "table": str(table.path)}
        scores = {site: (worth if site in chosen else math.nan)
                  for site, worth in zip(sites, importance, strict=True)}
        nothing = None if chosen else (
            f"the latency plan removes no more sites (estimated {plan.seconds / dense:.3f} of "
            f"dense <= budget {self.budget:g})")
        return Scores(scores, {"dp": record, "dp_cost": cost}, nothing_chosen=nothing)

    def _plan_and_check(self, candidates: Candidates, sample: torch.Tensor,
                        context: TableContext, importance: list[float], segments: SegmentTable,
                        dense: float, segment_cost: Any) -> tuple[Plan, float | None, int]:
        """The DP's plan under the budget; then (with `verify` > 0) the plan folded whole and
        timed on the backend round-robin beside the dense model folded whole, and while it
        misses the budget, planned again under a target tightened by the miss. Returns the
        plan, its measured ratio (None unchecked) and how many plans were measured."""
        target = self.budget * dense
        plan = plan_sites(importance, segments.seconds, target, segments.overhead, segment_cost)
        if self.verify < 1:
            return plan, None, 0
        names = list(candidates.entropies)
        reference = candidates.dense if candidates.dense is not None else candidates.model
        measured, rounds, tried = None, 0, set()
        while True:
            chosen = tuple(names[k - 1] for k in plan.linearized(len(names)))
            if chosen in tried:  # a tighter target gave the same plan: no use measuring again
                break
            tried.add(chosen)
            model = linearize(clone_model(candidates.model), list(chosen))
            forms = plan_fold_policy(_segment_records(plan, segments, ["input", *names,
                                                                       "output"]))
            measured = measured_ratio(model, reference, sample, context, policy=forms)[0]
            rounds += 1
            if measured <= self.budget or not chosen or rounds >= self.verify:
                break
            # Below the missed plan's own estimate, scaled by the miss: a target tightened
            # from the budget alone may still admit the plan that missed.
            target = min(target, plan.seconds) * self.budget / measured
            plan = plan_sites(importance, segments.seconds, target, segments.overhead,
                              segment_cost)
        return plan, measured, rounds

    def _dense_seconds(self, candidates: Candidates, sample: torch.Tensor,
                       context: TableContext, table: LatencyTable, segments: SegmentTable,
                       sites: list[str]) -> float:
        """The dense model's estimate: every site kept, same table. From `candidates.dense`
        when given; else the current model when none of its sites is gone yet (the first
        stage, or a plan made directly); else this scorer's earlier answer (its own or an
        earlier stage record's "dp" field, same backend and batch)."""
        key = context.key()
        if self.dense is not None and self.dense.context == key:
            return self.dense.seconds
        seconds = None
        total = candidates.records[0].get("sites_total") if candidates.records else None
        if candidates.dense is not None:
            dense_sites = find_sites(candidates.dense)
            chain = [(k, k + 1) for k in range(len(dense_sites) + 1)]
            seconds = build_segment_table(
                candidates.dense, sample, context, table, dense_sites, segments=chain,
                progress=self.progress).plan_seconds(list(range(len(dense_sites) + 2)))
        elif total is None or total == len(sites):
            seconds = segments.plan_seconds(list(range(len(sites) + 2)))
        else:
            for record in reversed(list(candidates.records)):
                earlier = record.get("dp")
                if isinstance(earlier, Mapping) and earlier.get("context") == key:
                    seconds = earlier["dense_ms"] / 1e3
                    break
        if seconds is None:
            raise ConfigError("dp: no dense reference for the latency budget: pass the dense "
                              "model (Candidates.dense) or plan from the first stage")
        self.dense = DenseReference(seconds, key)
        return seconds


def site_importance(entropies: Mapping[str, float], importance: str, seed: int = 0
                    ) -> list[float]:
    """What each site is worth to the plan, in forward order (NaN: unreached, always kept): its
    entropy, or for the controls a seeded random worth per site name ("random": the same across
    stages, so a re-plan keeps to one random order) or its depth from the end ("last").
    "finetune" prices segments later; its sites keep their entropy for the order in the plan."""
    if importance == "random":
        return [math.nan if math.isnan(h) else
                random.Random(f"depthcut-dp-random:{seed}:{site}").random()
                for site, h in entropies.items()]
    if importance == "last":
        n = len(entropies)
        return [math.nan if math.isnan(h) else float(n - k)
                for k, h in enumerate(entropies.values())]
    return [float(h) for h in entropies.values()]


def _segment_records(plan: Plan, segments: SegmentTable, names: list[str]) -> list[dict]:
    """The plan's segments as its record gives them: ends, sites inside, merge form, time;
    and the modules of a segment merged in another form than "macs" (for `plan_fold_policy`)."""
    records = []
    for a, b in zip(plan.kept, plan.kept[1:], strict=False):
        form = segments.forms.get((a, b), "macs")
        record = {"from": names[a], "to": names[b], "linear": b - a - 1, "merge": form,
                  "ms": segments.seconds[(a, b)] * 1e3}
        if form not in ("macs", "unfolded"):
            record["modules"] = segments.modules.get((a, b), [])
        records.append(record)
    return records


def plan_fold_policy(segments: Iterable[Mapping]) -> FormsPolicy | str:
    """How to fold a model as a dp plan merges it (`segments`: its record's "segments"): each
    planned segment's modules in its form, a `FormsPolicy`; "macs" where every segment is."""
    forms = {module: segment["merge"] for segment in segments
             for module in segment.get("modules", ())}
    return FormsPolicy(forms) if forms else "macs"


def answer_fold_policy(records: Sequence[Mapping], stage: int) -> FormsPolicy | str:
    """The fold policy of a run's answer at `stage`: the merge forms of the last dp plan made
    up to that stage ("macs" without one)."""
    for record in reversed(records):
        plan = record.get("dp")
        if record.get("stage", 0) <= stage and isinstance(plan, Mapping):
            return plan_fold_policy(plan.get("segments", ()))
    return "macs"


def check_dp_settings(budget: float | None, span: int, importance: str,
                      merge: str = "macs") -> None:
    """ConfigError for a budget that is not a positive fraction, a span < 0 or an unknown
    importance or merge choice."""
    if budget is not None and not (budget > 0 and math.isfinite(budget)):
        raise ConfigError(f"latency_budget must be a fraction > 0 of the dense model's "
                          f"latency, got {budget}")
    if span < 0:
        raise ConfigError(f"dp_span (sites inside a segment) must be >= 0, got {span}")
    if importance not in DP_IMPORTANCES:
        raise ConfigError(f"dp_importance must be one of {DP_IMPORTANCES}, got {importance!r}")
    if merge not in DP_MERGES:
        raise ConfigError(f"dp_merge must be one of {DP_MERGES}, got {merge!r}")



def finetune_importance(model: nn.Module, sites: Sequence[str],
                        segments: Iterable[tuple[int, int]], batches: Iterable,
                        steps: int = FINETUNE_STEPS, lr: float = FINETUNE_LR
                        ) -> dict[tuple[int, int], float]:
    """LayerMerge-like importance (`dp_importance` "finetune"): for each segment with sites
    inside, the cross-entropy a copy of `model` with those sites linear has after `steps` SGD
    steps, minus the model's own, on the first batch of `batches` (the others train; pairs of
    inputs and labels, the unaugmented training split in a run); never below 0. One short
    finetune per segment: far dearer than entropy, for comparison. `model` is left as it was."""
    loader = iter(copy.copy(batches))
    held_out = next(loader)
    training = [batch for _, batch in zip(range(steps), loader, strict=False)] or [held_out]
    device = next(model.parameters()).device

    def loss_of(candidate: nn.Module) -> float:
        candidate.eval()
        with torch.no_grad():
            inputs, labels = held_out[0].to(device), held_out[1].to(device)
            return float(F.cross_entropy(candidate(inputs), labels))

    base = loss_of(clone_model(model))
    costs = {}
    for i, j in segments:
        if j - i <= 1:
            continue
        candidate = linearize(clone_model(model), sites[i:j - 1]).train()
        optimizer = torch.optim.SGD(candidate.parameters(), lr=lr, momentum=0.9)
        for step in range(steps):
            inputs, labels = training[step % len(training)][:2]
            optimizer.zero_grad()
            F.cross_entropy(candidate(inputs.to(device)), labels.to(device)).backward()
            optimizer.step()
        costs[(i, j)] = max(loss_of(candidate) - base, 0.0)
    return costs
