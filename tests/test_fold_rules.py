"""Fold rules plug in by registration: the built-in rules keep their order within each pass, and a
rule registered from outside (here, from this file) runs in its pass, at its place, until it is
unregistered."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.fx
from torch import nn

from depthcut.affine import compose
from depthcut.fold import (
    LINEAR,
    PER_CHANNEL,
    Candidate,
    FoldError,
    FoldState,
    fold,
    propose,
    register_rule,
    unregister_rule,
)
from depthcut.fold.registry import registered_rules
from depthcut.fold.state import shape_of
from depthcut.graph import input_of
from tests.helpers import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def small_model() -> nn.Module:
    """conv 3x3 -> BN -> (linearized site) -> conv 1x1 -> conv 1x1, all mergeable."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Identity(),
                          nn.Conv2d(8, 6, 1), nn.Conv2d(6, 4, 1))
    model[1].running_mean.uniform_(-1, 1)
    model[1].running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.fixture
def registered() -> Iterator[list[tuple[str, str]]]:
    """Registers rules by (pass, name) and unregisters them after the test, whatever happens."""
    names: list[tuple[str, str]] = []
    yield names
    for pass_name, name in names:
        unregister_rule(pass_name, name)


def test_built_in_rules_keep_their_order_within_each_pass():
    """The order decides which merge is found first: it is part of fold's behaviour."""
    assert [spec.name for spec in registered_rules(PER_CHANNEL)] == [
        "into_bias", "per_channel_sequential"]
    assert [spec.name for spec in registered_rules(LINEAR)] == [
        "into_bias", "chain", "sequential", "parallel"]


@pytest.mark.parametrize("policy", ["macs", "all", lambda merge: True])
def test_a_registered_rule_runs_in_its_pass(registered, policy):
    """A rule that records the nodes it is offered and proposes nothing: in the per-channel pass
    it sees the BatchNorm (not merged yet), in the linear pass it no longer does, and the fold is
    the same as without it. Once unregistered, it is not called."""
    seen: dict[str, set[str]] = {PER_CHANNEL: set(), LINEAR: set()}

    def recorder(pass_name: str):
        def record(state: FoldState, node: torch.fx.Node) -> bool:
            module = state.module(node)
            seen[pass_name].add(type(module).__name__ if module is not None else node.op)
            return False
        return record

    x = torch.randn(2, 3, 8, 8)
    plain = fold(small_model(), x, policy)
    for pass_name in (PER_CHANNEL, LINEAR):
        register_rule(pass_name, recorder(pass_name), order=5, name="record_nodes")
        registered.append((pass_name, "record_nodes"))
    folded = fold(small_model(), x, policy)

    assert "BatchNorm2d" in seen[PER_CHANNEL] and "Conv2d" in seen[PER_CHANNEL]
    assert "BatchNorm2d" not in seen[LINEAR] and seen[LINEAR]
    assert folded.code == plain.code
    assert folded.fold_report.to_dict() == plain.fold_report.to_dict()

    for pass_name in (PER_CHANNEL, LINEAR):
        unregister_rule(pass_name, "record_nodes")
    seen = {PER_CHANNEL: set(), LINEAR: set()}
    fold(small_model(), x, policy)
    assert seen == {PER_CHANNEL: set(), LINEAR: set()}


def merge_pointwise_pair(state: FoldState, node: torch.fx.Node) -> bool:
    """A toy rule: two 1x1 convs in a row as one (exact: no padding is involved)."""
    first = input_of(node)
    if first is None or len(first.users) != 1 or input_of(first) is None:
        return False
    a, b = state.affine(first, first.args[0]), state.affine(node, first)
    if a is None or b is None or a.kernel != (1, 1) or b.kernel != (1, 1) or a.kind != "conv":
        return False
    composed = compose(a, b)
    if composed is None:
        return False
    macs_before = a.macs(shape_of(first)) + b.macs(shape_of(node))  # per sample
    return propose(state, Candidate("pointwise_pair", [first, node], first.args[0], *composed,
                                    macs_before))


def test_a_registered_rule_merges_before_the_rules_after_it(registered):
    """Placed before `chain`, the toy rule takes the two 1x1 convs first; the fold stays exact."""
    register_rule(LINEAR, merge_pointwise_pair, order=15)
    registered.append((LINEAR, "merge_pointwise_pair"))
    model, x = small_model(), torch.randn(2, 3, 8, 8)
    folded = fold(model, x, "macs")
    rules = [merge.rule for merge in folded.fold_report.merges if merge.taken]
    assert rules == ["sequential", "pointwise_pair", "chain"]  # BatchNorm, 1x1 pair, the rest
    assert folded.fold_report.ops_after == 1
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_register_rule_refuses_an_unknown_pass_and_a_taken_order(registered):
    with pytest.raises(FoldError, match="no fold pass"):
        register_rule("merge_everything", merge_pointwise_pair, order=1)
    with pytest.raises(FoldError, match="already 'chain'"):
        register_rule(LINEAR, merge_pointwise_pair, order=20)
    assert "merge_pointwise_pair" not in [spec.name for spec in registered_rules(LINEAR)]
