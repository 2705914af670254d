"""A forward with control flow is not refused whole: each traceable child is folded on its own
and the report names what stayed unfolded."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from depthcut.fold import FoldError, fold
from depthcut.sites import linearize
from tests.helpers import one_thread, randomize_batchnorm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU())


class Untraceable(nn.Module):
    """Branches on the data, so torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) if x.mean() > 0 else -self.conv(x)


class ControlFlowNet(nn.Module):
    """Top-level forward with `if x.sum() > 0`; traceable stem and head, an untraceable middle
    and a child called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(3, 8), conv_bn_relu(8, 8))
        self.middle = Untraceable()
        self.twice = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * 16, 16), nn.ReLU(),
                                  nn.Linear(16, 4))

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        if x.sum() > 0:
            x = self.middle(x)
        x = self.twice(self.twice(x))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 4))


def model() -> nn.Module:
    torch.manual_seed(0)
    net = ControlFlowNet()
    randomize_batchnorm(net, torch.Generator().manual_seed(1))
    return net.eval()


def test_traceable_children_fold_and_the_rest_is_named() -> None:
    net, x = model(), torch.randn(4, 3, 8, 8)
    folded = fold(net, x)
    report = folded.fold_report
    taken = [name for merge in report.merges if merge.taken for name in merge.replaces]
    assert {"stem.0.0", "stem.0.1", "stem.1.0", "stem.1.1"} <= set(taken)  # BNs into convs
    assert not any(name.startswith(("twice", "middle")) for name in taken)
    unfolded = "; ".join(report.unfolded_parts)
    assert "the model (ControlFlowNet) (cannot trace" in unfolded
    assert "middle (cannot trace" in unfolded and "twice (called 2 times)" in unfolded
    assert "left unfolded" in report.markdown()
    assert report.exact and report.relative_error < 1e-5
    assert torch.allclose(folded(x), net(x), atol=1e-5)
    assert isinstance(folded, ControlFlowNet)  # the model's own forward, parts replaced
    assert net.stem[0][1].__class__ is nn.BatchNorm2d  # the user's model is untouched


def test_linear_sites_in_a_traceable_child_fold_into_fewer_ops() -> None:
    net, x = model(), torch.randn(4, 3, 8, 8)
    linearize(net, ["head.2"])
    folded = fold(net, x)
    report = folded.fold_report
    assert report.ops_after < report.ops_before and report.macs_after < report.macs_before
    assert torch.allclose(folded(x), net(x), atol=1e-5)


def test_a_model_without_a_traceable_part_is_still_refused() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)  # a leaf: one op, nothing to fold on its own

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(FoldError, match="cannot trace"):
        fold(Branchy(), torch.randn(2, 3))


def test_a_traceable_part_with_nothing_to_merge_gives_a_report() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 3), nn.ReLU())

        def forward(self, x: Tensor) -> Tensor:
            return self.body(x) if x.sum() > 0 else x

    model, x = Branchy().eval(), torch.ones(2, 3)
    report = fold(model, x).fold_report
    assert not any(merge.taken for merge in report.merges)
    assert report.unfolded_parts and report.relative_error == 0.0
