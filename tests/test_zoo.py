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


@pytest.mark.parametrize("name", zoo.ZOO)
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
