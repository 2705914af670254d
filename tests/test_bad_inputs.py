"""Bad input meets a clear one-paragraph error, a non-zero exit, and no half-written output."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from depthcut.cli import main
from tests.helpers import easier_args, tiny_world, write_fake_cifar10


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A fake CIFAR-10, a finished tiny run (for its checkpoints), and odd files."""
    base = tmp_path_factory.mktemp("bad")
    world = tiny_world(base)
    broken = write_fake_cifar10(base / "broken")
    (broken / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04garbage")
    (base / "garbage.pt").write_bytes(b"\x00" * 100)
    (base / "unknown-model.json").write_text(json.dumps({"model": "resnet999"}))
    (base / "unknown-act.json").write_text(json.dumps({"activation": "tanh"}))
    return {**world, "broken": broken}


easier = easier_args


def nepenthe(world, *extra):
    args = easier(world, *extra)
    at = args.index("--max-stages")
    return ["nepenthe", *args[1:at], "--rounds", "1", *args[at + 2:]]


CASES = {
    "missing dataset": (lambda w: easier(w, data=w["base"] / "nowhere"), "dataset not found"),
    "malformed dataset": (lambda w: easier(w, data=w["broken"]), "test_batch"),
    "data root is a file": (lambda w: easier(w, data=w["base"] / "afile"), "is a file"),
    "unknown model": (lambda w: easier(w, "--config", str(w["base"] / "unknown-model.json")),
                      "unknown model 'resnet999'"),
    "unknown activation": (lambda w: easier(w, "--config", str(w["base"] / "unknown-act.json")),
                           "unknown activation 'tanh'"),
    "negative delta": (lambda w: easier(w, "--delta", "-1"), "delta must be"),
    "zeta out of range": (lambda w: nepenthe(w, "--zeta", "1.5"), "zeta"),
    "theta out of range": (lambda w: nepenthe(w, "--theta", "0"), "theta"),
    "k larger than sites": (lambda w: easier(w, "--k", "40"), "only 17 sites"),
    "corrupted checkpoint": (
        lambda w: easier(w, "--dense-checkpoint", str(w["base"] / "garbage.pt")),
        "not a readable checkpoint"),
    "checkpoint of another model": (
        lambda w: easier(w, "--dense-checkpoint",
                         str(w["run"] / "checkpoints" / "stage_00.pt"), "--width", "0.125"),
        "does not match"),
    "run directory holds another run": (lambda w: easier(w, out="run"), "already holds a run"),
    "out is a file": (lambda w: easier(w, out="afile"), "not a directory"),
    "unknown device": (lambda w: easier(w, "--device", "tpu"), "unknown device 'tpu'"),
    "validation fraction": (lambda w: easier(w, "--val-fraction", "1.5"), "val_fraction"),
    "non-positive width": (lambda w: easier(w, "--width", "0"), "width multiplier"),
    "fold of a missing checkpoint": (
        lambda w: ["fold", "--checkpoint", str(w["base"] / "none.pt"), "--out",
                   str(w["base"] / "out" / "f.pt")], "does not exist"),
    "heal of a stage checkpoint": (
        lambda w: ["heal", "--folded", str(w["run"] / "checkpoints" / "stage_01.pt"), "--out",
                   str(w["base"] / "out" / "h.pt")], "not a folded depthcut model"),
}


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_a_clear_error_and_writes_nothing(case, world, capsys):
    make_args, message = CASES[case]
    before = snapshot(world["base"])
    assert main(make_args(world)) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err
    assert err.startswith("depthcut ")
    after = snapshot(world["base"])
    assert after == before, f"files changed: {set(after.items()) ^ set(before.items())}"


def test_nan_loss_stops_with_stage_and_epoch(world, capsys):
    args = easier(world, "--lr", "1e30", out="nan")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "loss became" in err and "epoch 1" in err and "dense" in err
    run = world["base"] / "nan"
    assert not list(run.rglob("*.tmp"))
    assert not (run / "records.jsonl").exists()  # no stage finished: no record claims one


def test_disk_full_while_writing_a_checkpoint(world, capsys, monkeypatch):
    import depthcut.run as run_module

    real = run_module.os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(run_module.os, "fsync", full)
    assert main(easier(world, out="full")) == 2
    monkeypatch.setattr(run_module.os, "fsync", real)
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    run = world["base"] / "full"
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert not (run / "config.json").exists()


def test_unknown_model_for_a_pruning_method_writes_nothing(world, capsys):
    args = nepenthe(world, "--model", "resnet999")
    assert main(args) == 2
    assert "unknown model 'resnet999'" in capsys.readouterr().err
    assert not (world["base"] / "out").exists()


def test_external_model_without_its_package_is_a_clear_error(world, capsys):
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: both are "cannot import"
        assert main(easier(world, "--model", "torchvision:resnet18")) == 2
        err = capsys.readouterr().err
        assert "needs the optional package torchvision" in err
        assert not (world["base"] / "out").exists()
    else:
        pytest.skip("torchvision is importable here")
