"""EASIER: argmin choice, the delta stop rule, and a real run on a tiny model and tiny data."""

import math

import pytest
import torch
from torch import nn

import depthcut.stages as stages_module
from depthcut.data import ImageDataset, make_splits
from depthcut.entropy import measure_entropy
from depthcut.methods.easier import EasierConfig, easier
from depthcut.scorers import choose_sites
from depthcut.sites import SiteError, find_sites
from depthcut.stages import answer_stage, within_delta
from depthcut.train import TrainConfig, evaluate, seed_everything, train


def test_choose_sites_takes_the_k_lowest_and_skips_unreached():
    entropies = {"a": 0.5, "b": 0.1, "c": math.nan, "d": 0.1, "e": 0.0}
    assert choose_sites(entropies, 1) == ["e"]
    assert choose_sites(entropies, 3) == ["e", "b", "d"]  # tie b/d kept in forward order
    assert choose_sites(entropies, 10) == ["e", "b", "d", "a"]
    assert choose_sites({"x": math.nan}, 1) == []


def test_stop_rule_and_answer():
    assert within_delta(90.0, 89.0, 1.0)
    assert not within_delta(90.0, 88.99, 1.0)
    assert within_delta(90.0, 91.0, 0.0)
    records = [{"stage": 0, "within_delta": True}, {"stage": 1, "within_delta": True},
               {"stage": 2, "within_delta": False}]
    assert answer_stage(records)["stage"] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [({"delta": -0.5}, "delta"), ({"delta": math.inf}, "delta"), ({"k": 0}, "k"),
     ({"max_stages": 0}, "max_stages"), ({"entropy_variant": "bogus"}, "entropy_variant")],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EasierConfig(**kwargs)


