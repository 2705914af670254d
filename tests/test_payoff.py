"""EASIER's payoff-aware site choice: entropy minus the weighted saving of a dry-run fold."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import pytest
import torch
from torch import nn

from depthcut.cli import build_parser, main, resolve_settings
from depthcut.errors import ConfigError
from depthcut.fold import FoldError, fold
from depthcut.graph import chain_neighbours
from depthcut.methods.easier import EasierConfig, easier
from depthcut.models import ConvBNAct, InvertedResidual
from depthcut.run import read_records
from depthcut.scorers import (
    Candidates,
    Scorer,
    Scores,
    choose_sites,
    example_batch,
    scorer_for,
)
from depthcut.scorers.payoff import (
    PAYOFF_EXAMPLES,
    PayoffScorer,
    folded_latency,
    folded_macs,
    pair_credit,
    payoff_savings,
)
from depthcut.settings import build_config
from depthcut.sites import find_sites, linearize
from depthcut.train import TrainConfig, evaluate
from tests.helpers import (  # noqa: F401 - a fixture
    one_thread,
    tiny_splits,  # noqa: F401
    write_fake_cifar10,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyMobile(nn.Module):
    """A stem and two MobileNetV2 inverted-residual blocks (t = 6) on 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBNAct(1, 4, 3, 1, 1, "relu6")
        self.blocks = nn.Sequential(InvertedResidual(4, 4, 1, 6, "relu6"),
                                    InvertedResidual(4, 4, 1, 6, "relu6"))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def half_linear_model() -> nn.Module:
    """blocks.0's expansion already linear: linearizing blocks.0.depthwise.act too lets the
    whole block (expand, depthwise, project, skip) fold into one 3x3 conv and save MACs; the
    other sites save nothing on their own."""
    torch.manual_seed(0)
    return linearize(TinyMobile(), ["blocks.0.expand.act"])


# Entropies made up so that the biggest saving (blocks.0.depthwise.act) is not the lowest.
ENTROPIES = {"stem.act": 0.2, "blocks.0.depthwise.act": 0.5, "blocks.1.expand.act": math.nan,
             "blocks.1.depthwise.act": 0.3}
BIG = "blocks.0.depthwise.act"


@dataclass
class MadeUpEntropies(Scorer):
    """`inner` (the scorer the config names), scoring as if the sites had `entropies`."""

    inner: Scorer
    entropies: dict[str, float]

    def score(self, candidates: Candidates) -> Scores:
        return self.inner.score(replace(candidates, entropies=dict(self.entropies)))


def one_stage(**settings):
    """One EASIER stage (no finetune) on the half-linear model with ENTROPIES: its record, and
    the model as it was before the stage."""
    model = half_linear_model()
    before = copy.deepcopy(model)
    splits = tiny_splits()
    dense = {"method": "dense", "stage": 0, "sites_total": 5, "sites_linearized": 1,
             "linearized": ["blocks.0.expand.act"], "val_top1": evaluate(model, splits.val),
             "test_top1": 0.0}
    config = EasierConfig(delta=100.0, max_stages=1, finetune=TrainConfig(epochs=0), **settings)
    scorer = MadeUpEntropies(scorer_for(config), ENTROPIES)
    result = easier(model, splits, config, scorer=scorer, dense_record=dense, progress=False)
    return result.records[1], before, splits


def test_weight_zero_chooses_as_entropy():
    entropy, _, _ = one_stage()
    payoff, _, _ = one_stage(choose="payoff", payoff_weight=0.0)
    assert entropy["chosen"] == payoff["chosen"] == ["stem.act"]
    assert "payoff" not in entropy.extras and "score" not in entropy.extras
    assert "payoff" not in entropy.to_dict() and "score" not in entropy.to_dict()
    measured = [s for s, h in ENTROPIES.items() if not math.isnan(h)]
    assert list(payoff["payoff"]) == list(payoff["score"]) == measured
    assert payoff["score"] == {s: ENTROPIES[s] for s in measured}
    assert payoff.to_dict()["payoff"] == payoff["payoff"]  # written to records.jsonl


