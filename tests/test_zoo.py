"""The zoo (optional): models of timm, torchvision and transformers built as users bring them,
their sites found and counted, folded with every second site linear and with every site linear:
exact against float64, BatchNorm folded wherever the model has one (`benchmarks/zoo.py`, which
also writes docs/zoo.md). Skipped where a library is missing; slow: run it in the zoo venv,
`PYTHONPATH=. /work/venv-zoo/bin/python -m pytest tests/test_zoo.py` (docs/zoo.md)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
zoo = importlib.import_module("zoo")


def _importable(package: str) -> bool:
    if importlib.util.find_spec(package) is None:
        return False
    try:
        importlib.import_module(package)
    except Exception:  # noqa: BLE001 - present but broken beside this torch
        return False
    return True


@pytest.mark.parametrize("name", zoo.ZOO, ids=list(zoo.ZOO))
def test_zoo_model_folds_exactly(name: str) -> None:
    library = zoo.library_of(name)
    if not _importable(library):
        pytest.skip(f"{library} cannot be imported here")
    row = zoo.check_model(name)
    assert row["sites"] > 0, row
    assert row["entropies_finite"], row
    for key in ("half", "all"):
        assert row[key]["exact"] and row[key]["agrees"], (key, row)
    if row["batchnorms"]:
        assert row["batchnorms_left"] < row["batchnorms"], row


def test_rows_run_again_replace_theirs_in_zoo_order() -> None:
    first, second = zoo.ZOO[0], zoo.ZOO[1]
    earlier = [{"name": "gone:model", "passed": True}, {"name": second, "passed": False},
               {"name": first, "passed": False}]
    merged = zoo.merge_rows(earlier, [{"name": second, "passed": True}])
    assert merged == [{"name": first, "passed": False}, {"name": second, "passed": True}]


def test_the_notes_below_the_table_are_kept(tmp_path: Path) -> None:
    table = tmp_path / "zoo.md"
    table.write_text("# zoo\n\n| a | b |\n| --- | --- |\n| x | y |\n\n**Why.** Because.\n")
    row = {"name": zoo.ZOO[0], "error": "boom", "passed": False}
    zoo.write_table([row], table, 1.0)
    text = table.read_text()
    assert text.endswith("| no |\n\n**Why.** Because.\n") and "| x | y |" not in text
    assert "1 models, 0 pass" in text


def test_zero_initialised_weights_are_made_random() -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    nn.init.zeros_(model[1].weight)
    nn.init.zeros_(model[1].bias)
    kept = model[0].weight.clone()
    names = zoo._randomize_zero_weights(model, torch.Generator().manual_seed(0))
    assert names == ["1.weight"] and model[1].weight.all() and not model[1].bias.any()
    assert torch.equal(model[0].weight, kept)
