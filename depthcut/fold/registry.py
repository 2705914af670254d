"""Where fold rules register: each rule's own file says which pass runs it and in what order.

A rule looks at one node and proposes at most one rewrite (`depthcut.fold.rewrite.propose`),
returning whether the graph changed. Two passes run rules (`PER_CHANNEL`, then `LINEAR`); within
a pass, rules are tried in ascending `order` at each node, and the order decides which merge is
found first, so every rule states it. `when` limits a rule to some policies (a chain is decided
as a whole only by a policy that prices segments); a `free` rule never costs anything (a
constant into a bias) and runs beside every other rule of its pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.fx

from depthcut.fold.policy import FoldPolicy
from depthcut.fold.state import FoldError, FoldState

Rule = Callable[[FoldState, torch.fx.Node], bool]

PER_CHANNEL = "merge_per_channel"  # per-channel scales and constants: never cost anything
LINEAR = "merge_linear_ops"  # chains, sequential and parallel merges, as the policy allows
RULE_PASSES = (PER_CHANNEL, LINEAR)


def prices_segments(policy: FoldPolicy) -> bool:
    """For rules that decide chains as a whole (the policy overrides `segment_cost`)."""
    return policy.prices_segments


def merge_by_merge(policy: FoldPolicy) -> bool:
    """For rules that propose one merge at a time to a policy without a segment cost."""
    return not policy.prices_segments


@dataclass(frozen=True)
class RuleSpec:
    """One rule as a pass runs it."""

    name: str
    rule: Rule
    order: int
    when: Callable[[FoldPolicy], bool] | None = None  # None: under every policy
    free: bool = False  # runs beside every other rule of its pass


_RULES: dict[str, dict[str, RuleSpec]] = {name: {} for name in RULE_PASSES}


def register_rule(pass_name: str, rule: Rule, order: int, *,
                  when: Callable[[FoldPolicy], bool] | None = None, free: bool = False,
                  name: str | None = None) -> Rule:
    """Run `rule` in the pass `pass_name` at place `order` (a rule's file calls this once per
    pass it belongs to); a rule of the same name is replaced. Returns `rule`."""
    if pass_name not in _RULES:
        raise FoldError(f"no fold pass {pass_name!r} runs rules; choose one of "
                        f"{', '.join(RULE_PASSES)}")
    spec = RuleSpec(name or rule.__name__, rule, order, when, free)
    taken = [other.name for other in _RULES[pass_name].values()
             if other.order == order and other.name != spec.name]
    if taken:
        raise FoldError(f"fold rule {spec.name!r}: order {order} of pass {pass_name} is "
                        f"already {taken[0]!r}; rules of a pass need distinct orders")
    _RULES[pass_name][spec.name] = spec
    return rule


def unregister_rule(pass_name: str, name: str) -> None:
    """Remove the rule `name` from the pass (nothing happens if it is not there)."""
    _RULES.get(pass_name, {}).pop(name, None)


def registered_rules(pass_name: str) -> list[RuleSpec]:
    """Every rule of the pass, in order."""
    return sorted(_RULES[pass_name].values(), key=lambda spec: spec.order)


def rules_for(pass_name: str, policy: FoldPolicy) -> list[RuleSpec]:
    """The rules of the pass that run under `policy`, in order."""
    return [spec for spec in registered_rules(pass_name)
            if spec.when is None or spec.when(policy)]
