"""Two processes (torchrun, gloo on CPU) choose the same site from the same entropies as one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from depthcut.run import read_records
from tests.helpers import write_fake_cifar10


def test_two_gloo_processes_match_one_process(tmp_path):
    root = write_fake_cifar10(tmp_path / "data")
    common = ["--dataset", "cifar10", "--data-root", str(root), "--width", "0.0625",
              "--epochs", "1", "--finetune-epochs", "1", "--max-stages", "1", "--delta", "100",
              "--batch-size", "16", "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DEPTHCUT_DIE_AT", None)
    single = subprocess.run([sys.executable, "-m", "depthcut", "easier", *common, "--out",
                             str(tmp_path / "single")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    dense = tmp_path / "single" / "checkpoints" / "stage_00.pt"
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "depthcut", "easier", *common, "--dense-checkpoint", str(dense), "--out",
         str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=300)
    if "gloo" in launched.stderr and "not available" in launched.stderr:
        pytest.skip("torch built without gloo")
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = read_records(tmp_path / "single"), read_records(tmp_path / "ddp")
    assert two[0]["test_top1"] == one[0]["test_top1"]  # full test split on every rank
    assert two[0]["val_top1"] == one[0]["val_top1"]
    assert two[1]["entropy"] == one[1]["entropy"]  # counts summed over the two shards
    assert two[1]["chosen"] == one[1]["chosen"]
    assert len(two) == 2 and (tmp_path / "ddp" / "summary.md").is_file()
