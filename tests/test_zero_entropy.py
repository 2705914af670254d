"""Zero-entropy sites of every rectifier kind are replaced by the linear map they compute, folded,
and counted as removed; the pruning grouping of a run survives resume; both re-allocation rules.
"""

from __future__ import annotations

import signal

import pytest
import torch
from torch import nn

from depthcut.data import BatchLoader, DataSplits
from depthcut.fold import fold
from depthcut.layers import ChannelScale, Zero
from depthcut.methods.rounds import PruningConfig, pruning_rounds
from depthcut.models import ModelSpec
from depthcut.pruning import prunable_layers, pruning_budget
from depthcut.run import load_checkpoint, read_records, save_checkpoint
from depthcut.sites import freeze, linearize
from depthcut.train import TrainConfig
from tests.helpers import one_thread, write_fake_cifar10  # noqa: F401 (fixture)
from tests.helpers import run_depthcut as depthcut

KINDS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "prelu": lambda: nn.PReLU(4, init=0.2), "gelu": nn.GELU, "silu": nn.SiLU,
}
LEAKY = ("leaky_relu", "prelu")
SURROGATE = ("gelu", "silu")


class TwoSites(nn.Module):
    """`branch` sits in a residual branch and is driven always OFF; `mixed` gets a fixed sign per
    channel (+, -, +, -) from its bias, so on the data it is a per-channel linear map."""

    def __init__(self, act) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv_a, self.branch, self.conv_b = nn.Conv2d(4, 4, 3, padding=1), act(), \
            nn.Conv2d(4, 4, 1)
        self.conv_m, self.mixed = nn.Conv2d(4, 4, 1), act()
        self.fc = nn.Linear(4, 10)
        with torch.no_grad():
            for conv in (self.conv_a, self.conv_m):
                conv.weight.mul_(0.01)
            self.conv_a.bias.fill_(-5.0)
            self.conv_m.bias.copy_(torch.tensor([5.0, -5.0, 5.0, -5.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.conv_b(self.branch(self.conv_a(h)))
        return self.fc(self.mixed(self.conv_m(h)).mean((2, 3)))


def tiny_splits() -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (32,), generator=generator)
    loader = BatchLoader(images, labels, batch_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    return DataSplits(dataset=None, train=loader, train_eval=loader, val=loader, test=loader,
                      train_indices=None, val_indices=None)


def outputs(model: nn.Module, splits: DataSplits) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(x) for x, _ in splits.test])


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.usefixtures("one_thread")
def test_round_loop_replaces_zero_entropy_sites_of_every_kind(kind):
    torch.manual_seed(0)
    splits = tiny_splits()
    model = TwoSites(KINDS[kind])
    before = outputs(model, splits)
    dense = {"method": "dense", "stage": 0, "sites_total": 2, "linearized": [],
             "val_top1": 10.0, "test_top1": 10.0, "total_epochs": 0, "within_delta": True}
    config = PruningConfig(rounds=1, finetune=TrainConfig(epochs=0), delta=100)
    result = pruning_rounds(model, splits, config, method="test", rule="delta",
                            prune_step=lambda model, counts: {}, dense_record=dense,
                            progress=False)
    record = result.records[-1]
    assert record["zero_entropy"] == {"branch": "off", "mixed": "mixed"}
    assert record["sites_linearized"] == 2 and record["layer_collapse"] == []
    if kind in LEAKY:  # OFF is the negative slope, not zero
        assert record["silenced"] == [] and record["scaled"] == ["branch", "mixed"]
        assert isinstance(model.branch, ChannelScale)
        torch.testing.assert_close(model.branch.scale, torch.full((4,), 0.1 if kind ==
                                   "leaky_relu" else 0.2))
    else:
        assert record["silenced"] == ["branch"] and record["scaled"] == ["mixed"]
        assert isinstance(model.branch, Zero)
    expected_mask = [1.0, 0.0, 1.0, 0.0] if kind not in LEAKY else [
        1.0, model.mixed.scale[1].item(), 1.0, model.mixed.scale[1].item()]
    torch.testing.assert_close(model.mixed.scale, torch.tensor(expected_mask))
    assert record["surrogates"] == (["branch", "mixed"] if kind in SURROGATE else [])
    after = outputs(model, splits)
    if kind in SURROGATE:  # identity/zero for SiLU(+-5) = 4.97/-0.03: close, not exact
        torch.testing.assert_close(after, before, rtol=0, atol=0.1)
        assert not torch.equal(after, before)
    else:  # on the measured data the replacement is exactly what the site computed
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    folded = fold(model, next(iter(splits.test))[0])
    assert not any(isinstance(m, ChannelScale) for m in folded.modules()), "scale not merged"
    assert folded.fold_report.exact
    torch.testing.assert_close(outputs(folded, splits), after, rtol=1e-4, atol=1e-5)


def test_freeze_forms_and_checkpoint_round_trip(tmp_path):
    spec = ModelSpec(name="resnet18", num_classes=10, in_channels=3, width=0.0625,
                     activation="leaky_relu")
    model = spec.build().eval()
    forms = freeze(model, {"layer1.0.act1": torch.tensor([True, False, True, True]),
                           "layer1.1.act1": torch.ones(4, dtype=torch.bool)})
    assert forms == {"layer1.0.act1": "scale", "layer1.1.act1": "on"}
    assert isinstance(model.layer1[1].act1, nn.Identity)
    save_checkpoint(tmp_path / "c.pt", model, spec, ["layer1.1.act1"])
    loaded, _ = load_checkpoint(tmp_path / "c.pt")
    assert isinstance(loaded.layer1[0].act1, ChannelScale)
    torch.testing.assert_close(loaded.layer1[0].act1.scale, torch.tensor([1.0, 0.01, 1, 1]))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))


