"""CIFAR ResNet-18 (METHODS section 8): 17 sites, EASIER Table 4 lr 0.1."""

from __future__ import annotations

from torch import Tensor, nn

from depthcut.models.parts import architecture_family, make_activation, scaled
from depthcut.models.registry import register_family


class BasicBlock(nn.Module):
    """ResNet basic block with its own two activation sites: after bn1, and after the add."""

    def __init__(self, in_channels: int, channels: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )
        self.act2 = make_activation(activation)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """CIFAR ResNet-18 as in the EASIER/EGP papers: 3x3 stride-1 stem, max-pool, 17 sites."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        activation: str = "relu",
        maxpool: bool = True,
    ) -> None:
        super().__init__()
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.act = make_activation(activation)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if maxpool else nn.Identity()
        layers, channels_in = [], stem
        for index, (channels, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
            channels = scaled(channels, width)
            blocks = nn.Sequential(
                BasicBlock(channels_in, channels, stride, activation),
                BasicBlock(channels, channels, 1, activation),
            )
            layers.append((f"layer{index + 1}", blocks))
            channels_in = channels
        for name, blocks in layers:
            self.add_module(name, blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels_in, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.act(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


register_family(architecture_family("resnet18", ResNet18, paper_lr=0.1))
