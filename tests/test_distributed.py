"""Two processes (torchrun, gloo on CPU) choose the same site from the same entropies as one;
with --choose dp rank 0 alone times and plans, and both ranks take its plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from depthcut.run import read_records
from tests.helpers import write_fake_cifar10

COMMON = ["--dataset", "cifar10", "--width", "0.0625", "--epochs", "1", "--finetune-epochs", "1",
          "--max-stages", "1", "--delta", "100", "--batch-size", "16", "--device", "cpu",
          "--no-progress"]
REPO = Path(__file__).resolve().parents[1]
DP = ["--choose", "dp", "--latency-budget", "0.5", "--latency-backend", "eager", "--dp-verify",
      "0", "--dp-span", "1"]

# Run by torchrun in place of `-m depthcut`: depthcut's CLI, with what each rank does to the
# latency table and what DpScorer answers it logged to OUT/rank<RANK>.jsonl.
RANK_LOGGER = """
import json, math, os, sys
from depthcut.cli import main
from depthcut.scorers import dp

log_path = os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.jsonl")

def log(*entry):
    with open(log_path, "a") as file:
        file.write(json.dumps(entry) + "\\n")

class LoggedTable(dp.LatencyTable):
    def __init__(self, *args, **kwargs):
        log("open")
        super().__init__(*args, **kwargs)

    def save(self):
        if self._dirty:
            log("save")
        super().save()

build, score = dp.build_segment_table, dp.DpScorer.score

def logged_build(*args, **kwargs):
    log("build")
    return build(*args, **kwargs)

def logged_score(self, candidates):
    answer = score(self, candidates)
    log("scores", {s: None if math.isnan(v) else v for s, v in answer.scores.items()},
        answer.record["dp"]["sites"], answer.nothing_chosen)
    return answer

dp.LatencyTable, dp.build_segment_table, dp.DpScorer.score = LoggedTable, logged_build, logged_score
sys.exit(main(sys.argv[2:]))
"""


def environment() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("DEPTHCUT_DIE_AT", None)
    return env


def depthcut(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ([] if processes == 1 else
                ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                 str(processes)])
    program = list(args) if args[0].endswith(".py") else ["-m", "depthcut", *args]
    launched = subprocess.run([sys.executable, *launcher, *program], env=environment(),
                              capture_output=True, text=True, timeout=300, cwd=REPO)
    if "gloo" in launched.stderr and "not available" in launched.stderr:
        pytest.skip("torch built without gloo")
    return launched


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny EASIER run in one process: the data root and the run (its dense checkpoint)."""
    base = tmp_path_factory.mktemp("single")
    root = write_fake_cifar10(base / "data")
    done = depthcut("easier", *COMMON, "--data-root", str(root), "--out", str(base / "run"))
    assert done.returncode == 0, done.stderr[-2000:]
    return root, base / "run"


def test_two_gloo_processes_match_one_process(tmp_path, single):
    root, run = single
    dense = run / "checkpoints" / "stage_00.pt"
    launched = depthcut("easier", *COMMON, "--data-root", str(root), "--dense-checkpoint",
                        str(dense), "--out", str(tmp_path / "ddp"), processes=2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = read_records(run), read_records(tmp_path / "ddp")
    assert two[0]["test_top1"] == one[0]["test_top1"]  # full test split on every rank
    assert two[0]["val_top1"] == one[0]["val_top1"]
    assert two[1]["entropy"] == one[1]["entropy"]  # counts summed over the two shards
    assert two[1]["chosen"] == one[1]["chosen"]
    assert len(two) == 2 and (tmp_path / "ddp" / "summary.md").is_file()


def test_choose_dp_plans_on_rank_0_and_both_ranks_take_its_plan(tmp_path, single):
    """Rank 0 alone opens, builds and writes the latency table; both ranks get the same scores;
    one process planning from the table it wrote (every segment a hit) plans the same."""
    root, run = single
    script = tmp_path / "ranked.py"
    script.write_text(RANK_LOGGER)
    table = tmp_path / "table.json"
    args = ["easier", *COMMON, *DP, "--data-root", str(root), "--dense-checkpoint",
            str(run / "checkpoints" / "stage_00.pt"), "--latency-table", str(table)]
    launched = depthcut(str(script), str(tmp_path), *args, "--out", str(tmp_path / "ddp"),
                        processes=2)
    assert launched.returncode == 0, launched.stderr[-3000:]
    logs = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()]
            for r in (0, 1)]
    assert [entry for entry in logs[0] if entry[0] != "build"][:1] == [["open"]]
    assert ["build"] in logs[0] and logs[0].count(["save"]) == 1
    assert [entry[0] for entry in logs[1]] == ["scores"]  # never opened the table
    assert logs[1] == [entry for entry in logs[0] if entry[0] == "scores"]
    (record,) = read_records(tmp_path / "ddp")[1:]
    assert record["dp"]["sites"] == logs[1][0][2] and record["dp"]["sites"]
    assert record["chosen"][0] in record["dp"]["sites"] and record["dp_cost"]["misses"] > 0
    alone = depthcut(*args, "--out", str(tmp_path / "alone"))
    assert alone.returncode == 0, alone.stderr[-2000:]
    (again,) = read_records(tmp_path / "alone")[1:]
    assert again["dp_cost"]["misses"] == 0 and again["entropy"] == record["entropy"]
    assert again["dp"]["sites"] == record["dp"]["sites"] and again["chosen"] == record["chosen"]


def test_a_dp_failure_on_rank_0_ends_every_rank(tmp_path, single):
    """An unreadable latency table: rank 0 raises, and rank 1 raises its message, not waits."""
    root, run = single
    (tmp_path / "table.json").write_text("not json")
    launched = depthcut("easier", *COMMON, *DP, "--data-root", str(root), "--dense-checkpoint",
                        str(run / "checkpoints" / "stage_00.pt"), "--latency-table",
                        str(tmp_path / "table.json"), "--out", str(tmp_path / "ddp"),
                        processes=2)
    assert launched.returncode != 0
    assert "failed on rank 0: ConfigError: latency table" in launched.stderr
    assert launched.stderr.count("is unreadable") >= 2  # rank 0's own error and rank 1's
