"""Runs that cannot be lost: one run per folder, runs that cannot fit refused before they
allocate, data paths that survive a change of folder, resume that checks what it resumes, and
one-line reasons for files and folders that cannot be used."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from depthcut.cli import main
from depthcut.memory_estimate import (
    InsufficientMemoryError,
    check_fits,
    estimate_training_memory,
    meta_model,
)
from depthcut.models import ModelSpec
from depthcut.run_lock import LockHolder, RunLock, RunLockError, process_start_ticks
from tests.helpers import easier_args, run_depthcut, tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A fake CIFAR-10, a finished tiny EASIER run, and odd files."""
    return tiny_world(tmp_path_factory.mktemp("safety"))


easier = easier_args


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


def write_lock(folder: Path, holder: LockHolder) -> Path:
    path = folder / ".lock"
    path.write_text(json.dumps(holder.__dict__))
    return path


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("depthcut "), err
    assert err.strip().count("\n") == 0, err
    assert "Traceback" not in err and "\x1b" not in err, err
    return err


# 1. A lock per run directory.

@pytest.mark.parametrize("how", [["--overwrite"], ["--resume"]])
def test_a_run_directory_a_live_run_holds_is_refused(how, world, capsys):
    run = world["run"]
    holder = LockHolder.this_process()  # the test itself: alive
    lock = write_lock(run, holder)
    try:
        before = snapshot(world["base"])
        args = (easier(world, "--overwrite", out="run") if how == ["--overwrite"]
                else ["easier", "--resume", str(run), "--no-progress"])
        assert main(args) == 2
        err = one_line_error(capsys)
        assert "in use by another depthcut run" in err
        assert f"pid {os.getpid()} on {socket.gethostname()}, started {holder.started}" in err
        assert snapshot(world["base"]) == before
    finally:
        lock.unlink()


