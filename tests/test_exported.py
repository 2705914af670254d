"""A forward torch.fx cannot trace but torch.export can (the Hugging Face pattern: shapes
compared while building a mask, layers taking keyword arguments and returning tuples, an
activation module whose forward calls F.gelu) goes through find_sites, entropy, linearize and
fold, exactly, captured whole: the MLP collapses into one Linear."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depthcut.entropy import measure_entropy
from depthcut.fold import fold
from depthcut.graph import TraceError, trace_graph
from depthcut.models.adapt import modularize_functional
from depthcut.sites import find_sites, linearize
from tests.helpers import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class GELUActivation(nn.Module):
    """Like transformers': a module whose forward calls F.gelu (no rectifier module)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x)


class Layer(nn.Module):
    """Attention-like mixing under a mask, then dense -> activation -> dense, residuals."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.dense_in = nn.Linear(width, 4 * width)
        self.act = GELUActivation()
        self.dense_out = nn.Linear(4 * width, width)
        self.dropout = nn.Dropout(0.1)

    def attend(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        scores = (x @ x.transpose(1, 2)).masked_fill(~mask[:, None, :], -1e4).softmax(-1)
        return scores @ self.mix(x), scores

    def forward(self, x: Tensor, mask: Tensor, **kwargs: object) -> Tensor:
        mixed, _ = self.attend(x, mask)
        x = self.norm(x + mixed)
        return x + self.dropout(self.dense_out(self.act(self.dense_in(x))))


class HFLike(nn.Module):
    """Top-level forward comparing traced shapes (as transformers' mask building does)."""

    def __init__(self, vocab: int = 50, width: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([Layer(width), Layer(width)])
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        if tokens.shape[0] != positions.expand(tokens.shape[0], -1).shape[0]:
            raise ValueError("batch and positions disagree")
        mask, x = tokens != 0, self.embed(tokens)
        for layer in self.layers:
            x = layer(x, mask, cache=None)
        return self.head(x.mean(1))


def built() -> nn.Module:
    torch.manual_seed(0)
    return modularize_functional(HFLike()).eval()


def tokens(batch: int = 4) -> Tensor:
    x = torch.randint(1, 50, (batch, 12), generator=torch.Generator().manual_seed(1))
    x[1, 8:] = 0  # padding
    return x


def test_the_pattern_does_not_trace_but_its_activations_become_sites() -> None:
    model = built()
    with pytest.raises(TraceError):
        trace_graph(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # registration order: the model does not trace
        sites = find_sites(model)
    assert sites == ["layers.0.act", "layers.1.act"]
    assert all(isinstance(model.get_submodule(site), nn.GELU) for site in sites)
    entropies = measure_entropy(model, [tokens()])
    assert set(entropies) == set(sites)
    assert all(math.isfinite(h) for h in entropies.values())


@pytest.mark.parametrize("linear", [["layers.0.act"], ["layers.0.act", "layers.1.act"]])
def test_linear_mlps_collapse_exactly_in_one_exported_graph(linear: list[str]) -> None:
    model = linearize(built(), linear)
    folded = fold(model, tokens())
    report = folded.fold_report
    assert report.unfolded_parts == []  # captured whole, not part by part
    assert report.exact and report.agrees_in_float64, report
    assert report.float64_error < 1e-5
    assert report.macs_after < report.macs_before
    merged = [set(merge.replaces) for merge in report.merges if merge.taken]
    for site in linear:
        layer = site.rsplit(".", 1)[0]
        assert {f"{layer}.dense_in:linear", f"{layer}.dense_out:linear"} in merged
    other = tokens(batch=7)  # the batch is captured dynamic
    with torch.no_grad():
        assert torch.allclose(folded(other), model(other), atol=1e-5)


def test_a_data_dependent_branch_still_folds_part_by_part() -> None:
    class Branchy(HFLike):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3))

        def forward(self, tokens: Tensor) -> Tensor:
            x = self.embed(tokens)
            if x.sum() > 0:  # on the values: torch.export refuses it too
                x = -x
            return self.head(x.mean(1))

    torch.manual_seed(0)
    model = Branchy().eval()
    folded = fold(model, tokens())
    assert folded.fold_report.unfolded_parts[0].startswith("the model (Branchy)")
    assert folded.fold_report.exact
