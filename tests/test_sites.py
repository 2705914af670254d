"""Finding rectifier sites in forward order, and linearizing them."""

import pytest
import torch
from torch import nn

from depthcut import build_model, find_sites, linearize
from depthcut.sites import SiteError


def resnet18_sites() -> list[str]:
    blocks = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    return ["act"] + [f"{block}.{act}" for block in blocks for act in ("act1", "act2")]


def test_resnet18_has_17_sites_in_forward_order():
    model = build_model("resnet18", width=0.125)
    assert find_sites(model) == resnet18_sites()


def test_forward_order_differs_from_registration_order():
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.late = nn.GELU()
            self.early = nn.SiLU()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.late(self.lin(self.early(x)))

    assert find_sites(Reversed()) == ["early", "late"]


def test_untraceable_model_falls_back_to_registration_order():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.ReLU()
            self.b = nn.LeakyReLU()

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else self.b(x)

    with pytest.warns(UserWarning, match="registration order"):
        assert find_sites(DataDependent()) == ["a", "b"]


def test_linearize_replaces_only_the_named_sites():
    torch.manual_seed(0)
    model = build_model("resnet18", width=0.125).eval()
    linearize(model, ["layer1.0.act1", "layer4.1.act2"])
    assert isinstance(model.layer1[0].act1, nn.Identity)
    assert isinstance(model.layer4[1].act2, nn.Identity)
    kept = [s for s in resnet18_sites() if s not in ("layer1.0.act1", "layer4.1.act2")]
    assert find_sites(model) == kept
    assert all(isinstance(model.get_submodule(s), nn.ReLU) for s in kept)
    x = torch.randn(2, 3, 32, 32)
    features = model.layer4(model.layer3(model.layer2(model.layer1(model.maxpool(
        model.act(model.bn1(model.conv1(x))))))))
    assert (features < 0).any()  # the last activation is gone: negative outputs pass through


def test_linearize_errors_name_the_problem():
    model = build_model("resnet18", width=0.125)
    with pytest.raises(SiteError, match="no such module: nope"):
        linearize(model, ["nope"])
    with pytest.raises(SiteError, match="not a rectifier site: conv1"):
        linearize(model, ["conv1"])
    linearize(model, ["act"])
    with pytest.raises(SiteError, match="not a rectifier site: act"):
        linearize(model, ["act"])


def test_model_without_sites_is_refused():
    with pytest.raises(SiteError, match="no rectifier sites"):
        find_sites(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