def test_large_weight_chooses_the_biggest_saving():
    record, _, _ = one_stage(choose="payoff", payoff_weight=10.0)
    savings = record["payoff"]
    assert savings[BIG] > 0.2 and max(savings, key=savings.get) == BIG
    assert all(v == 0 for s, v in savings.items() if s != BIG)
    assert record["chosen"] == [BIG] and ENTROPIES[BIG] > min(
        h for h in ENTROPIES.values() if not math.isnan(h))
    for site, score in record["score"].items():
        assert score == ENTROPIES[site] - 10.0 * savings[site]
    assert record["chosen"] == choose_sites(record["score"], 1)
    # Weight 0.5: the saving (about 0.31) no longer outweighs 0.3 bits of entropy.
    record, _, _ = one_stage(choose="payoff", payoff_weight=0.5)
    assert record["chosen"] == ["stem.act"]


def test_savings_match_folding_by_hand():
    record, before, splits = one_stage(choose="payoff", payoff_weight=1.0)
    example = next(iter(splits.train_eval))[0][:8]
    now = fold(before, example).fold_report.macs_after
    after = fold(linearize(copy.deepcopy(before), [BIG]), example).fold_report.macs_after
    assert record["payoff"][BIG] == (now - after) / now
    assert after < now


def test_dry_run_changes_neither_model_nor_rng():
    model = half_linear_model().train()
    splits = tiny_splits()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [(name, type(m)) for name, m in model.named_modules()]
    rng = torch.get_rng_state()
    epoch = splits.train_eval.epoch
    example = example_batch(splits.train_eval, PAYOFF_EXAMPLES)
    assert example.shape == (8, 1, 8, 8) and splits.train_eval.epoch == epoch
    savings = payoff_savings(model, example, find_sites(model), folded_macs)
    assert set(savings) == set(find_sites(model)) and savings[BIG] > 0
    latency = payoff_savings(model, example, [BIG], folded_latency)
    assert set(latency) == {BIG} and math.isfinite(latency[BIG])
    scored = PayoffScorer(weight=1.0).score(Candidates(model, ENTROPIES,
                                                       examples=splits.train_eval))
    assert scored.record["payoff"][BIG] == savings[BIG] and splits.train_eval.epoch == epoch
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert [(name, type(m)) for name, m in model.named_modules()] == kinds
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


def test_failing_folds_save_nothing():
    def refuse(model, example):
        raise FoldError("no")

    model = half_linear_model()
    assert payoff_savings(model, torch.zeros(2, 1, 8, 8), [BIG, "stem.act"], refuse) == {
        BIG: 0.0, "stem.act": 0.0}


