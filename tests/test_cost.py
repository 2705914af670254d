"""The cost module's seams: multiply-adds counted by hand, timers registered by name and used by
`measure_stage` and fold's "latency" policy, and the fold policies as objects.

The fake timers here run nothing: their time is a function of the module they are given, so
whether the latency policy takes a merge is decided by the test, not by the machine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from depthcut.cost import TIMERS, Timer, count_macs, get_timer, register_timer
from depthcut.errors import ConfigError
from depthcut.fold import POLICIES, FoldError, FoldPolicy, LatencyPolicy, Merge, fold
from depthcut.measure import measure_stage
from tests.helpers import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTimer(Timer):
    """Times nothing: a module takes `seconds_of(module, example)`; records what it was given."""

    def __init__(self, name: str, seconds_of: Callable[[nn.Module, Tensor], float]) -> None:
        self.name, self.seconds_of = name, seconds_of
        self.prepared: list[tuple[nn.Module, tuple[int, ...]]] = []

    def prepare(self, model: nn.Module, example: Tensor) -> Callable[[], object]:
        self.prepared.append((model, tuple(example.shape)))
        seconds = self.seconds_of(model, example)
        return lambda: seconds

    def measure(self, call: Callable[[], object], device: torch.device, repeats: int = 15,
                warmup: int = 3) -> float:
        return float(call())


def ops_in(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) for m in module.modules())


@pytest.fixture
def registered() -> Iterator[Callable[[FakeTimer], FakeTimer]]:
    """Register fake timers for one test (removed afterwards)."""
    names: list[str] = []

    def register(timer: FakeTimer) -> FakeTimer:
        names.append(timer.name)
        return register_timer(timer)  # type: ignore[return-value]

    yield register
    for name in names:
        TIMERS.pop(name, None)


def conv_bn() -> tuple[nn.Module, Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2.0, generator=g)
    return model, torch.randn(2, 3, 8, 8, generator=g)


def test_count_macs_of_a_conv_and_a_linear_by_hand() -> None:
    """3x3 conv 3->4 on 8x8 (padded): 8*8 positions * 4 outputs * 27 inputs = 6912; linear
    256->10: 2560. Biases, ReLU and flatten cost nothing; the batch multiplies."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 8 * 8, 10))
    assert count_macs(model, torch.randn(1, 3, 8, 8)) == 6912 + 2560
    assert count_macs(model, torch.randn(5, 3, 8, 8)) == 5 * (6912 + 2560)


@pytest.mark.parametrize("name", sorted(TIMERS))
def test_every_registered_timer_times_a_tiny_model(name: str) -> None:
    timer = get_timer(name)
    model, x = conv_bn()
    assert timer.name == name and get_timer(timer) is timer
    try:
        call = timer.prepare(model, x)
    except ConfigError as refusal:  # its package or device is missing here (test_timers.py)
        pytest.skip(str(refusal))
    seconds = timer.measure(call, x.device, repeats=3, warmup=1)
    assert math.isfinite(seconds) and seconds > 0
    again = timer.seconds(model, x, repeats=3, warmup=1)
    assert math.isfinite(again) and again > 0


def test_timer_names_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown timer 'nope'; choose one of .*eager"):
        get_timer("nope")
    with pytest.raises(ConfigError, match="already registered"):
        register_timer(FakeTimer("eager", lambda model, x: 1.0))


def test_measure_stage_times_with_a_registered_timer(registered) -> None:
    timer = registered(FakeTimer("test-ops", lambda model, x: 1e-3 * ops_in(model)))
    model, x = conv_bn()
    folded, measured = measure_stage(model, x, latency={1: 3, 2: 1}, timer="test-ops")
    # The BatchNorm went into the conv: one op left of two.
    assert measured["latency_ms_batch1_unfolded"] == pytest.approx(2.0)
    assert measured["latency_ms_batch1_folded"] == pytest.approx(1.0)
    assert measured["latency_ms_batch2_folded"] == pytest.approx(1.0)
    assert [(m, shape) for m, shape in timer.prepared] == [
        (model, (1, 3, 8, 8)), (folded, (1, 3, 8, 8)), (model, (2, 3, 8, 8)),
        (folded, (2, 3, 8, 8))]


