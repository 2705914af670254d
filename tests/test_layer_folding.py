"""Layer Folding baseline: slopes, the auxiliary loss, choosing sites, and a tiny CLI run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthcut.cli import main
from depthcut.methods.layer_folding import LayerFoldingConfig, SlopedActivation, choose_by_slope
from depthcut.run import load_checkpoint, read_records
from tests.helpers import write_fake_cifar10


def test_sloped_activation_interpolates_between_relu_and_identity():
    act = SlopedActivation(nn.ReLU(inplace=True))
    x = torch.tensor([-2.0, -0.5, 0.0, 1.5])
    assert torch.equal(act(x.clone()), torch.relu(x))
    with torch.no_grad():
        act.alpha.fill_(0.25)
    assert torch.allclose(act(x.clone()), torch.tensor([-0.5, -0.125, 0.0, 1.5]))
    with torch.no_grad():
        act.alpha.fill_(1.0)
    assert torch.equal(act(x.clone()), x)


def test_choose_by_slope_k_and_threshold():
    alphas = {"a": 0.2, "b": 0.95, "c": 1.1, "d": 0.95}
    assert choose_by_slope(alphas, 2, 0.9) == ["b", "d"]  # |1-a|: b .05, d .05 (order), c .1
    assert choose_by_slope(alphas, 3, 0.9) == ["b", "d", "c"]
    assert choose_by_slope(alphas, None, 0.9) == ["b", "c", "d"]
    assert choose_by_slope(alphas, 0, 0.9) == []
    with pytest.raises(ValueError, match="threshold"):
        LayerFoldingConfig(threshold=1.5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = write_fake_cifar10(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / "lf"
    assert main(["layer-folding", "--dataset", "cifar10", "--data-root", str(root), "--width",
                 "0.0625", "--epochs", "1", "--slope-epochs", "2", "--slope-lr", "0.05",
                 "--finetune-epochs", "1", "--k", "3", "--lam", "5", "--batch-size", "32",
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    return out


def test_layer_folding_run_linearizes_k_sites_by_slope(run, capsys):
    records = read_records(run)
    assert [r["stage"] for r in records] == [0, 1]
    record = records[1]
    alphas = record["alphas"]
    assert len(alphas) == 17 and min(alphas.values()) >= 0.0  # clipped at 0
    assert max(alphas.values()) > 0.0  # a heavy slope loss moves slopes off 0
    assert record["chosen"] == choose_by_slope(alphas, 3, 0.9)
    assert record["sites_linearized"] == 3 and record["epochs"] == 3
    model, info = load_checkpoint(run / "checkpoints" / "stage_01.pt")
    assert info["linearized"] == record["chosen"]
    for site in record["chosen"]:
        assert isinstance(model.get_submodule(site), nn.Identity)
    assert not any(isinstance(m, SlopedActivation) for m in model.modules())
    assert "LAYER_FOLDING" in (run / "summary.md").read_text()