def test_grouping_walls_at_removed_sites():
    model = ModelSpec(name="resnet18", num_classes=10, in_channels=3, width=0.0625,
                      activation="relu").build()
    linearize(model, ["layer1.0.act2"])
    naive = prunable_layers(model)
    walled = prunable_layers(model, removed=["layer1.0.act2"])
    assert naive["layer1.1.act2"] == ["layer1.0.conv2", "layer1.1.conv2"]
    assert walled["layer1.1.act2"] == ["layer1.1.conv2"]


def test_reallocation_rules_by_hand():
    """B = 150; I = 1.4/H = (7, 3.5, 1.75); softmax gives layer 0 144.9 > 100: capped.
    fixed: 50 over exp(3.5), exp(1.75) = 42.6, 7.4 -> 43, 7 (largest remainder).
    recompute: I over {1, 2} = 1.2/H = (3, 1.5): 40.9, 9.1 -> 41, 9."""
    args = ([0.2, 0.4, 0.8], [1.0, 1.0, 1.0], [100, 100, 100], 0.5, 1.0)
    assert pruning_budget(*args) == [100, 43, 7]
    assert pruning_budget(*args, reallocate="fixed") == [100, 43, 7]
    assert pruning_budget(*args, reallocate="recompute") == [100, 41, 9]
    with pytest.raises(ValueError, match="reallocate"):
        pruning_budget(*args, reallocate="sometimes")
    with pytest.raises(ValueError, match="reallocate"):
        PruningConfig(reallocate="sometimes")




def test_resume_after_an_act2_was_removed_is_bit_identical(tmp_path):
    """layer1.0.act2 is made always ON (its BN adds +50), so round 1 linearizes it. Resumed
    after round 1, the run must prune round 2 by the grouping of the start, where
    layer1.0.conv2 belongs to the removed act2, not to layer1.1.act2."""
    root = write_fake_cifar10(tmp_path / "data")
    spec = ModelSpec(name="resnet18", num_classes=10, in_channels=3, width=0.0625,
                     activation="relu")
    torch.manual_seed(0)
    model = spec.build()
    with torch.no_grad():
        model.layer1[0].bn2.weight.fill_(0.01)
        model.layer1[0].bn2.bias.fill_(50.0)
    dense = tmp_path / "dense.pt"
    save_checkpoint(dense, model.eval(), spec, [], {"dataset": "cifar10",
                                                      "data_root": str(root)})
    args = ["egp", "--dataset", "cifar10", "--data-root", str(root), "--width", "0.0625",
            "--dense-checkpoint", str(dense), "--finetune-epochs", "1", "--finetune-lr",
            "0.001", "--rounds", "2", "--delta", "100", "--batch-size", "32", "--device",
            "cpu", "--no-progress"]
    reference = depthcut(*args, "--out", str(tmp_path / "ref"))
    assert reference.returncode == 0, reference.stderr[-2000:]
    killed = depthcut(*args, "--out", str(tmp_path / "run"), die_at="stage-end:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = depthcut("egp", "--resume", str(tmp_path / "run"), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref, run = read_records(tmp_path / "ref"), read_records(tmp_path / "run")
    assert "layer1.0.act2" in ref[1]["linearized"]
    assert ref[1]["prunable_layers"]["layer1.1.act2"] == ["layer1.1.conv2"]
    timing = {"seconds", "elapsed_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in run] == \
        [{k: v for k, v in r.items() if k not in timing} for r in ref]
    for stage in (1, 2):
        name = f"checkpoints/stage_{stage:02d}.pt"
        got = torch.load(tmp_path / "run" / name, weights_only=True)["state_dict"]
        expected = torch.load(tmp_path / "ref" / name, weights_only=True)["state_dict"]
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), (stage, key)


def test_collapse_check_accepts_sites_an_earlier_round_silenced():
    """Rounds pass every silenced site so far; those are Zero modules already, not rectifiers."""
    from depthcut.pruning import causes_layer_collapse
    from depthcut.sites import silence

    model = ModelSpec(name="resnet18", num_classes=10, in_channels=3, width=0.0625,
                      activation="relu").build().eval()
    silence(model, ["layer1.0.act1"])
    x = torch.randn(1, 3, 32, 32)
    assert causes_layer_collapse(model, ["layer1.0.act1", "layer1.1.act1"], x) is False
    assert causes_layer_collapse(model, ["layer1.0.act1", "act"], x) is True
    assert isinstance(model.layer1[1].act1, nn.ReLU)  # worked on a copy
