"""How each segment is merged: the "shallow" fold form, one form per part of a model
(`FormsPolicy`), and `--dp-merge fastest`, which times each segment in both forms, plans with
the faster and folds the answer as it planned (a noiseless test timer: no timing here)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthcut.cost.latency_table import (
    LatencyTable,
    SegmentTable,
    TableContext,
    build_form_tables,
    build_segment_table,
    fastest_forms,
)
from depthcut.errors import ConfigError
from depthcut.fold import FormsPolicy, fold
from depthcut.measure import measure_stage
from depthcut.scorers import Candidates, choose_sites, scorer_for
from depthcut.scorers.choice import ChoiceSettings
from depthcut.scorers.dp import answer_fold_policy, plan_fold_policy
from depthcut.sites import find_sites, linearize
from tests.helpers import (
    macs_timer_fixture,  # noqa: F401 - a fixture
    one_thread,  # noqa: F401
    tiny_splits,
)
from tests.test_dp import dp_config

pytestmark = pytest.mark.usefixtures("one_thread")


def convs(folded: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in folded.modules())


def two_bottlenecks() -> nn.Sequential:
    """Wide -> narrow -> wide twice, the middles linear: "macs" keeps each pair (one op would
    cost more multiply-adds), "shallow" merges each pair into one op."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(16, 2, 1), nn.Identity(), nn.Conv2d(2, 16, 1), nn.ReLU(),
                         nn.Conv2d(16, 2, 1), nn.Identity(), nn.Conv2d(2, 16, 1))


def test_shallow_takes_every_exact_merge_and_macs_keeps_the_cheaper_parts():
    model, x = two_bottlenecks().eval(), torch.randn(2, 16, 5, 5)
    by_macs, shallow = fold(model, x, "macs"), fold(model, x, "shallow")
    assert convs(by_macs) == 4 and convs(shallow) == 2
    assert shallow.fold_report.exact and shallow.fold_report.relative_error < 1e-5
    assert shallow.fold_report.macs_after > by_macs.fold_report.macs_after


def test_shallow_refuses_a_border_approximate_merge():
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)).eval()
    x = torch.randn(2, 3, 6, 6)
    assert convs(fold(model, x, "shallow")) == 2  # merging would change the border
    assert convs(fold(model, x, "all")) == 1


def test_forms_policy_folds_each_part_under_its_own_preset():
    model, x = two_bottlenecks().eval(), torch.randn(2, 16, 5, 5)
    folded = fold(model, x, FormsPolicy({"0": "shallow", "2": "shallow"}))
    assert convs(folded) == 3  # the first pair merged, the second kept as "macs" keeps it
    assert folded.fold_report.policy == "per-segment"
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    with pytest.raises(ValueError, match="unknown fold forms"):
        FormsPolicy({"0": "thin"})


def test_fastest_forms_takes_each_segment_in_its_faster_form():
    macs = SegmentTable({(0, 1): 1.0, (0, 2): 3.0, (1, 2): 1.0}, 0.5,
                        {(0, 1): "macs", (0, 2): "macs", (1, 2): "macs"}, {(0, 2): ["a", "b"]},
                        hits=1)
    shallow = SegmentTable({(0, 1): 1.5, (0, 2): 2.0, (1, 2): 0.98}, 0.5,
                           {(0, 1): "shallow", (0, 2): "shallow", (1, 2): "shallow"},
                           {(0, 2): ["a", "b"]}, misses=2)
    best = fastest_forms([macs, shallow])
    # (1, 2): 2% faster is within the noise margin: the default form stays.
    assert best.seconds == {(0, 1): 1.0, (0, 2): 2.0, (1, 2): 1.0}
    assert best.forms == {(0, 1): "macs", (0, 2): "shallow", (1, 2): "macs"}
    assert (best.hits, best.misses, best.overhead) == (1, 0, 0.5)  # the first table's


