"""Test top-1 against total training epochs for the README's budget section: EASIER (from the
earlier `depthcut compare` in docs/comparison, same dense model, 3 epochs per stage), EASIER
with distillation and the progressive runs kept in docs/budget/records, and the dense model
trained on (both times).

    .venv/bin/python scripts/budget_plot.py   # writes docs/budget/accuracy_vs_epochs_all.png
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
DENSE_EPOCHS = 15
# The earlier comparison's fair-compute reference, from its Table 1 (docs/comparison).
EARLIER_DENSE_LONGER = {15: 80.55, 21: 81.04, 27: 81.49, 39: 82.42}
RUNS = {"cmp": "progressive: 8 sites at once, 6 epochs",
        "cmp_try2_step2": "progressive: 2 sites per 1-epoch stage",
        "cmp_try1_step4": "progressive: 4 sites per 1-epoch stage"}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    fig, ax = plt.subplots(figsize=(7.0, 4.4))
    with open(DOCS / "comparison" / "table3.csv") as handle:
        easier = list(csv.DictReader(handle))
    ax.plot([DENSE_EPOCHS + 3 * int(r["stage"]) for r in easier],
            [float(r["test top-1"]) for r in easier], marker="o",
            label="EASIER (1 site / 3 epochs)")
    ax.annotate("8/17", (39, float(easier[-1]["test top-1"])), textcoords="offset points",
                xytext=(4, -12), fontsize=8)
    for name, label in RUNS.items():
        stages = records(DOCS / "budget" / "records" / name / "progressive.jsonl")
        (line,) = ax.plot([r["total_epochs"] for r in stages], [r["test_top1"] for r in stages],
                          marker="o", label=label)
        accepted = [r for r in stages if r["within_delta"]][-1]
        ax.plot([accepted["total_epochs"]], [accepted["test_top1"]], marker="*", markersize=14,
                color=line.get_color())
        ax.annotate(f"{accepted['sites_linearized']}/17",
                    (accepted["total_epochs"], accepted["test_top1"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    distilled = records(DOCS / "budget" / "records" / "easier_distill.jsonl")
    ax.plot([r["total_epochs"] for r in distilled], [r["test_top1"] for r in distilled],
            marker="o", label="EASIER, distillation 0.5")
    longer = records(DOCS / "budget" / "records" / "dense_longer39.jsonl")
    ax.plot([r["total_epochs"] for r in longer], [r["test_top1"] for r in longer], "k--",
            marker=".", label="dense trained on (beside the runs above)")
    ax.plot(list(EARLIER_DENSE_LONGER), list(EARLIER_DENSE_LONGER.values()), ":", color="gray",
            marker=".", label="dense trained on (earlier run)")
    ax.set_xlabel("total training epochs (15 dense included)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("ResNet-18 x0.25 on CIFAR-10 (JPEG); star: answer within delta 1.0")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "budget" / "accuracy_vs_epochs_all.png", dpi=120)


if __name__ == "__main__":
    main()
