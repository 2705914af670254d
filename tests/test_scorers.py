"""Site choice as scorers: the registry, the contract every scorer keeps, and methods that
choose by whichever scorer they are handed (injected, or registered and named by `choose`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from depthcut.errors import ConfigError
from depthcut.methods.easier import Easier, EasierConfig, easier
from depthcut.methods.progressive import ProgressiveConfig, progressive
from depthcut.scorers import (
    CHOICES,
    SCORERS,
    Candidates,
    Scorer,
    Scores,
    check_choice,
    choose_sites,
    register_scorer,
    scorer_for,
)
from depthcut.scorers.entropy import EntropyScorer
from depthcut.scorers.payoff import PayoffScorer
from depthcut.sites import find_sites
from depthcut.train import TrainConfig, evaluate
from tests.helpers import (
    macs_timer_fixture,  # noqa: F401 - a fixture
    one_thread,  # noqa: F401
    tiny_splits,  # noqa: F401
)

pytestmark = pytest.mark.usefixtures("one_thread")

SITES = ["1", "3", "7"]  # find_sites(small_model())


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4),
                         nn.ReLU(), nn.Linear(4, 2))


def dense_record(model, splits) -> dict:
    return {"method": "dense", "stage": 0, "sites_total": len(find_sites(model)),
            "sites_linearized": 0, "linearized": [], "val_top1": evaluate(model, splits.val),
            "test_top1": 0.0}


class Deepest(Scorer):
    """The deepest reached site first (a scorer defined outside depthcut)."""

    name = "test-deepest"

    def score(self, candidates: Candidates) -> Scores:
        reached = [s for s, h in candidates.entropies.items() if not math.isnan(h)]
        return Scores({site: -float(i) for i, site in enumerate(reached)},
                      {"deepest_first": reached[::-1]})


@pytest.fixture
def deepest_registered():
    register_scorer(Deepest)
    yield Deepest
    del SCORERS[Deepest.name]


def test_the_registry_names_the_shipped_scorers():
    assert CHOICES == tuple(SCORERS) == tuple(sorted(SCORERS))  # listed in name order
    assert {"entropy", "payoff", "random", "last", "dp"} <= set(SCORERS)
    assert SCORERS["entropy"] is EntropyScorer and SCORERS["payoff"] is PayoffScorer
    assert isinstance(scorer_for(EasierConfig()), EntropyScorer)
    payoff = EasierConfig(choose="payoff", payoff_weight=2.5, payoff_cost="latency")
    assert scorer_for(payoff) == PayoffScorer(weight=2.5, cost="latency")
    with pytest.raises(ConfigError, match="choose must be one of 'dp', 'entropy', 'last', "):
        check_choice("bogus")
    with pytest.raises(ValueError, match="already registered"):
        register_scorer(type("Impostor", (EntropyScorer,), {}))
    assert SCORERS["entropy"] is EntropyScorer


def test_entropy_scorer_ranks_by_entropy_and_records_nothing():
    entropies = {"a": 0.5, "b": 0.1, "c": math.nan, "d": 0.1}
    scored = EntropyScorer().score(Candidates(nn.Identity(), entropies))
    assert scored.record == {} and scored.scores is not entropies
    assert list(scored.scores) == list(entropies) and choose_sites(scored.scores, 3) == [
        "b", "d", "a"]


# Settings a scorer cannot choose without ("dp": a budget, tight enough that every reached
# site is planned away, on the noiseless test timer; the table in the test's folder).
CONTRACT_SETTINGS = {"dp": {"latency_budget": 0.2, "latency_backend": "test-macs"}}


@pytest.mark.parametrize("name", sorted(SCORERS))
@pytest.mark.filterwarnings("ignore:dp. no plan meets")
def test_every_scorer_ranks_reached_sites_and_leaves_model_and_rng_alone(name, macs_timer,
                                                                          tmp_path):
    """The contract a new scorer is checked against the moment it registers: scores for
    candidate sites only (an unreached one is never chosen), record fields that JSON can write,
    the same answer twice (default settings; fields that say what choosing cost aside), and
    neither the model nor the RNGs changed."""
    model, splits = small_model().train(), tiny_splits()
    entropies = {"1": 0.3, "3": math.nan, "7": 0.1}
    candidates = Candidates(model, entropies, examples=splits.train_eval, stage=1)
    settings = CONTRACT_SETTINGS.get(name, {})
    if settings:
        settings = {**settings, "latency_table": str(tmp_path / "table.json")}
    scorer = SCORERS[name].from_config(EasierConfig(choose=name, **settings))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    scored = scorer.score(candidates)
    assert set(scored.scores) <= set(entropies)
    assert set(choose_sites(scored.scores, 3)) == {"1", "7"}
    json.dumps(scored.record)
    again = scorer.score(candidates)
    for field_name in scorer.volatile_fields:
        again.record.pop(field_name), scored.record.pop(field_name)
    assert repr(again) == repr(scored)  # NaN-safe
    assert torch.equal(torch.get_rng_state(), rng) and model.training
    assert [type(m) for m in model] == [type(m) for m in small_model()]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_a_registered_scorer_is_chosen_by_name(deepest_registered):
    model, splits = small_model(), tiny_splits()
    config = EasierConfig(delta=100.0, max_stages=2, finetune=TrainConfig(epochs=0),
                          choose="test-deepest")
    result = easier(model, splits, config, dense_record=dense_record(model, splits),
                    progress=False)
    assert [r["chosen"] for r in result.records[1:]] == [["7"], ["3"]]
    assert result.records[1]["deepest_first"] == ["7", "3", "1"]  # its own record field
    assert result.records[2].to_dict()["deepest_first"] == ["3", "1"]
    assert "score" not in result.records[1] and find_sites(result.model) == ["1"]


def test_random_choice_is_seeded_per_run_and_stage_and_varies_with_the_seed():
    entropies = {str(i): 0.5 for i in range(12)} | {"unreached": math.nan}
    def order(seed, stage):
        scorer = scorer_for(ProgressiveConfig(choose="random", choice_seed=seed))
        return choose_sites(scorer.score(Candidates(nn.Identity(), entropies,
                                                    stage=stage)).scores, 12)
    assert order(0, 1) == order(0, 1) and sorted(order(0, 1), key=int) == [
        str(i) for i in range(12)]  # every reached site, the unreached one never
    assert len({tuple(order(seed, 1)) for seed in range(4)}) == 4
    assert order(0, 1) != order(0, 2)
    before = torch.get_rng_state()
    order(3, 1)
    assert torch.equal(torch.get_rng_state(), before)


def test_last_choice_takes_the_deepest_reached_site_first_whatever_the_entropy():
    entropies = {"a": 0.0, "b": 0.9, "c": math.nan, "d": 0.5}
    scored = SCORERS["last"]().score(Candidates(nn.Identity(), entropies))
    assert choose_sites(scored.scores, 3) == ["d", "b", "a"]


def test_progressive_chooses_by_the_scorer_its_config_names():
    model, splits = small_model(), tiny_splits()
    config = ProgressiveConfig(delta=100.0, first_step=1, max_stages=2, choose="last",
                               finetune=TrainConfig(epochs=0))
    result = progressive(model, splits, config, dense_record=dense_record(model, splits),
                         progress=False)
    assert [r["chosen"] for r in result.records[1:]] == [["7"], ["3"]]


def test_unregistered_scorer_is_not_a_choice():
    with pytest.raises(ConfigError, match="choose"):
        EasierConfig(choose="test-deepest")


def test_methods_choose_by_the_scorer_they_are_handed():
    model, splits = small_model(), tiny_splits()
    config = EasierConfig(delta=100.0, max_stages=1, finetune=TrainConfig(epochs=0))
    assert isinstance(Easier(config).scorer, EntropyScorer)
    record = easier(model, splits, config, scorer=Deepest(),
                    dense_record=dense_record(model, splits), progress=False).records[1]
    assert record["chosen"] == ["7"] and set(record["entropy"]) == set(SITES)
    model = small_model()
    config = ProgressiveConfig(delta=100.0, first_step=2, max_stages=1,
                               finetune=TrainConfig(epochs=0))
    result = progressive(model, splits, config, scorer=Deepest(),
                         dense_record=dense_record(model, splits), progress=False)
    record = result.records[1]
    assert record["chosen"] == ["7", "3"] and record["step"] == 2
    assert list(record.to_dict()).index("deepest_first") > list(record.to_dict()).index("entropy")
    assert find_sites(result.model) == ["1"]
