"""A run killed with SIGKILL anywhere and resumed ends with the same records and weights."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from depthcut.run import read_records
from tests.helpers import run_depthcut as depthcut
from tests.helpers import write_fake_cifar10

TIMING = {"seconds", "elapsed_s"}




def run_args(root: Path, out: Path, method: str = "easier") -> list[str]:
    # 144 training images, batch 32: 4 steps per epoch; dense 2 epochs, 2 stages of 2 epochs.
    limits = {"easier": ["--max-stages", "2", "--delta", "100"],
              "nepenthe": ["--rounds", "2", "--theta", "0.01"],
              "layer-folding": ["--slope-epochs", "2", "--k", "3"]}[method]
    return [method, "--dataset", "cifar10", "--data-root", str(root), "--width", "0.0625",
            "--epochs", "2", "--finetune-epochs", "2", *limits,
            "--batch-size", "32", "--device", "cpu", "--out", str(out), "--no-progress"]


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: torch.load(p, weights_only=True)["state_dict"]
            for p in sorted((run / "checkpoints").glob("stage_*.pt"))}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_fake_cifar10(tmp_path_factory.mktemp("data"))


_references: dict[str, Path] = {}


def reference_run(root: Path, method: str, tmp_path_factory) -> Path:
    if method not in _references:
        out = tmp_path_factory.mktemp(f"ref-{method}") / "run"
        done = depthcut(*run_args(root, out, method))
        assert done.returncode == 0, done.stderr
        _references[method] = out
    return _references[method]


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    return data_root, reference_run(data_root, "easier", tmp_path_factory)


KILL_POINTS = [
    "train-step:6",  # dense training, second epoch
    "train-step:14",  # stage 1 finetune, second epoch
    "entropy-batch:2",  # counting states for stage 2
    "stage-end:1",  # between stage 1 and stage 2
    "write:stage_01.pt:1",  # half-way through writing stage 1's checkpoint
    "write:resume.pt:3",  # half-way through an epoch snapshot
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_killed_run_resumes_to_the_same_result(point, reference, tmp_path):
    root, ref = reference
    out = tmp_path / "run"
    killed = depthcut(*run_args(root, out), die_at=point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert not (out / "summary.md").exists()
    resumed = depthcut("easier", "--resume", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timing(read_records(out)) == without_timing(read_records(ref))
    got, expected = weights(out), weights(ref)
    assert got.keys() == expected.keys()
    for name in expected:
        for key, tensor in expected[name].items():
            assert torch.equal(got[name][key], tensor), (point, name, key)
    assert not (out / "resume.pt").exists()
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(("method", "point"), [
    ("nepenthe", "train-step:14"),  # round 1 retraining, second epoch (masks in the snapshot)
    ("nepenthe", "stage-end:1"),  # between rounds
    ("layer-folding", "train-step:20"),  # the finetune after the slopes
])
def test_other_methods_resume_to_the_same_result(method, point, data_root, tmp_path,
                                                 tmp_path_factory):
    ref = reference_run(data_root, method, tmp_path_factory)
    out = tmp_path / "run"
    killed = depthcut(*run_args(data_root, out, method), die_at=point)
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    resumed = depthcut(method, "--resume", str(out), "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timing(read_records(out)) == without_timing(read_records(ref))
    got, expected = weights(out), weights(ref)
    for name in expected:
        for key, tensor in expected[name].items():
            assert torch.equal(got[name][key], tensor), (method, point, name, key)


def test_resume_refuses_a_folder_without_a_run(tmp_path, capsys):
    from depthcut.cli import main

    assert main(["easier", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
