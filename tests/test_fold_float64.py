"""Exactness stays honest in float32: the fold's error is measured against a float64 evaluation
of the unfolded model, so float32 rounding of a badly conditioned model does not read as a wrong
fold (and a wrong fold still does); a long chain of big linear ops composes as fast as a few
matrix products, in the order of least work."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from depthcut.affine import Affine, _product_order, compose_linear_chain
from depthcut.fold import LINEAR, Candidate, FoldState, fold, propose, register_rule
from depthcut.fold import unregister_rule as unregister
from depthcut.fold.state import shape_of
from depthcut.graph import input_of
from depthcut.sites import linearize
from tests.helpers import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def ill_conditioned() -> nn.Module:
    """x -> 1e6 [x; x] -> (linearized site) -> [I, -(1 - 1e-6) I]: the product is about x, but
    float32 computes it as a difference of two numbers near 1e6 x, losing most digits."""
    n = 8
    model = nn.Sequential(nn.Linear(n, 2 * n, bias=False), nn.ReLU(),
                          nn.Linear(2 * n, n, bias=False))
    with torch.no_grad():
        eye = torch.eye(n)
        model[0].weight.copy_(1e6 * torch.cat([eye, eye]))
        model[2].weight.copy_(torch.cat([eye, -(1 - 1e-6) * eye], dim=1))
    return linearize(model.eval(), ["1"])


def test_float32_rounding_of_the_unfolded_model_does_not_read_as_a_wrong_fold() -> None:
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    report = fold(ill_conditioned(), x).fold_report
    assert report.exact
    # Against the float32 unfolded model the fold looks far off ...
    assert report.relative_error > 1e-3
    # ... because float32 rounding moves the unfolded model itself that far from float64,
    assert report.float32_noise > 1e-3
    # while the folded model agrees with the float64 truth to float32 precision.
    assert report.float64_error < 1e-6
    assert report.agrees_in_float64 is True
    text = report.markdown()
    assert "exact up to float32 rounding" in text and "NOT" not in text
    assert report.to_dict()["agrees_in_float64"] is True


@pytest.fixture
def wrong_rule():
    """A rule that merges a linear op with a (deliberately) wrong weight and calls it exact."""

    def perturb(state: FoldState, node: torch.fx.Node) -> bool:
        source = input_of(node)
        op = state.affine(node, source) if source is not None else None
        if op is None or op.kind != "linear" or str(node.target).startswith("folded"):
            return False
        wrong = Affine("linear", op.weight * 1.01, op.bias)
        return propose(state, Candidate("wrong", [node], source, wrong, True,
                                        op.macs(shape_of(node)), always=True))

    register_rule(LINEAR, perturb, order=1, name="wrong")
    yield
    unregister(LINEAR, "wrong")


def test_a_wrong_fold_still_reads_as_wrong(wrong_rule) -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Identity(), nn.Linear(8, 4)).eval()
    report = fold(model, torch.randn(4, 8)).fold_report
    assert report.exact  # what the rule claimed
    assert report.float64_fold_error is not None and report.float64_fold_error > 1e-3
    assert report.agrees_in_float64 is False
    assert "NOT explained by float32 rounding" in report.markdown()


def test_a_big_linear_chain_composes_in_the_order_of_least_work() -> None:
    """A VGG-like classifier, 4096 -> 2048 -> 2048 -> 10 with its sites linear, folds to one
    linear. Composed left to right it costs one (2048 x 2048) @ (2048 x 4096) float64 product;
    right to left, 1/200 of it: the matrix-chain order multiplies the 10-row end first. (How
    long it takes is measured by benchmarks, not asserted here.)"""
    torch.manual_seed(0)
    big = linearize(nn.Sequential(nn.Linear(4096, 2048), nn.ReLU(), nn.Dropout(),
                                  nn.Linear(2048, 2048), nn.ReLU(), nn.Dropout(),
                                  nn.Linear(2048, 10)).eval(), ["1", "4"])
    x_big = torch.randn(2, 4096)
    folded = fold(big, x_big)
    assert folded.fold_report.ops_after == 1 and folded.fold_report.exact
    assert torch.allclose(folded(x_big), big(x_big), rtol=1e-4, atol=1e-5)
    # Weights are (out x in): the product is W3 (10x2048) W2 (2048x2048) W1 (2048x4096).
    split = _product_order([10, 2048, 2048, 4096])
    assert split[0, 2] == 1  # (W3 W2) W1: 10*2048*2048 + 10*2048*4096 multiply-adds
    assert split[1, 2] == 1 and split[0, 1] == 0


def test_compose_linear_chain_matches_left_to_right_composition() -> None:
    g = torch.Generator().manual_seed(1)
    dims = [7, 30, 3, 40, 5]
    ops = [Affine("linear", torch.randn(o, i, generator=g, dtype=torch.float64),
                  torch.randn(o, generator=g, dtype=torch.float64))
           for i, o in zip(dims, dims[1:], strict=False)]
    merged = compose_linear_chain(ops)
    x = torch.randn(6, 7, generator=g, dtype=torch.float64)
    expected = x
    for op in ops:
        expected = op.apply(expected)
    assert torch.allclose(merged.apply(x), expected, rtol=1e-12, atol=1e-10)
