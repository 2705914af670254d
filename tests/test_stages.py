"""The one stage record and the one stage loop: records keep their JSON form, a new method is a
short class, and the dense-trained-longer reference resumes like every other method."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from depthcut.data import BatchLoader, DataSplits
from depthcut.methods import methods
from depthcut.run import read_records
from depthcut.sites import find_sites, linearize
from depthcut.stages import Method, StageRecord, StageRun, answer_stage, run_stages
from depthcut.train import TrainConfig
from tests.helpers import write_fake_cifar10

PRUNING_LINE = {
    "method": "egp", "stage": 1, "sites_total": 2, "sites_linearized": 1, "linearized": ["a"],
    "silenced": [], "scaled": [], "surrogates": [], "chosen": ["a"], "zero_entropy": {"a": "on"},
    "layer_collapse": [], "entropy": {"b": 0.5}, "entropy_before": {"a": 0.1, "b": 0.6},
    "pruned": {"a": 3}, "sparsity": 0.25, "sparsity_layers": {"conv": 0.25}, "val_top1": 50.0,
    "test_top1": 40.0, "drop": 1.0, "within_delta": True, "epochs": 1, "total_epochs": 3,
    "train_loss": 0.7, "seconds": 1.5, "prunable_layers": {"a": ["conv"]}, "parameters": 10,
    "elapsed_s": 9.0, "checkpoint": "checkpoints/stage_01.pt",
}
DENSE_LINE = {
    "method": "dense", "stage": 0, "sites_total": 2, "sites_linearized": 0, "linearized": [],
    "chosen": [], "entropy": {}, "val_top1": 51.0, "test_top1": 41.0, "drop": 0.0,
    "within_delta": True, "epochs": 2, "total_epochs": 2, "parameters": 10, "seconds": 3.0,
    "checkpoint": "checkpoints/stage_00.pt",
}


def test_record_round_trips_keys_and_their_order():
    methods()  # the registered methods place their record fields (EGP's here)
    for line in (PRUNING_LINE, DENSE_LINE):
        record = StageRecord.from_dict(line)
        assert list(record.to_dict().items()) == list(line.items())
        assert json.dumps(record.to_dict()) == json.dumps(line)
    record = StageRecord.from_dict(PRUNING_LINE)
    assert record["sparsity"] == 0.25 and record.val_top1 == 50.0
    assert dict(record) == PRUNING_LINE and "alphas" not in record
    dense = StageRecord.from_dict(DENSE_LINE)
    assert "train_loss" not in dense and dense.get("elapsed_s") is None  # unset: not written
    old = StageRecord.from_dict({"method": "dense", "stage": 0, "sites_total": 1})  # tolerant
    assert old.linearized == [] and old.within_delta
    new = StageRecord(method="new", stage=1, train_loss=None, extras={"score": 2})
    assert list(new.to_dict())[-2:] == ["seconds", "score"]  # a new extra follows `seconds`
    assert new.to_dict()["train_loss"] is None  # None is written (null), unlike unset


def test_answer_is_the_last_stage_within_the_rule():
    records = [StageRecord(method="m", stage=s, within_delta=s != 2) for s in range(3)]
    assert answer_stage(records) is records[1]


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act2(self.act1(self.conv(x))).mean((2, 3)))


class FirstSite(Method):
    """A whole method: linearize the first site left, stop when none is left."""

    name = "first"

    def __init__(self) -> None:
        self.finetune = TrainConfig(epochs=1)

    def stop_before(self, run: StageRun) -> str | None:
        return None if len(run.last.linearized) < run.dense.sites_total else "none left"

    def change(self, run: StageRun) -> dict:
        site = find_sites(run.model)[0]
        linearize(run.model, [site])
        linearized = [*run.last.linearized, site]
        return {"sites_linearized": len(linearized), "linearized": linearized, "chosen": [site]}


def test_a_new_method_plugs_into_the_loop_and_resumes():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    loader = BatchLoader(images, torch.randint(0, 10, (32,)), batch_size=16, mean=(0.5,) * 3,
                         std=(0.25,) * 3)
    splits = DataSplits(dataset=None, train=loader, train_eval=loader, val=None, test=loader,
                        train_indices=None, val_indices=None)
    dense = {"method": "dense", "stage": 0, "sites_total": 2, "linearized": [],
             "val_top1": None, "test_top1": 10.0, "total_epochs": 2}
    seen = []
    result = run_stages(FirstSite(), Plain(), splits, dense_record=dense, progress=False,
                        on_stage=lambda record, model: seen.append(record.stage))
    assert [r["linearized"] for r in result.records] == [[], ["act1"], ["act1", "act2"]]
    assert seen == [1, 2] and result.stop_reason == "none left"
    assert [r.total_epochs for r in result.records] == [2, 3, 4]
    assert result.answer is result.records[-1] and result.records[1].drop is None
    resumed = run_stages(FirstSite(), result.model, splits, dense_record=dense,
                         history=[r.to_dict() for r in result.records[1:]], progress=False)
    assert len(resumed.records) == 3 and resumed.stop_reason == "none left"


DENSE_LONGER = """
import sys
from depthcut.experiment import ExperimentConfig, resume_run, run_method
from depthcut.methods.dense_longer import DenseLongerConfig
from depthcut.train import TrainConfig
root, out = sys.argv[1], sys.argv[2]
if out.endswith("resume"):
    resume_run(out[:-len("resume")], progress=False)
else:
    config = ExperimentConfig(dataset="cifar10", data_root=root, width=0.0625, batch_size=32,
                              device="cpu", dense=TrainConfig(epochs=1), progress=False)
    run_method(config, "dense_longer",
               DenseLongerConfig(finetune=TrainConfig(epochs=1, lr=0.01), chunks=2), out)
"""


def test_dense_longer_killed_between_chunks_resumes_to_the_same_result(tmp_path: Path):
    root = write_fake_cifar10(tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DEPTHCUT_DIE_AT", None)

    def run(out: str, die_at: str | None = None) -> subprocess.CompletedProcess:
        extra = {"DEPTHCUT_DIE_AT": die_at} if die_at else {}
        return subprocess.run([sys.executable, "-c", DENSE_LONGER, str(root), out],
                              env={**env, **extra}, capture_output=True, text=True, timeout=300)

    assert run(str(tmp_path / "ref")).returncode == 0
    killed = run(str(tmp_path / "run"), die_at="stage-end:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run(str(tmp_path / "run") + "resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    timing = {"seconds", "elapsed_s"}
    ref, got = read_records(tmp_path / "ref"), read_records(tmp_path / "run")
    assert [r["stage"] for r in got] == [0, 1, 2] and got[1]["method"] == "dense_longer"
    assert [{k: v for k, v in r.items() if k not in timing} for r in got] == \
        [{k: v for k, v in r.items() if k not in timing} for r in ref]
    expected = torch.load(tmp_path / "ref" / "checkpoints" / "stage_02.pt", weights_only=True)
    actual = torch.load(tmp_path / "run" / "checkpoints" / "stage_02.pt", weights_only=True)
    for key, tensor in expected["state_dict"].items():
        assert torch.equal(actual["state_dict"][key], tensor), key
