"""The comparison report: numbers equal the run records, plots written, mixed runs refused."""

from __future__ import annotations

import csv
import json

import pytest

from depthcut.cli import main
from depthcut.run import read_records
from tests.helpers import write_fake_cifar10


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    root = write_fake_cifar10(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("cmp") / "c"
    args = ["compare", "--dataset", "cifar10", "--data-root", str(root), "--width", "0.0625",
            "--epochs", "1", "--finetune-epochs", "1", "--slope-epochs", "1", "--max-stages",
            "2", "--rounds", "1", "--delta", "100", "--batch-size", "32", "--device", "cpu",
            "--methods", "easier", "easier-payoff", "imp", "layer-folding", "progressive",
            "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return root, out


def test_report_tables_equal_the_records(comparison):
    _, out = comparison
    with open(out / "report" / "table1.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    for method, label in (("easier", "EASIER"), ("imp", "IMP"),
                          ("layer-folding", "Layer Folding")):
        records = read_records(out / method)
        answer = [r for r in records if r["within_delta"]][-1]
        row = rows[label]
        assert float(row["test top-1"]) == pytest.approx(answer["test_top1"], abs=0.006)
        assert row["sites removed"] == f"{answer['sites_linearized']}/17"
        folded = json.loads((out / method / "folded_answer.json").read_text())
        assert float(row["folded MMACs/image"]) == pytest.approx(
            folded["macs_folded"] / 1e6, abs=0.06)
    easier = read_records(out / "easier")
    lf = read_records(out / "layer-folding")
    assert lf[1]["sites_linearized"] == easier[-1]["sites_linearized"]  # equal depth
    assert lf[0]["test_top1"] == easier[0]["test_top1"]  # one dense model for all
    fair = read_records(out / "dense_longer")
    assert fair[0]["test_top1"] == easier[0]["test_top1"]
    assert max(r["total_epochs"] for r in fair) >= easier[-1]["total_epochs"]
    with open(out / "report" / "table3.csv") as handle:
        stages = list(csv.DictReader(handle))
    assert [int(s["stage"]) for s in stages] == [r["stage"] for r in easier]
    assert all(float(s["MMACs folded"]) > 0 for s in stages)
    assert stages[0]["MACs vs dense"] == "1.000x" and stages[0]["b1 vs dense"] == "1.000x"
    assert all(int(s["depth folded"]) <= int(s["depth unfolded"]) for s in stages)
    assert all(s["fold exact (rel. error)"].startswith(("yes", "border")) for s in stages)


def test_compare_runs_the_easier_variants_and_progressive(comparison):
    """easier-payoff is EASIER with choose=payoff, in its own Table 3; the fair reference of a
    method is the dense model trained at least as long as that method's answer."""
    _, out = comparison
    payoff = json.loads((out / "easier-payoff" / "config.json").read_text())
    assert payoff["method"] == "easier" and payoff["easier"]["choose"] == "payoff"
    assert all("score" in r for r in read_records(out / "easier-payoff")[1:])
    assert (out / "report" / "table3_easier-payoff.csv").is_file()
    with open(out / "report" / "table1.csv") as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    fair = read_records(out / "dense_longer")
    for method, label in (("easier-payoff", "EASIER (payoff)"), ("progressive", "Progressive")):
        answer = [r for r in read_records(out / method) if r["within_delta"]][-1]
        longer = [r for r in fair if r["total_epochs"] >= answer["total_epochs"]][0]
        assert float(rows[label]["dense trained as long: test top-1"]) == pytest.approx(
            longer["test_top1"], abs=0.006)
        assert int(rows[label]["total epochs"]) == answer["total_epochs"]


def test_plots_are_written(comparison):
    _, out = comparison
    for name in ("accuracy_vs_sites.png", "accuracy_vs_epochs.png", "entropy_heatmap.png"):
        path = out / "report" / name
        assert path.stat().st_size > 5000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report" / "report.md").read_text()
    assert "CIFAR-10" in report and "accuracy_vs_sites.png" in report


def test_report_rebuilds_and_refuses_mixed_runs(comparison, tmp_path, capsys):
    root, out = comparison
    assert main(["report", str(out / "easier"), str(out / "imp"), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    assert (tmp_path / "r" / "table1.md").is_file()
    other = tmp_path / "other"
    assert main(["easier", "--dataset", "cifar10", "--data-root", str(root), "--width", "0.125",
                 "--epochs", "1", "--finetune-epochs", "1", "--max-stages", "1", "--batch-size",
                 "32", "--device", "cpu", "--out", str(other), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["report", str(out / "easier"), str(other), "--out", str(tmp_path / "r2")]) == 2
    assert "different width" in capsys.readouterr().err
