"""NEPENTHE, EGP and IMP end to end on a tiny CIFAR-10-format dataset, and their round loop."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from depthcut.cli import main
from depthcut.masks import is_pruned, nonzero_count
from depthcut.methods.rounds import PruningConfig
from depthcut.run import load_checkpoint, read_records
from tests.helpers import write_fake_cifar10


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("data"))


def run_method(name: str, root, out, *extra: str) -> int:
    return main([name, "--dataset", "cifar10", "--data-root", str(root), "--width", "0.0625",
                 "--epochs", "1", "--finetune-epochs", "1", "--rounds", "2", "--batch-size",
                 "32", "--device", "cpu", "--out", str(out), "--no-progress", *extra])


@pytest.mark.parametrize("method", ["nepenthe", "egp", "imp"])
def test_pruning_run_writes_rounds_with_sparsity_and_masks(method, data_root, tmp_path, capsys):
    rule = ["--theta", "0.01"] if method == "nepenthe" else ["--delta", "100"]
    assert run_method(method, data_root, tmp_path / method, *rule) == 0
    records = read_records(tmp_path / method)
    assert [r["stage"] for r in records] == [0, 1, 2]
    sparsities = [r.get("sparsity", 0.0) for r in records]
    assert sparsities[0] == 0.0 and 0.3 < sparsities[1] < sparsities[2] < 1.0
    for record in records[1:]:
        assert record["method"] == method
        for key in ("entropy", "entropy_before", "zero_entropy", "sparsity_layers", "pruned",
                    "val_top1", "test_top1", "linearized", "silenced", "layer_collapse"):
            assert key in record
        assert set(record["entropy"]) | set(record["chosen"]) == set(record["entropy_before"])
    if method == "imp":
        assert list(records[1]["pruned"]) == ["all conv/linear"]
    else:
        assert set(records[1]["pruned"]) <= set(records[1]["entropy_before"])
    model, info = load_checkpoint(tmp_path / method / "checkpoints" / "stage_02.pt")
    pruned = [m for m in model.modules() if is_pruned(m)]
    assert pruned, "masks must survive the checkpoint"
    zeros = sum(m.weight_orig.numel() - nonzero_count(m) for m in pruned)
    assert zeros > 0
    summary = (tmp_path / method / "summary.md").read_text()
    assert "sparsity" in summary and "Answer: stage" in summary
    folded = json.loads((tmp_path / method / "folded_answer.json").read_text())
    assert folded["top1_folded"] == pytest.approx(folded["top1_unfolded"], abs=1e-9)
    out = capsys.readouterr().out
    assert "Answer: round" in out


def test_pruning_options_are_validated(data_root, tmp_path, capsys):
    assert run_method("nepenthe", data_root, tmp_path / "a", "--theta", "1.5") == 2
    assert "theta" in capsys.readouterr().err
    assert run_method("egp", data_root, tmp_path / "b", "--zeta", "0") == 2
    assert "zeta" in capsys.readouterr().err
    with pytest.raises(ValueError, match="temperature"):
        PruningConfig(temperature=0)


class Plain(nn.Module):
    """No skips: silencing its only site would cut the network."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean((2, 3)))


def test_always_off_site_without_skip_stops_the_run_as_layer_collapse():
    from depthcut.data import BatchLoader, DataSplits
    from depthcut.methods.rounds import pruning_rounds
    from depthcut.train import TrainConfig

    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,))
    loader = BatchLoader(images, labels, batch_size=16, mean=(0.5,) * 3, std=(0.25,) * 3)
    splits = DataSplits(dataset=None, train=loader, train_eval=loader, val=loader, test=loader,
                        train_indices=None, val_indices=None)
    model = Plain()

    def kill_everything(model: nn.Module, counts) -> dict[str, int]:
        # A step that drives every pre-activation negative: the site becomes always OFF.
        with torch.no_grad():
            model.conv.weight.zero_()
            model.conv.bias.fill_(-1.0)
        return {"act": 0}

    dense = {"method": "dense", "stage": 0, "sites_total": 1, "linearized": [], "val_top1": 10.0,
             "test_top1": 10.0, "total_epochs": 0, "within_delta": True}
    config = PruningConfig(rounds=2, finetune=TrainConfig(epochs=0), delta=100)
    result = pruning_rounds(model, splits, config, method="test", prune_step=kill_everything,
                            rule="delta", dense_record=dense, progress=False)
    last = result.records[-1]
    assert last["zero_entropy"] == {"act": "off"}
    assert last["layer_collapse"] == ["act"] and last["silenced"] == []
    assert "layer collapse" in result.stop_reason and not last["within_delta"]
    assert isinstance(model.act, nn.ReLU), "the collapsing site must not be silenced"
    assert result.answer["stage"] == 0
