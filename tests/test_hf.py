"""Hugging Face transformers (optional; skipped where it does not import): BERT, DistilBERT,
RoBERTa, GPT-2 and ViT with small random configs go through find_sites, measure_entropy,
linearize and fold, exactly against float64, the MLPs collapsing; padding is masked."""

from __future__ import annotations

import importlib
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from depthcut.entropy import measure_entropy
from depthcut.fold import fold
from depthcut.masks import clone_model
from depthcut.models import build_external
from depthcut.sites import find_sites, linearize
from tests.helpers import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

try:
    importlib.import_module("transformers")
except Exception:  # noqa: BLE001 - missing, or broken beside this torch
    pytest.skip("transformers cannot be imported here", allow_module_level=True)

_SMALL = "hidden_size=64,num_hidden_layers=2,num_attention_heads=2,intermediate_size=128"
_TEXT = f"{_SMALL},vocab_size=500,max_position_embeddings=64"
MODELS = {
    "bert": f"hf:bert:{_TEXT}",
    "distilbert": "hf:distilbert:dim=64,n_layers=2,n_heads=2,hidden_dim=128,vocab_size=500,"
                  "max_position_embeddings=64",
    "roberta": f"hf:roberta:{_TEXT}",
    "gpt2": "hf:gpt2:n_embd=64,n_layer=2,n_head=2,vocab_size=500,n_positions=64,pad_token_id=0",
    "vit": f"hf:vit:{_SMALL},patch_size=8",
}


def built(key: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    if key == "vit":
        return (build_external(MODELS[key], 10, 3, image_size=32).eval(),
                torch.randn(2, 3, 32, 32, generator=generator))
    tokens = torch.randint(2, 500, (2, 24), generator=generator)
    tokens[1, 16:] = 0  # padding (pad_token_id 0 where the config has one)
    return build_external(MODELS[key], 10, 1).eval(), tokens


@pytest.mark.parametrize("key", list(MODELS))
def test_sites_entropy_and_an_exact_fold_with_the_mlps_collapsed(key: str) -> None:
    model, x = built(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # registration order: transformers does not trace
        sites = find_sites(model)
        entropies = measure_entropy(model, [x])
    assert len(sites) == 2  # one GELU per layer
    assert all(math.isfinite(h) for h in entropies.values())
    folded = fold(linearize(clone_model(model), sites), x)
    report = folded.fold_report
    assert report.exact and report.agrees_in_float64, report
    assert report.unfolded_parts == []
    assert report.macs_after < 0.8 * report.macs_before  # each MLP one Linear
    assert sum(1 for merge in report.merges if merge.taken) >= len(sites)


def test_padding_is_masked() -> None:
    """BERT classifies from its first token: with padding masked, how much padding follows
    the sequence does not change the logits."""
    model, _ = built("bert")
    short = torch.tensor([[5, 6, 7, 8, 0, 0]])
    longer = torch.tensor([[5, 6, 7, 8, 0, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        assert torch.allclose(model(short), model(longer), atol=1e-5)


_FORTUNES = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.mark.skipif(not (_FORTUNES / "fortunes.tar.gz").exists(),
                    reason="the fortunes archive is not beside the project")
def test_cli_easier_on_a_text_dataset_with_padding_masked(tmp_path: Path) -> None:
    from depthcut.cli import main

    out = tmp_path / "run"
    code = main(["easier", "--model", "hf:bert:hidden_size=32,num_hidden_layers=2,"
                 "num_attention_heads=2,intermediate_size=64", "--dataset", "fortunes-lang",
                 "--data-root", str(_FORTUNES), "--train-subset", "300", "--epochs", "1",
                 "--max-stages", "1", "--out", str(out)])
    assert code == 0
    answer = json.loads((out / "folded_answer.json").read_text())
    assert answer["exact"]
