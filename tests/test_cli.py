"""A short end-to-end CLI run on a tiny CIFAR-10-format dataset, and the CLI's clear errors."""

import json
import subprocess
import sys

import pytest
import torch

from depthcut.cli import main
from depthcut.run import load_checkpoint, read_records
from tests.helpers import write_fake_cifar10


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = write_fake_cifar10(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / "easier"
    args = ["easier", "--dataset", "cifar10", "--data-root", str(root), "--width", "0.0625",
            "--epochs", "1", "--finetune-epochs", "1", "--max-stages", "2", "--delta", "100",
            "--batch-size", "32", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return root, out, args


def test_run_directory_holds_records_checkpoints_and_summary(finished_run, capsys):
    root, out, _ = finished_run
    records = read_records(out)
    assert [r["stage"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert set(record["entropy"]) and record["chosen"][0] in record["entropy"]
        assert record["sites_linearized"] == record["stage"]
        for key in ("val_top1", "test_top1", "epochs", "seconds", "linearized"):
            assert key in record
    assert records[2]["linearized"][:1] == records[1]["chosen"]
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"]["width"] == 0.0625 and config["easier"]["max_stages"] == 2
    summary = (out / "summary.md").read_text()
    assert "**Answer: stage 2**" in summary and "CIFAR-10" in summary
    model, info = load_checkpoint(out / "checkpoints" / "stage_02.pt")
    assert info["linearized"] == records[2]["linearized"]
    assert info["extra"]["dataset"] == "cifar10"


def test_entropy_command_prints_a_table(finished_run, capsys):
    _, out, _ = finished_run
    assert main(["entropy", "--checkpoint", str(out / "checkpoints" / "stage_01.pt"),
                 "--samples", "40", "--device", "cpu", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "1 site(s) linearized; 40 images" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "site" not in line]
    assert len(rows) == 16


def test_work_on_saved_models_through_the_api(finished_run, tmp_path):
    import depthcut

    _, out, _ = finished_run
    stage = out / "checkpoints" / "stage_01.pt"
    report = depthcut.entropy_report(stage, samples=40, device="cpu", progress=False)
    assert report.images == 40 and report.split == "train" and len(report.counts) == 16
    assert report.text() == f"{report.header()}\n{report.table()}"
    result = depthcut.fold_checkpoint(stage, tmp_path / "f.pt", samples=8, progress=False)
    assert result.report.policy == "macs" and result.images == 8 and result.onnx is None
    assert (tmp_path / "f.pt").is_file() and "Folded model saved to" in result.text()


def test_existing_run_is_refused_without_overwrite(finished_run, capsys):
    _, _, args = finished_run
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_missing_dataset_and_bad_values_are_clear_errors(tmp_path, capsys):
    base = ["easier", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(base + ["--dataset", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and "Traceback" not in err
    assert main(base + ["--delta", "-1"]) == 2
    assert "delta" in capsys.readouterr().err
    assert main(["entropy", "--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["entropy", "--checkpoint", str(bad)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_config_file_layers_under_flags(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"nonsense": 1}))
    args = ["easier", "--config", str(config), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "unknown keys" in capsys.readouterr().err


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "depthcut", "easier", "--help"],
                            capture_output=True, text=True, check=True)
    for option in ("--delta", "--k", "--finetune-epochs", "--width", "--train-subset",
                   "--val-fraction", "--schedule", "--preset"):
        assert option in result.stdout


def test_settings_layer_preset_then_file_then_flags(tmp_path):
    from depthcut.cli import build_parser, resolve_settings

    config = tmp_path / "c.json"
    config.write_text(json.dumps({"width": 0.5, "epochs": 7, "k": 3}))
    parser = build_parser()
    args = parser.parse_args(["easier", "--config", str(config), "--epochs", "2", "--out", "x"])
    settings = resolve_settings(args)
    assert (settings["width"], settings["epochs"], settings["k"]) == (0.5, 2, 3)
    assert settings["finetune_epochs"] == 3  # from the quick preset
    paper = resolve_settings(parser.parse_args(["easier", "--preset", "paper", "--out", "x"]))
    assert (paper["epochs"], paper["finetune_epochs"], paper["width"]) == (160, 160, 1.0)
    assert paper["milestones"] == [80, 120] and paper["finetune_lr"] == paper["lr"] == 0.1
    assert paper["max_stages"] is None


def test_run_summary_reports_the_folded_answer(finished_run):
    _, out, _ = finished_run
    folded = json.loads((out / "folded_answer.json").read_text())
    records = read_records(out)
    answer = records[folded["stage"]]
    # Under the default MACs policy a ResNet only loses its BatchNorms: exact, same top-1.
    assert folded["exact"] and folded["relative_error"] < 1e-5
    assert folded["top1_unfolded"] == pytest.approx(answer["test_top1"])
    assert folded["top1_folded"] == pytest.approx(folded["top1_unfolded"])
    assert folded["ops_folded"] < folded["ops_unfolded"]
    assert (out / folded["checkpoint"]).is_file()
    assert "Answer stage folded" in (out / "summary.md").read_text()


def test_fold_and_heal_commands(finished_run, tmp_path, capsys):
    from depthcut.run import load_folded

    _, out, _ = finished_run
    folded_path = tmp_path / "folded.pt"
    assert main(["fold", "--checkpoint", str(out / "checkpoints" / "stage_02.pt"), "--out",
                 str(folded_path), "--policy", "all", "--samples", "40", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "Fold report (policy all)" in text and "checked on 40" in text
    module, info = load_folded(folded_path)
    assert info["report"]["policy"] == "all" and info["extra"]["dataset"] == "cifar10"
    healed_path = tmp_path / "healed.pt"
    assert main(["heal", "--folded", str(folded_path), "--out", str(healed_path),
                 "--epochs", "1", "--samples", "40", "--batch-size", "32",
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "before heal" in text and "after 1 epoch(s)" in text
    healed, info = load_folded(healed_path)
    assert info["extra"]["heal"]["epochs"] == 1
    before = dict(module.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in healed.named_parameters())


def test_fold_errors_are_clear(tmp_path, capsys):
    assert main(["heal", "--folded", str(tmp_path / "none.pt"), "--out", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nope")
    assert main(["fold", "--checkpoint", str(bad), "--out", str(tmp_path / "f.pt")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_fold_exports_onnx_checked_by_onnxruntime(finished_run, tmp_path, capsys):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    _, out, _ = finished_run
    target = tmp_path / "folded.pt"
    assert main(["fold", "--checkpoint", str(out / "checkpoints" / "stage_01.pt"), "--out",
                 str(target), "--samples", "8", "--export", "onnx", "--no-progress"]) == 0
    assert "checked with onnxruntime" in capsys.readouterr().out
    assert target.with_suffix(".onnx").stat().st_size > 0


def test_bf16_autocast_run(tmp_path):
    root = write_fake_cifar10(tmp_path / "data")
    out = tmp_path / "amp"
    assert main(["easier", "--dataset", "cifar10", "--data-root", str(root), "--width", "0.0625",
                 "--epochs", "1", "--finetune-epochs", "1", "--max-stages", "1", "--amp",
                 "--batch-size", "32", "--device", "cpu", "--out", str(out),
                 "--no-progress"]) == 0
    records = read_records(out)
    assert json.loads((out / "config.json").read_text())["experiment"]["amp"] is True
    assert len(records) == 2 and len(records[1]["entropy"]) == 17


def test_an_unknown_flag_is_named_with_the_commands_own_usage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["easier", "--not-a-flag", "1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("usage: depthcut easier")  # not the top-level usage
    assert "depthcut easier: error: unrecognized arguments: --not-a-flag 1" in err