class TinyNet(nn.Module):
    """Four rectifier sites on 1x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.act2 = nn.LeakyReLU(0.1)
        self.fc1 = nn.Linear(6 * 2, 8)
        self.act3 = nn.GELU()
        self.fc2 = nn.Linear(8, 8)
        self.act4 = nn.ReLU()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        x = torch.cat([x[..., :4].mean((2, 3)), x[..., 4:].mean((2, 3))], 1)  # keep left/right
        return self.head(self.act4(self.fc2(self.act3(self.fc1(x)))))


def tiny_splits(seed: int = 0):
    """Bright-left vs bright-right 8x8 images: learnable in a few epochs."""
    generator = torch.Generator().manual_seed(seed)
    n = 240
    labels = torch.randint(0, 2, (n,), generator=generator)
    images = torch.randint(0, 100, (n, 1, 8, 8), generator=generator)
    images[labels == 0, :, :, :4] += 120
    images[labels == 1, :, :, 4:] += 120
    dataset = ImageDataset(
        name="tiny", train_inputs=images.to(torch.uint8), train_labels=labels,
        test_inputs=images[:60].to(torch.uint8), test_labels=labels[:60], classes=["l", "r"],
        mean=(0.3,), std=(0.2,), crop_padding=1, flip=False,
    )
    return make_splits(dataset, val_fraction=0.25, batch_size=32, eval_batch_size=64, seed=seed)


def dense_record(model, splits) -> dict:
    return {"method": "dense", "stage": 0, "sites_total": len(find_sites(model)),
            "sites_linearized": 0, "linearized": [], "chosen": [], "entropy": {},
            "val_top1": evaluate(model, splits.val), "test_top1": evaluate(model, splits.test),
            "drop": 0.0, "within_delta": True, "epochs": 0, "total_epochs": 0}


def test_stops_at_the_first_stage_beyond_delta(monkeypatch):
    """Scripted accuracies: dense 80; stages give 79.5, 79.2, 78.9 -> stop at stage 3 (delta 1)."""
    splits = tiny_splits()
    model = TinyNet()
    scripted = iter([79.5, 70.0, 79.2, 70.0, 78.9, 70.0])  # (val, test) per stage
    monkeypatch.setattr(stages_module, "evaluate",
                        lambda m, loader, balanced=False: (next(scripted),) * 2)
    dense = dense_record(model, splits) | {"val_top1": 80.0}
    config = EasierConfig(delta=1.0, finetune=TrainConfig(epochs=0))
    result = easier(model, splits, config, dense_record=dense, progress=False)
    assert [r["stage"] for r in result.records] == [0, 1, 2, 3]
    assert [r["within_delta"] for r in result.records] == [True, True, True, False]
    assert result.answer["stage"] == 2
    assert result.records[3]["drop"] == pytest.approx(1.1)
    assert "stage 3" in result.stop_reason


def test_real_tiny_run_chooses_argmin_and_respects_delta():
    seed_everything(0)
    splits = tiny_splits()
    model = TinyNet()
    train(model, splits.train, TrainConfig(epochs=15, lr=0.2), progress=False)
    dense = dense_record(model, splits)
    assert dense["val_top1"] > 80  # the task is learnable: the run below means something
    seen = []

    def on_stage(record, stage_model):
        # The entropies recorded are what the model measured before the choice was made.
        seen.append((record["stage"], stage_model))

    config = EasierConfig(delta=0.0, k=1, finetune=TrainConfig(epochs=2, lr=0.02))
    result = easier(model, splits, config, dense_record=dense, on_stage=on_stage, progress=False)
    stages = result.records[1:]
    assert stages, "at least one stage runs"
    for previous, record in zip(result.records, stages, strict=False):
        remaining = [s for s in ["act1", "act2", "act3", "act4"] if s not in previous["linearized"]]
        assert sorted(record["entropy"]) == sorted(remaining)
        assert record["chosen"] == [min(remaining, key=lambda s: (record["entropy"][s],
                                                                  remaining.index(s)))]
        assert record["linearized"] == previous["linearized"] + record["chosen"]
    assert all(r["within_delta"] for r in stages[:-1])
    if not stages[-1]["within_delta"]:
        assert stages[-1]["val_top1"] < dense["val_top1"]
        assert result.answer is result.records[-2]
    else:
        assert len(stages) == 4 and result.stop_reason == "no site left to linearize"
    assert [s for s, _ in seen] == [r["stage"] for r in stages]
    # The model returned has exactly the last stage's sites left.
    left = [s for s in ["act1", "act2", "act3", "act4"] if s not in stages[-1]["linearized"]]
    if left:
        assert find_sites(result.model) == left
    else:
        with pytest.raises(SiteError):
            find_sites(result.model)


def test_k_sites_per_stage_and_max_stages():
    seed_everything(1)
    splits = tiny_splits(1)
    model = TinyNet()
    dense = dense_record(model, splits)
    config = EasierConfig(delta=100.0, k=2, max_stages=1, finetune=TrainConfig(epochs=0))
    result = easier(model, splits, config, dense_record=dense, progress=False)
    assert len(result.records) == 2
    chosen = result.records[1]["chosen"]
    assert len(chosen) == 2
    assert chosen == choose_sites(result.records[1]["entropy"], 2)
    assert result.stop_reason == "max_stages=1 reached"
    remaining = find_sites(result.model)
    assert not set(chosen) & set(remaining)
    assert set(measure_entropy(result.model, splits.train_eval)) == set(remaining)


@pytest.mark.parametrize("variant", ["paper", "easier-code", "egp-code"])
def test_entropy_variant_data_and_mode(monkeypatch, variant):
    """paper / egp-code count on the unaugmented split as before; easier-code counts in train()
    mode on a replay of the training loader's last epoch without advancing its epoch counter."""
    splits = tiny_splits()
    splits.train.epoch = 3
    seen = []
    real = stages_module.count_states

    def spy(model, batches, sites, **kwargs):
        seen.append((batches, kwargs))
        return real(model, batches, sites, **kwargs)

    monkeypatch.setattr(stages_module, "count_states", spy)
    model = TinyNet()
    config = EasierConfig(delta=100.0, max_stages=1, finetune=TrainConfig(epochs=0),
                          entropy_variant=variant)
    easier(model, splits, config, dense_record=dense_record(model, splits), progress=False)
    (batches, kwargs), = seen
    assert kwargs["variant"] == variant
    assert splits.train.epoch == 3
    if variant == "easier-code":
        assert kwargs["mode"] == "train"
        # The replay started at epoch 2 (the last one served) and advanced only itself.
        assert batches is not splits.train and batches.augment and batches.epoch == 3
        expected = [x for x, _ in stages_module.replay_last_epoch(splits.train)]
        splits.train.epoch = 2
        assert all(torch.equal(a, b) for (a, _), b in zip(splits.train, expected, strict=True))
    else:
        assert batches is splits.train_eval and kwargs["mode"] == "eval"
