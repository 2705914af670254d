"""Finding rectifier sites in forward order, and linearizing them."""

import pytest
import torch
from torch import nn

from depthcut import build_model, count_states, find_sites, linearize
from depthcut.fold import fold
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


class SharedLayer(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


class SharedAcrossDepth(nn.Module):
    """One layer, activation and weights alike, applied at every depth (as ALBERT does), and a
    shape check in forward that torch.fx cannot trace (transformers check shapes too)."""

    def __init__(self, width: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.layer = SharedLayer(width)
        self.depth = depth
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 4:
            raise ValueError("expected 4 features")
        hidden = self.embed(x)
        for _ in range(self.depth):
            hidden = self.layer(hidden)
        return self.head(hidden.mean(1))


def test_a_shared_site_is_linearized_at_every_place_and_folds_exactly():
    torch.manual_seed(0)
    model = SharedAcrossDepth().eval()
    x = torch.randn(2, 5, 4)
    with pytest.warns(UserWarning, match="registration order"):
        sites = find_sites(model)
    assert sites == ["layer.act"]
    with pytest.warns(UserWarning, match=r"layer.act \(3 places\)"):
        counts = count_states(model, [x], sites)["layer.act"]
    assert counts.places == 3 and int((counts.n_on + counts.n_off).sum()) == 3 * 2 * 5 * 16
    linear = linearize(model, sites)
    with torch.no_grad():
        hidden = linear.embed(x)
        for _ in range(3):
            hidden = hidden + linear.layer.fc2(linear.layer.fc1(hidden))
        assert torch.allclose(linear(x), linear.head(hidden.mean(1)))  # no GELU at any depth
    folded = fold(linear, x)
    report = folded.fold_report
    assert report.exact and report.agrees_in_float64 and not report.unfolded_parts
    assert report.macs_after < report.macs_before / 10  # every depth collapsed into one op
