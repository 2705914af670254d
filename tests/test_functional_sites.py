"""Bring-your-own-model: functional rectifiers (F.relu, x.relu(), ...) become sites."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depthcut.entropy import count_states, measure_entropy
from depthcut.fold import fold
from depthcut.sites import SiteError, find_sites, linearize, modularize, silence
from tests.helpers import assert_matches, one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")




class Block(nn.Module):
    """Residual block whose two activations are functional calls of two spellings."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return (x + self.bn2(self.conv2(out))).relu()


class FunctionalNet(nn.Module):
    """A small CNN + MLP head written with functional activations only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.block = Block(6)
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.block(x).mean((2, 3))
        x = F.gelu(self.fc1(x), approximate="tanh")
        x = F.leaky_relu(self.fc2(x), 0.2)
        x = F.hardtanh(self.fc3(x), 0.0, 6.0)  # a ReLU6 written as hardtanh
        return self.head(F.hardtanh(x))  # hardtanh(-1, 1) is no rectifier: stays a function


SITES = ["relu", "block.relu", "block.relu_1", "gelu", "leaky_relu", "relu6"]


def random_net(seed: int) -> FunctionalNet:
    torch.manual_seed(seed)
    model = FunctionalNet()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.5)
            module.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0, 0.5)
    return model.eval()


def test_find_sites_names_the_functional_calls() -> None:
    with pytest.raises(SiteError, match=r"6 functional activation\(s\) found \(relu, block\.relu, "
                       r"block\.relu_1, gelu, leaky_relu, relu6\); call "
                       r"depthcut\.sites\.modularize\(model\) first"):
        find_sites(FunctionalNet())


def test_modularize_makes_one_module_per_call_and_keeps_the_function() -> None:
    model = random_net(0)
    x = torch.randn(3, 3, 8, 8)
    modular = modularize(model)
    assert find_sites(modular) == SITES
    kinds = [type(modular.get_submodule(s)) for s in SITES]
    assert kinds == [nn.ReLU, nn.ReLU, nn.ReLU, nn.GELU, nn.LeakyReLU, nn.ReLU6]
    assert modular.gelu.approximate == "tanh"
    assert modular.leaky_relu.negative_slope == 0.2
    assert not modular.training
    with torch.no_grad():
        assert torch.equal(modular(x), model(x))
    # A copy: the original keeps its functional forward and its own parameters.
    with pytest.raises(SiteError, match="functional activation"):
        find_sites(model)
    with torch.no_grad():
        modular.fc1.weight.zero_()
    assert model.fc1.weight.abs().sum() > 0
    # It survives what checkpoints and fold do with models.
    again = pickle.loads(pickle.dumps(modular))
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(again)(x), modular(x))


def test_entropy_after_modularize_matches_hand_counts() -> None:
    class Hand(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)
            with torch.no_grad():
                self.lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))
                self.lin.bias.copy_(torch.tensor([0.0, 0.5]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(x * 1.0, inplace=True)  # counted before the op overwrites its input
            return self.lin(y).relu()

    model = modularize(Hand())
    assert find_sites(model) == ["relu", "relu_1"]
    batches = [torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -3.0]]),
               torch.tensor([[-1.0, 0.0, 5.0]])]
    counts = count_states(model, batches)
    # relu sees the inputs: neuron 0: +1 +2 -1; neuron 1: exact zeros; neuron 2: -1 -3 +5.
    assert counts["relu"].n_on.tolist() == [2, 0, 1]
    assert counts["relu"].n_off.tolist() == [1, 0, 2]
    # relu_1 sees relu(x) W^T + b: rows (1, .5), (2, .5), (0, -4.5); the exact 0 is not counted.
    assert counts["relu_1"].n_on.tolist() == [2, 2]
    assert counts["relu_1"].n_off.tolist() == [0, 1]

    def h2(p: float) -> float:
        return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))

    entropy = measure_entropy(model, batches)
    assert entropy["relu"] == pytest.approx((h2(2 / 3) + 0.0 + h2(1 / 3)) / 3, abs=1e-12)
    assert entropy["relu_1"] == pytest.approx(h2(2 / 3) / 2, abs=1e-12)


def test_linearize_and_fold_a_modularized_model() -> None:
    model = random_net(1)
    x = torch.randn(4, 3, 8, 8)
    y = torch.randn(5, 3, 8, 8)  # not the input the fold sees
    modular = modularize(model)
    linearize(modular, ["block.relu_1", "gelu", "leaky_relu"])

    def linearized(x: torch.Tensor) -> torch.Tensor:
        """What linearizing means, written against the original: those calls become identity."""
        h = F.relu(model.bn(model.stem(x)))
        b = model.block
        h = (h + b.bn2(b.conv2(torch.relu(b.bn1(b.conv1(h)))))).mean((2, 3))
        h = F.hardtanh(model.fc3(model.fc2(model.fc1(h))), 0.0, 6.0)
        return model.head(F.hardtanh(h))

    with torch.no_grad():
        assert torch.allclose(modular(x), linearized(x), atol=1e-6)
        expected = linearized(y)
    assert len(find_sites(modular)) == 3
    for policy in ("macs", "all"):
        folded = fold(modular, x, policy)
        report = folded.fold_report
        assert report.exact, report.markdown()  # BN folds, fc1 + fc2 + fc3 in one linear
        assert sum(isinstance(m, nn.Linear) for m in folded.modules()) == 2
        with torch.no_grad():
            assert_matches(folded(y), expected, policy)


def test_silenced_functional_relu_branch_is_removed() -> None:
    modular = modularize(random_net(2))
    silence(modular, ["block.relu"])
    x = torch.randn(2, 3, 8, 8)
    folded = fold(modular, x)
    assert folded.fold_report.removed_branches == ["block.relu"]
    # The dead branch leaves a per-channel constant (bn2 of conv2 of zeros): exactly foldable.
    assert folded.fold_report.exact, folded.fold_report.markdown()
    y = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_matches(folded(y), modular(y))


def test_mixed_modules_and_functions_keep_forward_order() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.act = nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(F.silu(x)))

    with pytest.raises(SiteError, match=r"1 functional activation\(s\) found \(silu\)"):
        find_sites(Mixed())
    assert find_sites(modularize(Mixed())) == ["silu", "act"]


def test_model_without_rectifier_says_what_it_found() -> None:
    class Smooth(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.gate = nn.Sigmoid()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(torch.tanh(self.fc(x)))

    for call in (find_sites, modularize):
        with pytest.raises(SiteError, match=r"no rectifier sites.*Sigmoid, tanh\(\)"):
            call(Smooth())


def test_untraceable_model_gets_a_clear_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.fc(x)) if x.sum() > 0 else torch.relu(x)

    with pytest.raises(SiteError, match="modularize needs a torch.fx trace.*tracing failed"):
        modularize(Branchy())
    with pytest.raises(SiteError, match="no rectifier modules.*could not trace"):
        find_sites(Branchy())


def test_argument_computed_in_forward_is_refused() -> None:
    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(self.fc(x), negative_slope=x.size(1) / 10)

    with pytest.raises(SiteError, match=r"leaky_relu \(arguments computed in forward "
                                        r"\(negative_slope\)\)"):
        modularize(Computed())
