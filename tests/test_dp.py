"""`--choose dp`: the dynamic programme against brute force, the scorer, and EASIER and
progressive planning with it (a noiseless test timer: no timing in these tests)."""

from __future__ import annotations

import itertools
import json
import math
import random
import warnings

import pytest
import torch
from torch import nn

from depthcut.cost.latency_table import LatencyTable, TableContext, build_segment_table
from depthcut.errors import ConfigError
from depthcut.methods.easier import EasierConfig, easier
from depthcut.methods.progressive import ProgressiveConfig, progressive
from depthcut.scorers import Candidates, choose_sites, scorer_for
from depthcut.scorers import dp as dp_module
from depthcut.scorers.dp import DpScorer, plan_sites, site_importance
from depthcut.sites import find_sites
from depthcut.train import TrainConfig, evaluate
from tests.helpers import (
    macs_timer_fixture,  # noqa: F401 - a fixture
    one_thread,  # noqa: F401
    seed_fixture,  # noqa: F401
    tiny_splits,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(importance, seconds, budget, overhead=0.0, segment_cost=None):
    """(importance removed, seconds) of the best plan over every subset of kept sites."""
    n = len(importance)
    best, fastest = None, None
    for keep in itertools.product([True, False], repeat=n):
        if any(math.isnan(h) and not k for h, k in zip(importance, keep, strict=True)):
            continue
        kept = [0, *(i + 1 for i in range(n) if keep[i]), n + 1]
        pairs = list(zip(kept, kept[1:], strict=False))
        if any(pair not in seconds for pair in pairs):
            continue
        total = overhead + sum(seconds[pair] for pair in pairs)
        removed = sum(h for h, k in zip(importance, keep, strict=True) if not k)
        if segment_cost is not None:
            removed = sum(segment_cost[pair] for pair in pairs if pair[1] - pair[0] > 1)
        if fastest is None or total < fastest[1]:
            fastest = (removed, total)
        if total <= budget and (best is None or (removed, total) < best):
            best = (removed, total)
    return best, fastest


def synthetic(rng: random.Random, n: int, span: int):
    importance = [rng.choice([0.0, rng.random()]) for _ in range(n)]
    if rng.random() < 0.3:
        importance[rng.randrange(n)] = math.nan  # an unreached site: always kept
    seconds = {(i, j): rng.uniform(0.1, 1.0) * (j - i) ** rng.uniform(0.3, 1.1)
               for i in range(n + 1) for j in range(i + 1, min(n + 1, i + span + 1) + 1)}
    return importance, seconds


@pytest.mark.parametrize("trial", range(60))
def test_the_dp_finds_the_brute_force_optimum(trial, seed):
    rng = random.Random(seed.value * 1000 + trial)
    n = rng.randint(1, 8)
    importance, seconds = synthetic(rng, n, span=rng.randint(1, n))
    dense = sum(seconds[(k, k + 1)] for k in range(n + 1))
    for budget in (0.05 * dense, 0.5 * dense, 0.8 * dense, 1.5 * dense):
        best, fastest = brute_force(importance, seconds, budget)
        plan = plan_sites(importance, seconds, budget)
        if best is None:  # infeasible: best effort is the fastest plan, flagged
            assert not plan.feasible and plan.seconds == pytest.approx(fastest[1]), seed
        else:
            assert plan.feasible and plan.seconds <= budget + 1e-12, seed
            assert plan.removed == pytest.approx(best[0], abs=1e-12), (seed, budget)
            assert plan.seconds == pytest.approx(best[1]), (seed, budget)
        kept = plan.kept
        assert kept[0] == 0 and kept[-1] == n + 1 and kept == sorted(set(kept))
        assert all(k in kept for k in range(1, n + 1) if math.isnan(importance[k - 1]))
        assert plan.seconds == pytest.approx(sum(seconds[p] for p in zip(kept, kept[1:],
                                                                         strict=False)))


@pytest.mark.parametrize("trial", range(20))
def test_the_dp_with_a_cost_per_segment_finds_the_brute_force_optimum(trial, seed):
    """dp_importance "finetune" prices whole segments, not sites: still exact."""
    rng = random.Random(seed.value * 1000 + trial)
    n = rng.randint(1, 7)
    importance, seconds = synthetic(rng, n, span=rng.randint(1, n))
    cost = {pair: rng.random() for pair in seconds if pair[1] - pair[0] > 1}
    dense = sum(seconds[(k, k + 1)] for k in range(n + 1))
    for budget in (0.3 * dense, 0.7 * dense):
        best, fastest = brute_force(importance, seconds, budget, segment_cost=cost)
        plan = plan_sites(importance, seconds, budget, segment_cost=cost)
        assert plan.feasible == (best is not None), seed
        assert plan.removed == pytest.approx((best or fastest)[0], abs=1e-12), (seed, budget)


def test_finetune_importance_prices_each_segment_on_a_copy(tmp_path, macs_timer):
    from depthcut.scorers.dp import finetune_importance

    model, splits = small_model().train(), tiny_splits()
    sites = find_sites(model)
    segments = [(0, 1), (0, 2), (1, 3), (2, 5)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    costs = finetune_importance(model, sites, segments, splits.train_eval, steps=2)
    assert set(costs) == {(0, 2), (1, 3), (2, 5)} and all(c >= 0 for c in costs.values())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert model.training and find_sites(model) == sites
    config = dp_config(tmp_path, latency_budget=0.9, dp_importance="finetune")
    scored = scorer_for(config).score(Candidates(model, dict.fromkeys(sites, 0.5),
                                                 examples=splits.train_eval))
    assert scored.record["dp"]["importance"] == "finetune"
    assert scored.record["dp"]["removed"] >= 0


def test_a_loose_budget_removes_nothing_and_a_tight_one_the_least_entropy():
    importance = [0.9, 0.1, 0.5]
    seconds = {(i, j): 1.0 for i in range(4) for j in range(i + 1, 5)}  # any merge: 1 s
    assert plan_sites(importance, seconds, 10.0).kept == [0, 1, 2, 3, 4]
    plan = plan_sites(importance, seconds, 3.0)  # one segment fewer: one site goes
    assert plan.kept == [0, 1, 3, 4] and plan.removed == pytest.approx(0.1)
    plan = plan_sites(importance, seconds, 2.0)  # two fewer: the most entropic site stays
    assert plan.kept == [0, 1, 4] and plan.removed == pytest.approx(0.6)


def test_a_table_that_cannot_reach_the_output_is_a_config_error():
    with pytest.raises(ConfigError, match="no chain of measured segments"):
        plan_sites([0.1, 0.2], {(0, 1): 1.0, (1, 2): 1.0}, 5.0)
    with pytest.raises(ConfigError, match="no chain"):  # the only way out skips a kept site
        plan_sites([0.1, math.nan], {(0, 1): 1.0, (1, 3): 1.0}, 5.0)


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def dp_config(tmp_path, cls=EasierConfig, **settings):
    return cls(choose="dp", latency_budget=settings.pop("latency_budget", 0.6),
               latency_backend="test-macs", latency_table=str(tmp_path / "table.json"),
               **settings)


def test_on_a_model_the_scorer_plans_the_brute_force_optimum(tmp_path, macs_timer):
    model, splits = small_model(), tiny_splits()
    sites = find_sites(model)
    entropies = dict(zip(sites, [0.2, 0.7, 0.05, 0.4], strict=True))
    sample = next(iter(splits.train_eval))[0][:1]
    table = build_segment_table(model, sample, TableContext("test-macs", 1),
                                LatencyTable(tmp_path / "table.json"), sites, span=4,
                                progress=False)
    dense = table.plan_seconds(list(range(len(sites) + 2)))
    seen = set()
    for budget in (1.0, 0.99, 0.9, 0.85, 0.7, 0.5, 0.01):
        scorer = scorer_for(dp_config(tmp_path, latency_budget=budget))
        best, fastest = brute_force(list(entropies.values()), table.seconds, budget * dense,
                                    table.overhead)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scored = scorer.score(Candidates(model, entropies, examples=splits.train_eval))
        assert [str(w.message)[:20] for w in caught] == (
            [] if best is not None else ["dp: no plan meets la"])
        record = scored.record["dp"]
        chosen = choose_sites(scored.scores, len(sites))
        assert set(chosen) == set(record["sites"])
        assert sum(entropies[s] for s in chosen) == pytest.approx((best or fastest)[0])
        assert record["within_budget"] == (best is not None)
        assert {s: scored.scores[s] for s in chosen} == {s: entropies[s] for s in chosen}
        assert all(math.isnan(scored.scores[s]) for s in sites if s not in chosen)
        assert scored.record["dp_cost"]["misses"] == 0  # the table was built above
        json.dumps(scored.record)
        seen.add(tuple(chosen))
    assert len(seen) >= 3  # the budgets did not all give the same plan


def test_the_controls_plan_at_the_same_latency_by_another_worth(tmp_path, macs_timer):
    """dp_importance "last" and "random": the same DP and table, another worth per site: "last"
    removes the deepest sites the budget allows, "random" a seeded order stable across stages
    (per site name), and both meet the budget the entropy plan meets."""
    model, splits = small_model(), tiny_splits()
    sites = find_sites(model)
    entropies = dict(zip(sites, [0.2, 0.7, 0.05, 0.4], strict=True))
    assert site_importance(entropies, "last") == [4.0, 3.0, 2.0, 1.0]
    assert site_importance(entropies, "entropy") == list(entropies.values())
    drawn = site_importance(entropies, "random", seed=1)
    assert drawn == site_importance(entropies, "random", seed=1) != site_importance(
        entropies, "random", seed=2)
    later = site_importance({s: h for s, h in entropies.items() if s != sites[0]}, "random", 1)
    assert later == drawn[1:]  # a re-plan without the first site keeps the others' worth
    assert math.isnan(site_importance({"a": math.nan}, "random")[0])
    plans = {}
    for importance in ("entropy", "last", "random"):
        scorer = scorer_for(dp_config(tmp_path, latency_budget=0.9, dp_importance=importance,
                                      choice_seed=1))
        record = scorer.score(Candidates(model, entropies, examples=splits.train_eval)).record
        assert record["dp"]["within_budget"] and record["dp"]["predicted_ratio"] <= 0.9
        plans[importance] = record["dp"]["sites"]
    worth = dict(zip(sites, site_importance(entropies, "last"), strict=True))
    table = build_segment_table(model, next(iter(splits.train_eval))[0][:1],
                                TableContext("test-macs", 1),
                                LatencyTable(tmp_path / "table.json"), sites, span=8,
                                progress=False)
    best, _ = brute_force(list(worth.values()), table.seconds,
                          0.9 * table.plan_seconds(list(range(len(sites) + 2))), table.overhead)
    assert sum(worth[s] for s in plans["last"]) == pytest.approx(best[0])


@pytest.mark.parametrize("miss", [1.0, 0.905])
def test_a_plan_that_misses_the_budget_measured_whole_is_planned_again_tighter(
        tmp_path, macs_timer, monkeypatch, miss):
    """The table's estimate proposes, the whole model measured disposes: a plan whose measured
    ratio misses the budget is replaced by the DP's plan under a tightened target, also when
    it misses by little (a target tightened from the budget alone would admit it again)."""
    model, splits = small_model(), tiny_splits()
    sites = find_sites(model)
    entropies = dict(zip(sites, [0.2, 0.7, 0.05, 0.4], strict=True))
    candidates = Candidates(model, entropies, examples=splits.train_eval)
    trusted = scorer_for(dp_config(tmp_path, latency_budget=0.9, dp_verify=0)).score(candidates)
    assert trusted.record["dp"]["measured_ratio"] is None
    assert trusted.record["dp"]["checked_plans"] == 0
    assert 0 < len(trusted.record["dp"]["sites"]) < 3  # the estimate alone removes 1 or 2
    # A backend on which only removing 3 sites or more pays (measured whole: `miss` or 0.5).
    def measured(model, reference, sample, context, policy=None):
        left = sum(isinstance(m, nn.ReLU) for m in model.modules())
        ratio = 0.5 if left <= len(sites) - 3 else miss
        return ratio, ratio, 1.0
    monkeypatch.setattr(dp_module, "measured_ratio", measured)
    scored = scorer_for(dp_config(tmp_path, latency_budget=0.9, dp_verify=10)).score(candidates)
    record = scored.record["dp"]
    assert record["measured_ratio"] == 0.5 and record["within_budget"]
    assert record["checked_plans"] >= 2 and len(record["sites"]) >= 3
    assert set(choose_sites(scored.scores, len(sites))) == set(record["sites"])


def test_under_ddp_rank_0_alone_plans_and_the_others_take_its_answer_or_error(
        tmp_path, macs_timer, monkeypatch):
    """Two ranks simulated: rank 0 plans and sends its Scores (or its error's message, then
    raises its own); rank 1 never opens the table and returns what it receives, or raises."""
    model, splits = small_model(), tiny_splits()
    candidates = Candidates(model, dict.fromkeys(find_sites(model), 0.5),
                            examples=splits.train_eval)
    config = dp_config(tmp_path, latency_budget=0.85, dp_verify=0)
    sent = []
    monkeypatch.setattr(dp_module, "world_size", lambda: 2)
    monkeypatch.setattr(dp_module, "rank", lambda: 0)
    monkeypatch.setattr(dp_module, "broadcast_object", lambda obj, src=0: sent.append(obj) or obj)
    answer = scorer_for(config).score(candidates)
    assert sent == [answer] and answer.record["dp"]["sites"]
    (tmp_path / "table.json").write_text("not json")
    with pytest.raises(ConfigError, match="unreadable"):
        scorer_for(config).score(candidates)
    assert sent[1].startswith("ConfigError: latency table") and len(sent) == 2

    def forbidden(*args, **kwargs):
        raise AssertionError("rank 1 touched the latency table")

    monkeypatch.setattr(dp_module, "rank", lambda: 1)
    monkeypatch.setattr(dp_module, "LatencyTable", forbidden)
    monkeypatch.setattr(dp_module, "build_segment_table", forbidden)
    monkeypatch.setattr(dp_module, "broadcast_object", lambda obj, src=0: answer)
    assert scorer_for(config).score(candidates) is answer
    monkeypatch.setattr(dp_module, "broadcast_object", lambda obj, src=0: sent[1])
    with pytest.raises(ConfigError, match="failed on rank 0: ConfigError: latency table"):
        scorer_for(config).score(candidates)


def test_dp_without_a_budget_is_a_config_error(macs_timer):
    with pytest.raises(ConfigError, match="latency_budget"):
        EasierConfig(choose="dp")
    with pytest.raises(ConfigError, match="latency_budget must be a fraction"):
        ProgressiveConfig(choose="dp", latency_budget=-1)
    with pytest.raises(ConfigError, match="dp_span"):
        EasierConfig(choose="dp", latency_budget=0.5, dp_span=-1)
    with pytest.raises(ConfigError, match="needs --latency-budget"):
        DpScorer.from_config(type("Bare", (), {"latency_budget": None})())


def test_a_later_stage_needs_a_dense_reference(tmp_path, macs_timer):
    """A model with sites gone plans against the dense estimate of an earlier "dp" record (a
    resumed run) or the dense model; with neither it refuses."""
    model, splits = small_model(), tiny_splits()
    sites = find_sites(model)
    config = dp_config(tmp_path, latency_budget=0.85)
    entropies = {s: 0.5 for s in sites}
    first = scorer_for(config).score(Candidates(model, entropies, examples=splits.train_eval))
    dense_record = {"stage": 0, "sites_total": len(sites) + 1}
    later = Candidates(model, entropies, examples=splits.train_eval,
                       records=[dense_record, {"stage": 1, "dp": first.record["dp"]}])
    again = scorer_for(config).score(later)
    assert again.record["dp"]["dense_ms"] == first.record["dp"]["dense_ms"]
    with pytest.raises(ConfigError, match="no dense reference"):
        scorer_for(config).score(Candidates(model, entropies, examples=splits.train_eval,
                                            records=[dense_record]))
    given = scorer_for(config).score(Candidates(model, entropies, examples=splits.train_eval,
                                                records=[dense_record], dense=small_model()))
    assert given.record["dp"]["dense_ms"] == first.record["dp"]["dense_ms"]


def dense_record(model, splits) -> dict:
    return {"method": "dense", "stage": 0, "sites_total": len(find_sites(model)),
            "sites_linearized": 0, "linearized": [], "val_top1": evaluate(model, splits.val),
            "test_top1": 0.0}


def test_easier_takes_the_plan_one_site_at_a_time_and_stops_when_it_is_met(tmp_path,
                                                                           macs_timer):
    model, splits = small_model(), tiny_splits()
    config = dp_config(tmp_path, latency_budget=0.85, delta=100.0,
                       finetune=TrainConfig(epochs=0))
    result = easier(model, splits, config, dense_record=dense_record(model, splits),
                    progress=False)
    stages = result.records[1:]
    first_plan = stages[0]["dp"]["sites"]
    assert len(first_plan) >= 2 and [r["chosen"] for r in stages] != []
    for record in stages:  # the lowest-entropy site of each stage's plan
        plan = record["dp"]["sites"]
        assert record["chosen"] == [min(plan, key=lambda s: (record["entropy"][s],
                                                             list(record["entropy"]).index(s)))]
    assert stages[-1]["dp"]["dense_ms"] == stages[0]["dp"]["dense_ms"]
    assert "plan removes no more sites" in result.stop_reason
    assert result.records[-1]["dp"]["predicted_ratio"] <= 0.85
    assert result.records[-1]["dp"]["within_budget"]


def test_progressive_one_shot_linearizes_the_whole_plan(tmp_path, macs_timer):
    model, splits = small_model(), tiny_splits()
    config = dp_config(tmp_path, ProgressiveConfig, latency_budget=0.85, delta=100.0,
                       first_step=99, max_stages=1, finetune=TrainConfig(epochs=1))
    result = progressive(model, splits, config, dense_record=dense_record(model, splits),
                         progress=False)
    record = result.records[1]
    assert sorted(record["chosen"]) == sorted(record["dp"]["sites"]) and record["chosen"]
    assert find_sites(result.model) == [s for s in find_sites(small_model())
                                        if s not in record["chosen"]]


def test_compare_refuses_a_dp_variant_without_a_budget_before_training(tmp_path):
    from depthcut.experiment import ExperimentConfig, run_comparison

    for variant in ("easier-dp", "progressive-dp"):
        with pytest.raises(ConfigError, match="latency_budget"):
            run_comparison(ExperimentConfig(), ["easier", variant], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_plan_command_plans_a_checkpoint_and_measures_the_plan(tmp_path, macs_timer,
                                                                   capsys):
    from depthcut.cli import main
    from tests.helpers import tiny_world

    world = tiny_world(tmp_path)
    capsys.readouterr()
    checkpoint = world["run"] / "checkpoints" / "stage_00.pt"
    table = tmp_path / "table.json"
    args = ["plan", "--dense-checkpoint", str(checkpoint), "--latency-budget", "0.999",
            "--latency-backend", "test-macs", "--latency-table", str(table), "--samples", "32",
            "--data-root", str(world["root"]), "--dp-span", "3", "--no-progress"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "plan: linearize" in first and "predicted latency ratio" in first
    assert "measured latency ratio" in first and " 0 timed" not in first
    assert main([*args, "--no-measure"]) == 0
    again = capsys.readouterr().out
    assert " 0 timed" in again and "measured latency ratio" not in again
    plan_line = next(line for line in first.splitlines() if line.startswith("plan:"))
    assert plan_line in again  # the same plan from the cached table


def test_the_cli_refuses_choose_dp_without_a_budget_before_any_work(tmp_path, capsys):
    from depthcut.cli import main

    code = main(["easier", "--choose", "dp", "--data-root", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out")])
    assert code != 0 and "choose dp needs latency_budget" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_compare_runs_the_dp_variants_from_one_dense_model(tmp_path, macs_timer):
    """easier-dp plans every stage; progressive-dp linearizes its whole first plan in one
    blended finetune (one shot)."""
    from depthcut.cli import main
    from depthcut.methods.progressive import ONE_SHOT
    from depthcut.run import read_records
    from tests.helpers import write_fake_cifar10

    root = write_fake_cifar10(tmp_path / "data")
    out = tmp_path / "cmp"
    assert main(["compare", "--dataset", "cifar10", "--data-root", str(root), "--width",
                 "0.0625", "--epochs", "1", "--finetune-epochs", "1", "--max-stages", "2",
                 "--delta", "100", "--batch-size", "32", "--device", "cpu",
                 "--methods", "easier-dp", "progressive-dp", "--no-fair-reference",
                 "--latency-budget", "0.999", "--latency-backend", "test-macs",
                 "--latency-table", str(tmp_path / "table.json"), "--dp-span", "3",
                 "--out", str(out), "--no-progress"]) == 0
    easier_config = json.loads((out / "easier-dp" / "config.json").read_text())["easier"]
    assert easier_config["choose"] == "dp" and easier_config["latency_budget"] == 0.999
    stages = read_records(out / "easier-dp")[1:]
    assert stages and all(r["chosen"][0] in r["dp"]["sites"] for r in stages)
    one_shot = json.loads((out / "progressive-dp" / "config.json").read_text())["progressive"]
    assert one_shot["first_step"] == ONE_SHOT and one_shot["max_stages"] == 1
    (stage,) = read_records(out / "progressive-dp")[1:]
    assert sorted(stage["chosen"]) == sorted(stage["dp"]["sites"]) and stage["chosen"]


def test_a_killed_dp_run_resumes_with_its_dense_reference(tmp_path):
    """A run killed between stages plans its next stage after --resume against the same dense
    estimate (the dense model is loaded from stage 0 for the choice; the table is cached)."""
    import signal

    from depthcut.run import read_records
    from tests.helpers import TINY_RUN, run_depthcut, write_fake_cifar10

    root = write_fake_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    args = ["easier", "--dataset", "cifar10", "--data-root", str(root), "--out", str(out),
            *TINY_RUN, "--max-stages", "2", "--delta", "100", "--choose", "dp",
            "--latency-budget", "0.05", "--dp-span", "1",
            "--latency-table", str(tmp_path / "table.json")]
    killed = run_depthcut(*args, die_at="stage-end:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_depthcut("easier", "--resume", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first, second = read_records(out)[1:]
    assert second["dp"]["dense_ms"] == first["dp"]["dense_ms"]
    # the table is read back; only segments across the removed site (longer than the span
    # allowed in the dense model) are new
    assert second["dp_cost"]["hits"] > 2 * second["dp_cost"]["misses"]
    assert second["chosen"][0] in second["dp"]["sites"]