def bottleneck_mlp(features: int) -> nn.Sequential:
    """Sites between narrow linear layers: per op, the test timer's 0.1 us outweighs the
    multiply-adds a merge adds, so merging a segment whole is faster than "macs" keeps it."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(features, 8), nn.ReLU(), nn.Linear(8, 2),
                         nn.ReLU(), nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2), nn.ReLU(),
                         nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))


def test_dp_merge_fastest_plans_shallow_segments_and_folds_as_it_planned(tmp_path, macs_timer):
    splits = tiny_splits()
    sample = next(iter(splits.train_eval))[0]
    model = bottleneck_mlp(sample[0].numel()).eval()
    sites = find_sites(model)
    entropies = dict(zip(sites, [5.0, 0.1, 5.0, 0.1, 5.0], strict=True))
    candidates = Candidates(model, entropies, examples=splits.train_eval)
    records = {}
    for merge in ("macs", "fastest"):
        scorer = scorer_for(dp_config(tmp_path, latency_budget=0.9, dp_merge=merge))
        scored = scorer.score(candidates)
        records[merge] = scored.record["dp"]
        assert set(choose_sites(scored.scores, len(sites))) == set(records[merge]["sites"])
    by_macs, fastest = records["macs"], records["fastest"]
    assert {s["merge"] for s in by_macs["segments"]} == {"macs"}
    assert all("modules" not in s for s in by_macs["segments"])
    shallow = [s for s in fastest["segments"] if s["merge"] == "shallow"]
    assert shallow and all(s["linear"] > 0 and s["modules"] for s in shallow)
    # Merged whole, the two low-entropy sites alone fit the budget; in parts they do not, and
    # "macs" must remove a high-entropy site instead.
    assert sorted(fastest["sites"]) == sorted([sites[1], sites[3]])
    assert fastest["removed"] == pytest.approx(0.2) and by_macs["removed"] >= 5.0
    assert fastest["within_budget"] and fastest["measured_ratio"] <= 0.9
    # The plan's forms fold the planned model further than "macs", exactly.
    planned = linearize(model, fastest["sites"]).eval()
    policy = plan_fold_policy(fastest["segments"])
    folded, measured = measure_stage(planned, sample, policy=policy, data=None, latency={},
                                     baseline=model)
    assert convs(folded) < convs(fold(planned, sample, "macs"))
    assert measured["policy"] == "per-segment" and measured["exact"]
    assert torch.allclose(folded(sample), planned(sample), atol=1e-5)
    # The dense baseline stays the BN-folded dense model: folded under "macs".
    assert measured["macs_dense_folded"] == fold(model, sample, "macs").fold_report.macs_after \
        // len(sample)


def test_a_run_answer_is_folded_with_the_last_plan_up_to_its_stage():
    plan = {"segments": [{"merge": "shallow", "modules": ["1", "3"]}, {"merge": "macs"}]}
    records = [{"stage": 0}, {"stage": 1, "dp": plan}, {"stage": 2, "dp": {"segments": []}}]
    assert answer_fold_policy(records, 2) == "macs"
    policy = answer_fold_policy(records, 1)
    assert isinstance(policy, FormsPolicy) and policy.forms == {"1": "shallow", "3": "shallow"}
    assert answer_fold_policy([{"stage": 0}, {"stage": 1, "chosen": ["x"]}], 1) == "macs"


def test_an_unknown_dp_merge_is_a_config_error():
    with pytest.raises(ConfigError, match="dp_merge must be one of"):
        ChoiceSettings(choose="dp", latency_budget=0.5, dp_merge="whole")


def test_forms_are_timed_side_by_side_and_then_read(tmp_path, macs_timer):
    """Forms are compared on one day's timings: a segment whose forms were each timed alone
    (here: both in the table, built one after the other) is timed again in both forms,
    round-robin. Then both are read."""
    splits = tiny_splits()
    sample = next(iter(splits.train_eval))[0][:1]
    model = bottleneck_mlp(sample[0].numel()).eval()
    table, context = LatencyTable(tmp_path / "table.json"), TableContext("test-macs", 1)
    alone = build_segment_table(model, sample, context, table, span=2, progress=False)
    assert alone.hits + alone.misses == len(alone.seconds) + 1  # and the call overhead
    distinct = alone.misses - 1  # identical segments share an entry
    build_segment_table(model, sample, TableContext("test-macs", 1, form="shallow"), table,
                        span=2, progress=False)
    before = macs_timer.calls
    both = build_form_tables(model, sample, context, table, span=2, progress=False,
                             forms=("macs", "shallow"))
    assert set(both) == {"macs", "shallow"}
    # Every entry timed again in both forms (the overhead read): 2 calls per entry.
    assert macs_timer.calls - before == 2 * distinct and both["macs"].misses == distinct
    assert both["macs"].seconds == alone.seconds  # the noiseless timer: the same times
    assert any(both["shallow"].seconds[s] < alone.seconds[s] for s in alone.seconds)
    read = macs_timer.calls
    again = build_form_tables(model, sample, context, LatencyTable(tmp_path / "table.json"),
                              span=2, progress=False, forms=("macs", "shallow"))
    assert macs_timer.calls == read and again["shallow"].misses == 0
    assert again["shallow"].seconds == both["shallow"].seconds
