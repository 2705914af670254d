"""Linear ops written as functions fold like modules: a fused norm-act module (F.batch_norm, then
its activation child, as timm's BatchNormAct2d), F.conv2d and F.linear with parameter inputs,
and shape checks (`torch._assert(x.ndim == 4)`) that would make every checked op a branch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from depthcut.entropy import measure_entropy
from depthcut.fold import fold
from depthcut.graph import chain_neighbours
from depthcut.sites import find_sites, linearize
from tests.helpers import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class FusedNormAct(nn.BatchNorm2d):
    """A BatchNorm computed functionally, then its activation child (timm's BatchNormAct2d)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        torch._assert(x.ndim == 4, "expected a 4-D input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, 0.1, self.eps)
        return self.act(x)


class FunctionalConv(nn.Module):
    """A convolution calling F.conv2d on its own parameters."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c_out, c_in, 1, 1) / c_in**0.5)
        self.bias = nn.Parameter(torch.randn(c_out) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias)


class FusedNet(nn.Module):
    """conv -> fused BN+ReLU -> F.conv2d -> fused BN+ReLU -> pool -> F.linear -> F.linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = FusedNormAct(8)
        self.pw = FunctionalConv(8, 12)
        self.bn2 = FusedNormAct(12)
        self.hidden = nn.Parameter(torch.randn(16, 12) / 12**0.5)
        self.head_weight = nn.Parameter(torch.randn(4, 16) / 4)
        self.head_bias = nn.Parameter(torch.zeros(4))

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn2(self.pw(self.bn1(self.conv(x)))).mean((2, 3))
        return F.linear(F.linear(x, self.hidden), self.head_weight, self.head_bias)


def fused_net() -> nn.Module:
    torch.manual_seed(0)
    model = FusedNet()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_the_activation_of_a_fused_norm_act_module_is_a_site() -> None:
    model = fused_net()
    assert find_sites(model) == ["bn1.act", "bn2.act"]
    entropies = measure_entropy(model, [torch.randn(8, 3, 8, 8)])
    assert set(entropies) == {"bn1.act", "bn2.act"}
    assert all(0.0 <= h <= 1.0 for h in entropies.values())


def test_functional_batch_norm_folds_into_its_convolution_with_sites_active() -> None:
    """The sites stay ReLUs: each functional BatchNorm still merges into the conv before it,
    and the two F.linear calls become one op."""
    model, x = fused_net(), torch.randn(4, 3, 8, 8)
    folded = fold(model, x)
    report = folded.fold_report
    taken = [name for merge in report.merges if merge.taken for name in merge.replaces]
    assert {"bn1:batch_norm", "bn2:batch_norm"} <= set(taken)
    assert report.exact and report.relative_error < 1e-5
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert report.ops_after < report.ops_before
    batch_norms = [n for n in folded.graph.nodes if n.target is F.batch_norm]
    assert batch_norms == []


def test_every_site_linear_folds_the_whole_net_to_fewer_macs_exactly() -> None:
    model, x = fused_net(), torch.randn(4, 3, 8, 8)
    linearize(model, find_sites(model))
    folded = fold(model, x)
    report = folded.fold_report
    assert report.exact and report.relative_error < 1e-5
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert report.macs_after < report.macs_before
    # The 3x3 (with the first BN) and the 1x1 (with the second) stay two convs: one 3x3 to 12
    # channels would cost more. The two F.linear calls become one linear.
    assert (report.depth_before, report.depth_after) == (4, 3)
    assert report.ops_after == 4  # conv, conv, mean, linear


def test_weights_computed_in_forward_stay_functional() -> None:
    """F.linear whose weight depends on the input (attention-like) is not an op with weights."""

    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 6)
            self.weight = nn.Parameter(torch.randn(6, 6))

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            return F.linear(h, self.weight * h.abs().mean())

    model, x = Dynamic().eval(), torch.randn(6, 6)
    folded = fold(model, x)
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert not any(m.taken for m in folded.fold_report.merges)


def test_chain_neighbours_pass_through_functional_batch_norms() -> None:
    """The two sites are one linear run apart: 1x1 F.conv2d, then a fused module's BatchNorm."""
    assert chain_neighbours(fused_net(), ["bn1.act", "bn2.act"]) == {
        "bn1.act": ["bn2.act"], "bn2.act": ["bn1.act"]}
