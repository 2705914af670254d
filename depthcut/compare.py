"""Side-by-side comparison of finished runs: tables, plots and a summary (EASIER Table 1, Fig. 3,
Table 3), built from run directories only, so `depthcut report RUN_DIR...` needs no training.

The one measurement a report may add is the cost of each EASIER stage folded (MACs and latency
on the current device), cached in the run directory as `stage_costs.json`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from depthcut.reports import markdown_table
from depthcut.run import answer_stage, atomic_write_text, read_records, write_json

STAGE_COSTS = "stage_costs.json"
LABELS = {
    "easier": "EASIER",
    "nepenthe": "NEPENTHE",
    "egp": "EGP",
    "imp": "IMP",
    "layer_folding": "Layer Folding",
    "dense_longer": "dense, trained longer",
}


@dataclass
class Run:
    path: Path
    method: str
    config: dict
    records: list[dict]
    folded: dict | None = None
    stage_costs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        label = LABELS.get(self.method, self.method)
        k = self.config.get(self.method, {}).get("k")
        if self.method == "easier" and k and k > 1:
            label += f" {k}-x"
        return label

    @property
    def answer(self) -> dict:
        return answer_stage(self.records)

    def experiment(self, key: str):
        value = self.config.get("experiment", {}).get(key)
        if key == "activation" and value is None:  # None: the architecture's own default
            from depthcut.models import default_activation

            value = default_activation(self.experiment("model"))
        return value


def load_run(path: str | Path) -> Run:
    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path} is not a depthcut run directory (no config.json)")
    config = json.loads(config_path.read_text())
    records = read_records(path)
    if not records:
        raise ValueError(f"{path} holds no records yet: the run has not finished a stage")
    folded = path / "folded_answer.json"
    costs = path / STAGE_COSTS
    return Run(
        path=path,
        method=config.get("method", records[-1].get("method", "?")),
        config=config,
        records=records,
        folded=json.loads(folded.read_text()) if folded.is_file() else None,
        stage_costs=json.loads(costs.read_text()) if costs.is_file() else {},
    )


def check_compatible(runs: Sequence[Run]) -> None:
    """Refuse to put runs with different data or models in one table."""
    for key in ("dataset", "model", "width", "activation"):
        values = {str(run.experiment(key)) for run in runs}
        if len(values) > 1:
            detail = ", ".join(f"{run.path}: {run.experiment(key)}" for run in runs)
            raise ValueError(
                f"cannot compare runs with different {key} ({detail}); a comparison needs the "
                "same dataset, model, width and activation in every run"
            )


def measure_stage_costs(run: Run, progress: bool = True) -> dict:
    """Fold every stage checkpoint of a run and time it (batch 1 and 128); cached in the run."""
    import torch

    from depthcut.fold import count_macs, fold, median_seconds
    from depthcut.run import load_checkpoint

    costs = dict(run.stage_costs)
    for record in run.records:
        key = str(record["stage"])
        if key in costs or not record.get("checkpoint"):
            continue
        model, info = load_checkpoint(run.path / record["checkpoint"])
        spec = info["spec"]
        x128 = torch.randn(128, spec.in_channels, 32, 32)
        folded = fold(model, x128[:1], "macs")
        entry = {"macs_unfolded": count_macs(model, x128[:1]),
                 "macs_folded": count_macs(folded, x128[:1])}
        for batch, repeats in ((1, 30), (128, 3)):
            x = x128[:batch]
            entry[f"ms_batch{batch}_unfolded"] = 1e3 * median_seconds(lambda m=model, x=x: m(x),
                                                                      repeats=repeats)
            entry[f"ms_batch{batch}_folded"] = 1e3 * median_seconds(lambda m=folded, x=x: m(x),
                                                                    repeats=repeats)
        costs[key] = entry
        if progress:
            print(f"{run.path}: stage {key} folded and timed", flush=True)
    write_json(run.path / STAGE_COSTS, costs)
    run.stage_costs = costs
    return costs


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _fair_reference(runs: Sequence[Run], total_epochs: int) -> float | None:
    """Test top-1 of the dense model trained for the same total epochs (the latest stage of the
    dense-trained-longer run that has not trained longer than that)."""
    for run in runs:
        if run.method != "dense_longer":
            continue
        fitting = [r for r in run.records if r.get("total_epochs", 0) <= total_epochs]
        if fitting:
            return fitting[-1]["test_top1"]
    return None


def table1(runs: Sequence[Run]) -> tuple[list[str], list[list[str]], int | None]:
    """Per method: the answer stage, and top-1 at equal sites removed (EASIER's answer count)."""
    methods = [run for run in runs if run.method != "dense_longer"]
    easier = [run for run in methods if run.method == "easier"]
    equal = easier[0].answer["sites_linearized"] if easier else None
    headers = ["method", "answer stage", "sites removed", "test top-1", "val top-1",
               "sparsity", "total epochs", "dense trained as long: test top-1",
               f"test top-1 at {equal} sites removed" if equal is not None else "-",
               "folded MMACs/image", "folded params", "folded latency b1 (ms)"]
    dense = methods[0].records[0] if methods else None
    rows = []
    if dense is not None:
        rows.append(["dense", "0", f"0/{dense['sites_total']}", _fmt(dense["test_top1"]),
                     _fmt(dense.get("val_top1")), "-", str(dense.get("total_epochs", "-")),
                     "-", "-", "-", "-", "-"])
    for run in methods:
        answer = run.answer
        at_equal = [r for r in run.records if r["sites_linearized"] == equal]
        folded = run.folded or {}
        rows.append([
            run.label,
            str(answer["stage"]),
            f"{answer['sites_linearized']}/{answer['sites_total']}",
            _fmt(answer["test_top1"]),
            _fmt(answer.get("val_top1")),
            f"{100 * answer['sparsity']:.1f}%" if "sparsity" in answer else "-",
            str(answer.get("total_epochs", "-")),
            _fmt(_fair_reference(runs, answer.get("total_epochs", 0))),
            _fmt(at_equal[-1]["test_top1"]) if at_equal else "-",
            _fmt(folded["macs_folded"] / 1e6, 1) if "macs_folded" in folded else "-",
            f"{folded['params_folded']:,}" if "params_folded" in folded else "-",
            _fmt(folded.get("latency_ms_batch1_folded"), 3),
        ])
    return headers, rows, equal


def table3(run: Run) -> tuple[list[str], list[list[str]]]:
    headers = ["stage", "sites removed", "test top-1", "MMACs unfolded", "MMACs folded",
               "ms b1 unfolded", "ms b1 folded", "ms b128 unfolded", "ms b128 folded"]
    rows = []
    for record in run.records:
        cost = run.stage_costs.get(str(record["stage"]), {})
        rows.append([
            str(record["stage"]), f"{record['sites_linearized']}/{record['sites_total']}",
            _fmt(record["test_top1"]),
            _fmt(cost["macs_unfolded"] / 1e6, 1) if cost else "-",
            _fmt(cost["macs_folded"] / 1e6, 1) if cost else "-",
            _fmt(cost.get("ms_batch1_unfolded"), 3), _fmt(cost.get("ms_batch1_folded"), 3),
            _fmt(cost.get("ms_batch128_unfolded"), 1), _fmt(cost.get("ms_batch128_folded"), 1),
        ])
    return headers, rows


def _csv(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(headers)
    writer.writerows(rows)
    return buffer.getvalue()


def plot_accuracy_vs_sites(runs: Sequence[Run], path: Path) -> bool:
    """Fig. 3a: test top-1 against sites removed, one line per method, dense as a reference."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = [run for run in runs if run.method != "dense_longer"]
    for run in methods:
        xs = [r["sites_linearized"] for r in run.records]
        ys = [r["test_top1"] for r in run.records]
        ax.plot(xs, ys, marker="o", label=run.label)
    if methods:
        ax.axhline(methods[0].records[0]["test_top1"], color="gray", linestyle="--",
                   label="dense")
    ax.set_xlabel("sites removed")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{methods[0].experiment('model')} x{methods[0].experiment('width')} on "
                 f"{_dataset_name(methods[0])}" if methods else "")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_entropy_heatmap(run: Run, path: Path) -> bool:
    """Entropy of every site (rows) at every stage (columns), the chosen site marked."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    stages = [r for r in run.records if r.get("entropy")]
    if not stages:
        return False
    sites: list[str] = []
    for record in stages:
        sites += [s for s in record["entropy"] if s not in sites]
    grid = np.full((len(sites), len(stages)), np.nan)
    for column, record in enumerate(stages):
        for row, site in enumerate(sites):
            value = record["entropy"].get(site)
            grid[row, column] = np.nan if value is None else value
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(stages), 1.2 + 0.3 * len(sites)))
    image = ax.imshow(grid, aspect="auto", cmap="viridis")
    for column, record in enumerate(stages):
        for site in record.get("chosen", []):
            if site in sites:
                ax.scatter(column, sites.index(site), marker="x", color="red", s=60)
    ax.set_xticks(range(len(stages)), [str(r["stage"]) for r in stages])
    ax.set_yticks(range(len(sites)), sites, fontsize=7)
    ax.set_xlabel("stage (x: site chosen)")
    ax.set_title(f"{run.label}: layer entropy (bits)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _dataset_name(run: Run) -> str:
    from depthcut.data import DATASET_NAMES

    name = run.experiment("dataset")
    return DATASET_NAMES.get(name, name)


def build_report(run_dirs: Sequence[str | Path], out: str | Path, *, measure: bool = True,
                 progress: bool = True) -> Path:
    """Write the comparison of `run_dirs` into `out`: Markdown and CSV tables, PNG plots and
    `report.md`. With `measure`, EASIER stages are folded and timed once (cached)."""
    start = time.perf_counter()
    runs = [load_run(path) for path in run_dirs]
    check_compatible(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    headers, rows, equal = table1(runs)
    atomic_write_text(out / "table1.md", markdown_table(headers, rows) + "\n")
    atomic_write_text(out / "table1.csv", _csv(headers, rows))
    easier = [run for run in runs if run.method == "easier"]
    lines = [f"# Comparison on {_dataset_name(runs[0])}", "",
             f"Model: {runs[0].experiment('model')} (width x{runs[0].experiment('width')}, "
             f"{runs[0].experiment('activation')}); runs: "
             + ", ".join(f"`{run.path}` ({run.label})" for run in runs) + ".", "",
             "## Methods at their answer stage (Table 1 style)", "",
             markdown_table(headers, rows), ""]
    if equal is not None:
        lines += [f"'At {equal} sites removed' is each method's stage with as many sites removed "
                  "as EASIER's answer (- where a method never had exactly that many).", ""]
    if any(run.method == "dense_longer" for run in runs):
        lines += ["'Dense trained as long' is the dense model trained further for as many "
                  "total epochs as that method's answer consumed (no site removed), so gains "
                  "from extra training are not credited to depth reduction.", ""]
    if easier:
        if measure:
            measure_stage_costs(easier[0], progress=progress)
        headers3, rows3 = table3(easier[0])
        atomic_write_text(out / "table3.md", markdown_table(headers3, rows3) + "\n")
        atomic_write_text(out / "table3.csv", _csv(headers3, rows3))
        lines += [f"## {easier[0].label}: cost per stage, folded (Table 3 style)", "",
                  "Each stage checkpoint folded with policy `macs`; latency is the median on "
                  "this machine's CPU (eager), batch 1 and 128.", "",
                  markdown_table(headers3, rows3), ""]
    if plot_accuracy_vs_sites(runs, out / "accuracy_vs_sites.png"):
        lines += ["![test top-1 against sites removed](accuracy_vs_sites.png)", ""]
    if easier and plot_entropy_heatmap(easier[0], out / "entropy_heatmap.png"):
        lines += ["![entropy per site and stage](entropy_heatmap.png)", ""]
    for run in runs:
        wall = run.records[-1].get("elapsed_s")
        settings = json.dumps(run.config.get(run.method, {}), sort_keys=True)
        lines.append(f"- {run.label}: {len(run.records) - 1} stage(s)"
                     + (f", {wall / 60:.1f} min" if wall else "") + f"; settings {settings}")
    lines += ["", f"Report built in {time.perf_counter() - start:.0f} s."]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return out / "report.md"
