"""Models depthcut did not define: shared activation modules split, stem adapted to 32x32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthcut.external import adapt_stem, build_external, unshare_activations
from depthcut.fold import fold
from depthcut.sites import find_sites, linearize


class TorchvisionLikeBlock(nn.Module):
    """Like torchvision's BasicBlock: one `relu` module called twice."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class TorchvisionLikeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(TorchvisionLikeBlock(8), TorchvisionLikeBlock(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_shared_activations_are_split_and_the_function_kept():
    model = TorchvisionLikeNet().eval()
    with pytest.raises(ValueError, match="called more than once"):
        find_sites(model)
    split = unshare_activations(model).eval()
    sites = find_sites(split)
    assert len(sites) == 5 and "layer1.0.relu_2" in sites
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(split(x), model(x))
    linearize(split, ["layer1.0.relu_2"])
    folded = fold(split, x)
    assert folded.fold_report.relative_error < 1e-5


def test_stem_adapted_to_small_images():
    model = adapt_stem(TorchvisionLikeNet(), in_channels=1)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


def test_torchvision_resnet18_when_installed():
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or present but broken beside this torch
        pytest.skip("torchvision cannot be imported here")
    model = build_external("torchvision:resnet18", num_classes=10, in_channels=3).eval()
    assert len(find_sites(model)) == 17
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
