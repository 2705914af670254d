"""Every method on a user's own nn.Module, DataLoaders and training loop: the README's example
runs, a hand-written loop drives the stages, the run directory is the CLI's and resumes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import depthcut
from depthcut.errors import ConfigError
from depthcut.experiment import ExperimentConfig
from depthcut.run import CheckpointError, load_checkpoint, read_records
from tests.helpers import one_thread  # noqa: F401 - a fixture

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"


class OwnNet(nn.Module):
    """A user's model: a functional F.relu, an activation module used twice, a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.act = nn.ReLU()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = x + self.act(self.conv2(x))
        return self.head(self.act(self.conv3(x)).mean((2, 3)))


def data(n: int = 96):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 8, 8, generator=generator)
    y = (x[:, 0].mean((1, 2)) > 0).long()
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


QUICK = {"delta": 100.0, "finetune_epochs": 1, "max_stages": 2, "rounds": 1, "slope_epochs": 1,
         "progressive_epochs": 1}


def test_the_readme_example_runs(tmp_path, monkeypatch):
    text = README.read_text()
    block = re.search(r"<!-- own-model-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its own-model example"
    assert len(block.group(1).splitlines()) <= 25
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README example", "exec"), namespace)  # noqa: S102
    result = namespace["result"]
    assert result.folded["macs_folded"] <= result.folded["macs_unfolded"]
    assert (tmp_path / "runs" / "mynet" / "summary.md").is_file()
    records = read_records(tmp_path / "runs" / "mynet")
    assert records[0]["stage"] == 0 and len(records) >= 2


@pytest.mark.parametrize("method", ["easier", "nepenthe", "egp", "imp", "layer_folding",
                                    "progressive"])
def test_every_method_takes_the_same_arguments(method, tmp_path):
    train, val = data()
    model = OwnNet()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = getattr(depthcut, method)(model, train, val, settings=QUICK, out=tmp_path / "run",
                                       progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == method and config["own_model"]["class"].endswith("OwnNet")
    assert config["input_shape"] == [3, 8, 8]
    assert [r["stage"] for r in read_records(tmp_path / "run")][0] == 0
    assert (tmp_path / "run" / "folded_answer.json").is_file()
    assert result.answer_model is not None and result.folded_model is not None
    x = val.tensors[0][:4]
    answer = result.answer_model.eval()
    torch.testing.assert_close(result.folded_model(x), answer(x), rtol=1e-4, atol=1e-4)
    # The user's parameter names are kept: their state_dict loads into the answer's model
    # wherever the method left the structure alone (a pruned model holds weight_orig).
    if method in ("easier", "layer_folding", "progressive"):
        answer.load_state_dict(state)


def test_a_hand_written_training_loop_drives_the_stages(tmp_path):
    train, val = data()
    loader = DataLoader(train, batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    calls = {"finetune": [], "evaluate": 0}

    def finetune(model: nn.Module, epochs: int) -> None:
        assert model.training
        optimizer = torch.optim.Adam(model.parameters(), 1e-3)
        for _ in range(epochs):
            for inputs, targets in loader:
                optimizer.zero_grad()
                F.cross_entropy(model(inputs), targets).backward()
                optimizer.step()
        calls["finetune"].append(epochs)

    def evaluate(model: nn.Module) -> float:
        calls["evaluate"] += 1
        with torch.no_grad():
            inputs, targets = val.tensors
            return 100.0 * float((model(inputs).argmax(1) == targets).float().mean())

    result = depthcut.easier(OwnNet(), loader, finetune=finetune, evaluate=evaluate,
                             settings={"delta": 100.0, "finetune_epochs": 2, "max_stages": 2},
                             out=tmp_path / "run", progress=False)
    records = read_records(tmp_path / "run")
    assert calls["finetune"] == [2, 2]  # one call per stage, with the stage's epochs
    assert calls["evaluate"] == len(records) == 3
    assert [r["sites_linearized"] for r in records] == [0, 1, 2]
    for record in records:  # the stop rule compared the user's score
        assert record["test_top1"] is None and record["val_top1"] is not None
        assert record["drop"] == pytest.approx(records[0]["val_top1"] - record["val_top1"])
    assert result.answer["stage"] == 2


def test_a_run_resumes_with_the_same_model(tmp_path):
    train, val = data()
    model = OwnNet()
    first = depthcut.easier(model, train, val, settings={**QUICK, "max_stages": 1},
                            out=tmp_path / "run", progress=False)
    assert len(first.records) == 2
    second = depthcut.easier(model, train, val, settings={**QUICK, "max_stages": 2},
                             out=tmp_path / "run", resume=True, progress=False)
    records = read_records(tmp_path / "run")
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert records[1]["linearized"] == first.records[1]["linearized"]
    assert second.answer["stage"] == 2
    with pytest.raises(CheckpointError, match="template="):
        load_checkpoint(tmp_path / "run" / "checkpoints" / "stage_01.pt")
    rebuilt, _ = load_checkpoint(tmp_path / "run" / "checkpoints" / "stage_01.pt",
                                 template=depthcut.api.one_module_per_site(model))
    assert len(depthcut.find_sites(rebuilt)) == len(depthcut.find_sites(
        depthcut.api.one_module_per_site(model))) - 1


def test_bad_arguments_are_explained():
    train, val = data()
    with pytest.raises(ConfigError, match="pass val="):
        depthcut.easier(OwnNet(), train, progress=False)
    with pytest.raises(ConfigError, match="nn.Module"):
        depthcut.easier("resnet18", train, val, progress=False)
    with pytest.raises(ConfigError, match="Dataset, a DataLoader"):
        depthcut.easier(OwnNet(), 3, val, progress=False)
    with pytest.raises(AttributeError):
        depthcut.no_such_method  # noqa: B018
    with pytest.raises(ConfigError, match="depthcut.easier"):
        ExperimentConfig(model=OwnNet())