def test_a_second_process_is_refused_while_a_run_writes(world, tmp_path):
    out = tmp_path / "busy"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DEPTHCUT_DIE_AT", None)
    first = subprocess.Popen([sys.executable, "-m", "depthcut", *easier(world, out=str(out))],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").exists():
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first run never started writing"
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # alive, holding the lock, for as long as we need
        second = run_depthcut(*easier(world, "--overwrite", out=str(out)))
        assert second.returncode == 2, second.stderr
        assert f"in use by another depthcut run (pid {first.pid} on" in second.stderr
        assert (out / "config.json").exists()
    finally:
        first.kill()  # SIGKILL: its lock stays behind, stale
        first.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == first.pid
    third = run_depthcut(*easier(world, "--overwrite", out=str(out)))
    assert third.returncode == 0, third.stderr
    warning = [line for line in third.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and f"pid {first.pid}" in warning[0], third.stderr
    assert "no longer running" in warning[0]
    assert not (out / ".lock").exists()
    assert (out / "summary.md").exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, LockHolder(pid, socket.gethostname(), "2020-01-01T00:00:00"))
    lock = RunLock(tmp_path)
    lock.check_free()  # stale: not busy
    with pytest.warns(RuntimeWarning, match=f"pid {pid} .*no longer running"):
        lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock.path.exists()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    """The pid is alive (this process), but it started at another time: another process."""
    ticks = process_start_ticks(os.getpid())
    if ticks is None:
        pytest.skip("no /proc here")
    write_lock(tmp_path, LockHolder(os.getpid(), socket.gethostname(), "then", ticks + 1))
    with pytest.warns(RuntimeWarning, match="no longer running"), RunLock(tmp_path):
        pass


def test_a_lock_of_another_host_is_refused_and_explained(tmp_path):
    write_lock(tmp_path, LockHolder(1, "elsewhere.example", "2020-01-01T00:00:00"))
    with pytest.raises(RunLockError, match="on elsewhere.example.*another host.*delete"):
        RunLock(tmp_path).acquire()


@pytest.mark.parametrize("raised", [KeyboardInterrupt, RuntimeError])
def test_the_lock_is_released_when_a_run_fails_or_is_interrupted(raised, world, monkeypatch,
                                                                 capsys):
    import depthcut.experiment as experiment

    def fail(*args, **kwargs):
        assert (world["base"] / "broken" / ".lock").exists()  # held while the run writes
        raise raised("stop here")

    monkeypatch.setattr(experiment, "dense_model", fail)
    assert main(easier(world, out="broken")) == (130 if raised is KeyboardInterrupt else 1)
    assert not (world["base"] / "broken" / ".lock").exists()
    capsys.readouterr()


# 2. A run that cannot fit in memory is refused before it allocates.

def test_a_model_that_cannot_fit_is_refused_before_the_data_is_decoded(world, capsys):
    nowhere = world["base"] / "nowhere"  # no dataset: a refusal must come before it is read
    start = time.perf_counter()
    assert main(["easier", "--dataset", "cifar10", "--data-root", str(nowhere), "--width", "100",
                 "--device", "cpu", "--out", str(world["base"] / "huge"), "--no-progress"]) == 2
    seconds = time.perf_counter() - start
    err = one_line_error(capsys)
    assert "resnet18 x100 needs at least" in err and " TB" in err and "lower --width" in err
    assert "available on cpu" in err
    assert seconds < 20, seconds
    assert not (world["base"] / "huge").exists()


def test_the_estimate_counts_weights_and_activations_on_the_meta_device():
    spec = ModelSpec("resnet18", num_classes=10, width=0.0625)
    model = meta_model(spec)
    assert next(model.parameters()).device.type == "meta"
    estimate = estimate_training_memory(model, (3, 32, 32), 32)
    real = spec.build()
    assert estimate.parameters == sum(p.numel() for p in real.parameters())
    assert estimate.weights_bytes == 4 * 4 * estimate.parameters
    assert 0 < estimate.activations_bytes < 100e6
    check_fits(estimate, torch.device("cpu"), "resnet18 x0.0625")  # a small run fits
    huge = estimate_training_memory(meta_model(ModelSpec("resnet18", width=1000)), None, 1)
    assert huge.total_bytes > 1e14  # hundreds of terabytes, counted without allocating them


def test_a_batch_too_large_names_the_batch_size(monkeypatch):
    import depthcut.memory_estimate as memory

    estimate = estimate_training_memory(meta_model(ModelSpec("resnet18", width=0.0625)),
                                        (3, 32, 32), 4096)
    monkeypatch.setattr(memory, "available_memory",
                        lambda device: (estimate.weights_bytes * 2, "a test"))
    with pytest.raises(InsufficientMemoryError, match="lower --batch-size"):
        check_fits(estimate, torch.device("cpu"), "resnet18 x0.0625")
    monkeypatch.setenv(memory.SKIP_VARIABLE, "1")
    check_fits(estimate, torch.device("cpu"), "resnet18 x0.0625")


# 3. The absolute data root is recorded; resume honours --data-root.

def test_runs_record_absolute_paths_and_work_from_another_folder(world, monkeypatch, capsys):
    monkeypatch.chdir(world["base"])
    assert main(easier(world, data="data", out="relative")) == 0
    run = world["base"] / "relative"
    config = json.loads((run / "config.json").read_text())
    assert config["experiment"]["data_root"] == str(world["root"])
    origin = torch.load(run / "checkpoints" / "stage_01.pt", weights_only=True)["extra"]
    assert origin["data_root"] == str(world["root"])
    elsewhere = world["base"] / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    checkpoint = str(run / "checkpoints" / "stage_01.pt")
    assert main(["entropy", "--checkpoint", checkpoint, "--samples", "16", "--no-progress"]) == 0
    assert main(["fold", "--checkpoint", checkpoint, "--out", "folded.pt", "--samples", "16",
                 "--no-progress"]) == 0
    assert (elsewhere / "folded.pt").exists()
    capsys.readouterr()


def test_resume_names_a_moved_data_root_and_honours_data_root(world, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(world["root"], data)
    out = tmp_path / "run"
    args = easier(world, data=data, out=str(out))
    args[args.index("--max-stages") + 1] = "2"
    killed = run_depthcut(*args, die_at="stage-end:1")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    moved = data.rename(tmp_path / "moved")
    assert main(["easier", "--resume", str(out), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert str(data) in err and "--data-root" in err
    # The data root given wins; every other setting still comes from config.json.
    assert main(["easier", "--resume", str(out), "--data-root", str(moved), "--width", "0.5",
                 "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "ignoring --width" in err
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"]["data_root"] == str(moved)
    assert config["experiment"]["width"] == 0.0625
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in records] == [0, 1, 2]
    assert not (out / ".lock").exists()


# 4. --resume refuses another method's run.

def test_resume_refuses_a_run_of_another_method(world, capsys):
    run = world["run"]
    before = snapshot(world["base"])
    assert main(["nepenthe", "--resume", str(run), "--no-progress"]) == 2
    err = one_line_error(capsys)
    assert (f"{run} holds an easier run; resume it with `depthcut easier --resume {run}`"
            in err)
    assert snapshot(world["base"]) == before


def test_resume_names_the_command_of_a_method(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"method": "layer_folding",
                                                      "experiment": {}}))
    assert main(["easier", "--resume", str(tmp_path), "--no-progress"]) == 2
    assert (f"holds a layer-folding run; resume it with `depthcut layer-folding --resume "
            f"{tmp_path}`") in one_line_error(capsys)


# 5. Unreadable checkpoints and unwritable outputs: one line each.

@pytest.fixture(scope="module")
def bad_files(world):
    base = world["base"] / "bad-files"
    base.mkdir()
    (base / "random.pt").write_bytes(os.urandom(4096))
    whole = (world["run"] / "checkpoints" / "stage_00.pt").read_bytes()
    (base / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    torch.save(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), base / "module.pt")
    return base


FILES = {
    "random.pt": "not a zip or pickle file (4096 bytes",
    "truncated.pt": "truncated (",
    "module.pt": "it holds a pickled Python object (torch.nn.modules.container.Sequential",
}
COMMANDS = {
    "dense checkpoint": lambda w, f: easier(w, "--dense-checkpoint", str(f)),
    "entropy": lambda w, f: ["entropy", "--checkpoint", str(f), "--no-progress"],
    "fold": lambda w, f: ["fold", "--checkpoint", str(f), "--out",
                          str(w["base"] / "out" / "folded.pt"), "--no-progress"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("name", sorted(FILES))
def test_an_unreadable_checkpoint_is_explained_in_one_line(name, command, world, bad_files,
                                                           capsys):
    before = snapshot(world["base"])
    assert main(COMMANDS[command](world, bad_files / name)) == 2
    err = one_line_error(capsys)
    assert f"{bad_files / name} is not a readable checkpoint: {FILES[name]}" in err
    if name == "module.pt":
        assert "save_checkpoint(PATH, model, ModelSpec(" in err
    assert snapshot(world["base"]) == before


@pytest.mark.parametrize("command", ["easier", "fold"])
def test_an_output_under_a_file_is_refused_before_the_data_is_read(command, world, capsys):
    under_a_file = world["base"] / "afile" / "sub" / "run"
    args = (easier(world, data=world["base"] / "nowhere", out=str(under_a_file))
            if command == "easier"
            else ["fold", "--checkpoint", str(world["run"] / "checkpoints" / "stage_01.pt"),
                  "--out", str(under_a_file), "--data-root", str(world["base"] / "nowhere"),
                  "--no-progress"])
    assert main(args) == 2
    err = one_line_error(capsys)
    assert f"{world['base'] / 'afile'} is a file, not a folder" in err


def test_an_output_in_a_read_only_folder_is_refused(world, tmp_path, capsys, monkeypatch):
    if os.geteuid() == 0:  # root writes into read-only folders: let os.access say it cannot
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    tmp_path.chmod(0o555)
    try:
        assert main(easier(world, out=str(tmp_path / "run"))) == 2
    finally:
        tmp_path.chmod(0o755)
    assert "no write permission in" in one_line_error(capsys)


def test_on_a_gpu_the_free_memory_of_the_device_counts(monkeypatch):
    import depthcut.memory_estimate as memory

    monkeypatch.setattr(memory.torch.cuda, "mem_get_info", lambda device: (10**9, 8 * 10**10))
    assert memory.available_memory(torch.device("cuda:0")) == (10**9, "free memory of cuda:0")
    estimate = estimate_training_memory(meta_model(ModelSpec("resnet18", width=4.0)), None, 1)
    with pytest.raises(InsufficientMemoryError, match="only 1.0 GB is available on cuda:0"):
        check_fits(estimate, torch.device("cuda:0"), "resnet18 x4")