@pytest.mark.parametrize("kwargs, message", [
    ({"choose": "bogus"}, "choose"), ({"payoff_weight": -0.1}, "payoff_weight"),
    ({"payoff_weight": math.inf}, "payoff_weight"), ({"payoff_weight": math.nan}, "payoff_weight"),
    ({"payoff_cost": "flops"}, "payoff_cost"),
])
def test_config_rejects_bad_payoff_settings(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        EasierConfig(**kwargs)
    scorer_settings = {"weight": kwargs.get("payoff_weight", 1.0),
                       "cost": kwargs.get("payoff_cost", "macs")}
    if "choose" not in kwargs:  # the scorer built without a config checks the same
        with pytest.raises(ConfigError, match=message):
            PayoffScorer(**scorer_settings)


@pytest.mark.parametrize("command", ["easier", "compare"])
def test_cli_flags_build_the_config(command):
    parser = build_parser()
    defaults = build_config(EasierConfig, resolve_settings(parser.parse_args([command,
                                                                              "--out", "x"])))
    assert (defaults.choose, defaults.payoff_weight, defaults.payoff_cost) == (
        "entropy", 1.0, "macs")
    args = parser.parse_args([command, "--choose", "payoff", "--payoff-weight", "2.5",
                              "--payoff-cost", "latency", "--out", "x"])
    config = build_config(EasierConfig, resolve_settings(args))
    assert (config.choose, config.payoff_weight, config.payoff_cost) == (
        "payoff", 2.5, "latency")
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--choose", "magnitude", "--out", "x"])


def test_cli_bad_payoff_weight_is_bad_input(tmp_path, capsys):
    assert main(["easier", "--payoff-weight", "-1", "--print-config"]) == 2
    assert "payoff_weight" in capsys.readouterr().err


def test_cli_run_records_payoff_and_score(tmp_path):
    root = write_fake_cifar10(tmp_path / "data", train=80, test=20)
    out = tmp_path / "run"
    assert main(["easier", "--dataset", "cifar10", "--data-root", str(root), "--model", "vgg16",
                 "--width", "0.0625", "--epochs", "1", "--finetune-epochs", "1",
                 "--max-stages", "1", "--delta", "100", "--batch-size", "32", "--device", "cpu",
                 "--choose", "payoff", "--payoff-weight", "5", "--out", str(out),
                 "--no-progress"]) == 0
    record = read_records(out)[1]
    assert set(record["payoff"]) == set(record["score"]) == {
        s for s, h in record["entropy"].items() if h is not None and not math.isnan(h)}
    assert record["chosen"] == choose_sites(record["score"], 1)
    for site, score in record["score"].items():
        assert score == pytest.approx(record["entropy"][site] - 5 * record["payoff"][site])


def test_chain_neighbours_are_one_linear_run_apart():
    model = TinyMobile()
    neighbours = chain_neighbours(model, find_sites(model))
    assert neighbours["blocks.0.expand.act"] == ["blocks.0.depthwise.act"]
    assert neighbours["blocks.0.depthwise.act"] == ["blocks.0.expand.act"]  # then a residual add
    assert neighbours["blocks.1.depthwise.act"] == ["blocks.1.expand.act"]
    assert neighbours["stem.act"] == []  # its output also feeds the skip: a branch, no run
    chain = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2),
                          nn.ReLU(), nn.Flatten(), nn.ReLU())
    linearize(chain, ["4"])  # an Identity passes the run on; Flatten ends it
    assert chain_neighbours(chain, ["1", "6"]) == {"1": [], "6": []}
    assert chain_neighbours(nn.Sequential(*list(chain)[:5], nn.ReLU()), ["1", "5"]) == {
        "1": ["5"], "5": ["1"]}


def test_pair_credit_is_half_the_pair_or_the_site_alone():
    savings = {"a": 0.0, "b": 0.05, "c": 0.0, "a+b": 0.3}
    credit = pair_credit(savings, {"a": ["b"], "b": ["a"], "c": []})
    assert credit == {"a": 0.15, "b": 0.15, "c": 0.0}
    assert pair_credit({"a": 0.2, "a+b": 0.3}, {"a": ["b"]}) == {"a": 0.2}


def test_payoff_looks_one_pair_ahead():
    """With no site linear, no site of an inverted-residual block saves anything alone; the
    pair does (the block becomes one conv), so a large weight chooses a site of that pair
    over lower-entropy ones."""
    entropies = {"stem.act": 0.2, "blocks.0.expand.act": 0.6, "blocks.0.depthwise.act": 0.7,
                 "blocks.1.expand.act": 0.3, "blocks.1.depthwise.act": 0.4}
    torch.manual_seed(0)
    model = TinyMobile()
    splits = tiny_splits()
    dense = {"method": "dense", "stage": 0, "sites_total": 5, "sites_linearized": 0,
             "linearized": [], "val_top1": evaluate(model, splits.val), "test_top1": 0.0}
    config = EasierConfig(delta=100.0, max_stages=1, finetune=TrainConfig(epochs=0),
                          choose="payoff", payoff_weight=10.0)
    scorer = MadeUpEntropies(scorer_for(config), entropies)
    record = easier(model, splits, config, scorer=scorer, dense_record=dense,
                    progress=False).records[1]
    assert all(v == 0 for v in record["payoff"].values())
    pair = record["payoff_pairs"]["blocks.0.depthwise.act+blocks.0.expand.act"]
    assert pair > 0.1
    assert record["score"]["blocks.0.expand.act"] == pytest.approx(0.6 - 10.0 * pair / 2)
    assert record["chosen"] == [min(record["score"], key=record["score"].get)]
    chosen = record["chosen"][0]
    assert chosen != "stem.act"  # the lowest entropy, but it pays nothing, alone or paired
    assert any(chosen in key for key, v in record["payoff_pairs"].items() if v > 0.1)
