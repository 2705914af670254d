"""Fold policies: which merges `fold` takes (METHODS section 6).

A policy is a small object (`FoldPolicy`). `decide(merge, sides)` says whether one proposed
merge is taken; `segment_cost(merge, sides)` prices one segment of a chain of linear ops for
fold's dynamic programme (the partition of least total cost), or gives None where the policy
does not allow that segment. A policy that does not override `segment_cost` decides merge by
merge (sequential, then parallel). `sides` (`MergeSides`) holds what a policy may run: the ops
a merge replaces and the merged op, as modules, and inputs of the shape they read.

The presets, one name each, are in `POLICIES`: "macs" (exact merges that do not raise the
multiply-adds), "shallow" (every exact merge: the shallowest exact graph), "all" (every merge:
the shallowest graph), "latency" (exact merges measured faster here by a timer of
`depthcut.cost`; `LatencyPolicy(timer=...)` picks another). `FormsPolicy` folds each part of a
model under its own preset (what `--choose dp` planned per segment). A user's
policy is a `FoldPolicy` subclass, or a plain callable `(Merge) -> bool` (`CallablePolicy` wraps
it: it decides merge by merge and may set `merge.reason` when it declines).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from functools import cached_property

from torch import Tensor, nn

from depthcut.cost import DEFAULT_TIMER, Timer, get_timer

APPROXIMATE = "border-approximate (the border error depends on the input)"


@dataclass
class Merge:
    """One merge considered: what it replaced, whether it was taken, and why. A policy sees it
    before `taken` is final, and may set `reason` and the times it measured."""

    rule: str
    replaces: list[str]
    exact: bool
    macs_before: int
    macs_after: int
    taken: bool
    reason: str = ""
    seconds_before: float | None = None
    seconds_after: float | None = None

    def to_dict(self) -> dict:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}


class MergeSides:
    """What a policy may run to decide a merge: `unmerged` (the ops it replaces) and `merged`
    (the one op in their place) as modules, built on first use since most chain segments are
    never run, and `make_input()`, a random input of the shape they read at the fold's batch
    size."""

    def __init__(self, unmerged: Callable[[], nn.Module], merged: Callable[[], nn.Module],
                 make_input: Callable[[], Tensor]) -> None:
        self._build_unmerged, self._build_merged = unmerged, merged
        self.make_input = make_input

    @cached_property
    def unmerged(self) -> nn.Module:
        return self._build_unmerged()

    @cached_property
    def merged(self) -> nn.Module:
        return self._build_merged()


class FoldPolicy(ABC):
    """Which merges to take. Subclasses set `name` and implement `decide`; override
    `segment_cost` to decide chains of linear ops as a whole."""

    name: str

    @abstractmethod
    def decide(self, merge: Merge, sides: MergeSides | None = None) -> bool:
        """Whether `merge` is taken (set `merge.reason` when not). `sides` is None when the
        caller has nothing to run."""

    def segment_cost(self, merge: Merge, sides: MergeSides | None = None) -> float | None:
        """The cost of one chain segment (a Merge with rule "chain"; a single op is a segment
        too and must be priced), or None where the policy does not allow it."""
        raise NotImplementedError(f"policy {self.name} decides merge by merge")

    @property
    def prices_segments(self) -> bool:
        """Whether the policy decides chains as a whole (it overrides `segment_cost`)."""
        return type(self).segment_cost is not FoldPolicy.segment_cost

    def compare_costs(self, whole: float, chosen: float) -> str:
        """Why a whole chain was declined, in the policy's cost: the whole chain as one op
        against the partition taken ("" where the MACs given beside it say it already)."""
        return f"cost {whole:.6g} against {chosen:.6g}; "

    def __call__(self, merge: Merge) -> bool:
        """A policy is also a `(Merge) -> bool`: `decide` with nothing to run."""
        return self.decide(merge)


def _exact_only(merge: Merge, policy: str) -> bool:
    if not merge.exact:
        merge.reason = f"{APPROXIMATE}; policy {policy} takes exact merges only"
    return merge.exact


class MacsPolicy(FoldPolicy):
    """"macs": take an exact merge that needs no more multiply-adds than the ops it replaces (a
    border-approximate merge changes the function: "all" takes those); a chain segment costs
    its multiply-adds."""

    name = "macs"

    def decide(self, merge: Merge, sides: MergeSides | None = None) -> bool:
        if not _exact_only(merge, self.name):
            return False
        if merge.macs_after <= merge.macs_before:
            return True
        merge.reason = f"would raise MACs {merge.macs_before:,} -> {merge.macs_after:,}"
        return False

    def segment_cost(self, merge: Merge, sides: MergeSides | None = None) -> float | None:
        return float(merge.macs_after) if merge.exact else None

    def compare_costs(self, whole: float, chosen: float) -> str:
        return ""


class AllPolicy(FoldPolicy):
    """"all": the shallowest graph, whatever a merge costs; a chain segment costs one op (ties
    go to fewer MACs)."""

    name = "all"

    def decide(self, merge: Merge, sides: MergeSides | None = None) -> bool:
        return True

    def segment_cost(self, merge: Merge, sides: MergeSides | None = None) -> float | None:
        return 1.0

    def compare_costs(self, whole: float, chosen: float) -> str:
        return ""


class ShallowPolicy(FoldPolicy):
    """"shallow": every exact merge, so each chain becomes the fewest exact ops whatever they
    cost in MACs (ties go to fewer MACs): LayerMerge's "merge the whole segment", where "macs"
    is "merge in parts". Faster where a backend pays per op more than per multiply-add."""

    name = "shallow"

    def decide(self, merge: Merge, sides: MergeSides | None = None) -> bool:
        return _exact_only(merge, self.name)

    def segment_cost(self, merge: Merge, sides: MergeSides | None = None) -> float | None:
        return 1.0 if merge.exact else None

    def compare_costs(self, whole: float, chosen: float) -> str:
        return ""


class LatencyPolicy(FoldPolicy):
    """"latency": time both sides of an exact merge at the fold's batch size and device with
    `timer` (a `depthcut.cost` timer or its name, looked up when used) and take the faster; a
    chain segment costs its median time (exact segments only, as "macs")."""

    name = "latency"

    def __init__(self, timer: str | Timer = DEFAULT_TIMER, repeats: int = 15,
                 warmup: int = 3) -> None:
        self.timer, self.repeats, self.warmup = timer, repeats, warmup

    def seconds(self, module: nn.Module, x: Tensor) -> float:
        return get_timer(self.timer).seconds(module, x, self.repeats, self.warmup)

    def decide(self, merge: Merge, sides: MergeSides | None = None) -> bool:
        if not _exact_only(merge, self.name):
            return False
        if sides is None:
            return True
        x = sides.make_input()
        merge.seconds_before = self.seconds(sides.unmerged, x)
        merge.seconds_after = self.seconds(sides.merged, x)
        if merge.seconds_after < merge.seconds_before:
            return True
        merge.reason = (f"slower here: {merge.seconds_before * 1e3:.3f} -> "
                        f"{merge.seconds_after * 1e3:.3f} ms at batch {x.shape[0]}")
        return False

    def segment_cost(self, merge: Merge, sides: MergeSides | None = None) -> float | None:
        if not merge.exact or sides is None:
            return None
        merge.seconds_after = self.seconds(sides.merged, sides.make_input())
        return merge.seconds_after


class CallablePolicy(FoldPolicy):
    """A user's plain callable `(Merge) -> bool` as a policy: it decides merge by merge, and is
    named after the function in the report."""

    def __init__(self, decide: Callable[[Merge], bool]) -> None:
        self.function = decide
        self.name = getattr(decide, "__name__", type(decide).__name__)

    def decide(self, merge: Merge, sides: MergeSides | None = None) -> bool:
        return bool(self.function(merge))


POLICIES: dict[str, FoldPolicy] = {
    policy.name: policy
    for policy in (MacsPolicy(), ShallowPolicy(), AllPolicy(), LatencyPolicy())}


class FormsPolicy(FoldPolicy):
    """Each module under its own preset (`forms`: module name -> a name in POLICIES; every other
    module under `default`): a merge, or a chain segment, is decided by the preset of the
    modules it replaces. What `--choose dp --dp-merge fastest` planned: one form per segment
    between kept sites, and a chain of linear ops never crosses a kept (nonlinear) site, so
    every segment of one chain is priced in one preset's units."""

    name = "per-segment"

    def __init__(self, forms: Mapping[str, str], default: str = "macs") -> None:
        unknown = sorted({form for form in forms.values() if form not in POLICIES}
                         | ({default} - set(POLICIES)))
        if unknown:
            raise ValueError(f"unknown fold forms {unknown}; choose from {', '.join(POLICIES)}")
        self.forms, self.default = dict(forms), default

    def policy_for(self, merge: Merge) -> FoldPolicy:
        """The preset of the modules `merge` replaces (the default where they name none or
        several presets)."""
        named = {self.forms[name] for name in merge.replaces if name in self.forms}
        return POLICIES[named.pop() if len(named) == 1 else self.default]

    def decide(self, merge: Merge, sides: MergeSides | None = None) -> bool:
        return self.policy_for(merge).decide(merge, sides)

    def segment_cost(self, merge: Merge, sides: MergeSides | None = None) -> float | None:
        return self.policy_for(merge).segment_cost(merge, sides)

    def compare_costs(self, whole: float, chosen: float) -> str:
        return ""