def test_latency_policy_takes_a_merge_its_timer_finds_faster(registered) -> None:
    timer = registered(FakeTimer("test-ops", lambda model, x: 1e-3 * ops_in(model)))
    model, x = conv_bn()
    report = fold(model, x, LatencyPolicy(timer="test-ops")).fold_report
    assert report.policy == "latency"
    [merge] = report.merges
    assert merge.taken and merge.replaces == ["0", "1"], report.markdown()
    assert (merge.seconds_before, merge.seconds_after) == (pytest.approx(2e-3),
                                                           pytest.approx(1e-3))
    # Both sides were given to the timer as modules, at the fold's batch size.
    assert [ops_in(m) for m, _ in timer.prepared] == [2, 1]
    assert {shape for _, shape in timer.prepared} == {tuple(x.shape)}


def test_latency_policy_refuses_merges_its_timer_finds_slower(registered) -> None:
    """A timer under which every merged op takes 10 ms and an original op 1 ms: the BatchNorm
    merge is declined, and so is the chain conv -> BN (two ops are cheaper than one here)."""
    model, x = conv_bn()
    for module in model.modules():  # fold works on copies: mark the originals
        module.original = True

    def seconds_of(module: nn.Module, example: Tensor) -> float:
        parts = list(module.children()) or [module]
        original = all(getattr(part, "original", False) for part in parts)
        return 1e-3 * ops_in(module) if original else 1e-2

    registered(FakeTimer("test-merged-slow", seconds_of))
    folded = fold(model, x, LatencyPolicy(timer="test-merged-slow"))
    report = folded.fold_report
    assert not any(m.taken for m in report.merges), report.markdown()
    assert [(m.rule, m.reason) for m in report.merges] == [
        ("sequential", "slower here: 2.000 -> 10.000 ms at batch 2"),
        # batch 2 x 8x8 positions x (conv 4 x 27 = 108, and BN 4 more as its own op)
        ("chain", "cheaper as 2 ops under the policy (10.000 ms against 2.000 ms; MACs 13,824 "
                  "as one op against 14,336 as 2)")]
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


def test_latency_policy_prices_chain_segments_with_its_timer(registered) -> None:
    """A timer whose time is the multiply-adds makes "latency" choose what "macs" chooses: on a
    chain whose least-MACs partition is not the whole chain, the same segments."""
    from tests.test_fold_chains import Chain

    registered(FakeTimer("test-macs", lambda model, x: 1e-9 * count_macs(model, x)))
    model, x = Chain().eval(), torch.randn(2, 8, 10, 10)
    by_time = fold(model, x, LatencyPolicy(timer="test-macs")).fold_report
    by_macs = fold(model, x, "macs").fold_report
    taken = [(m.rule, m.replaces) for m in by_time.merges if m.taken]
    assert taken == [(m.rule, m.replaces) for m in by_macs.merges if m.taken]
    assert taken == [("chain", ["e", "d", "q"])]
    assert by_time.macs_after == by_macs.macs_after


def test_policies_have_one_name_each_and_plain_callables_are_wrapped() -> None:
    assert list(POLICIES) == ["macs", "shallow", "all", "latency"]
    assert all(isinstance(p, FoldPolicy) and p.name == name for name, p in POLICIES.items())
    assert POLICIES["macs"].prices_segments and POLICIES["latency"].prices_segments

    model, x = conv_bn()
    seen: list[Merge] = []

    def keep_batchnorm(merge: Merge) -> bool:
        seen.append(merge)
        return False

    report = fold(model, x, keep_batchnorm).fold_report
    assert report.policy == "keep_batchnorm" and len(seen) == 1
    assert report.merges[0].reason == "declined by policy keep_batchnorm"

    def old_style(merge: Merge) -> bool:
        return True

    old_style.chain_cost = lambda merge: 1.0  # type: ignore[attr-defined]
    with pytest.raises(FoldError, match="override `segment_cost`"):
        fold(model, x, old_style)
