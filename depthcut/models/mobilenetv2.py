"""MobileNetV2, CIFAR variant (METHODS section 8): 35 sites, EASIER Table 4 lr 0.1."""

from __future__ import annotations

from torch import Tensor, nn

from depthcut.models.parts import architecture_family, make_activation, scaled
from depthcut.models.registry import register_family


class ConvBNAct(nn.Sequential):
    """conv-BN-activation with named children, so a site reads as e.g. `blocks.3.depthwise.act`."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, groups: int,
                 activation: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = make_activation(activation)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when t = 1), 3x3 depthwise, linear 1x1 project.

    Sites: `expand.act` (when t != 1) and `depthwise.act`; the projection has no activation
    (linear bottleneck). The residual is taken when stride is 1 and the width does not change.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, activation: str) -> None:
        super().__init__()
        hidden = c_in * expand
        self.expand: nn.Module = (
            ConvBNAct(c_in, hidden, 1, 1, 1, activation) if expand != 1 else nn.Identity()
        )
        self.depthwise = ConvBNAct(hidden, hidden, 3, stride, hidden, activation)
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False),
                                     nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: Tensor) -> Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


# (expansion t, channels c, blocks n, stride s). The ImageNet table with the stem stride and
# the first stride-2 stage (c = 24) set to stride 1, as in the CIFAR implementations the EASIER
# authors use: 32x32 -> 32 -> 32 -> 16 -> 8 -> 8 -> 4 -> 4, so the last map is 4x4.
MOBILENETV2_CIFAR: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2, CIFAR variant (stride-1 stem): 35 sites, ReLU6 by default.

    Sites: stem 1 + 17 blocks (the t = 1 block has only its depthwise site, the other 16 have
    two) + the final 1x1 conv to 1280w = 35. The final conv scales with width (the EASIER
    authors' code keeps 1280 for width < 1). Dropout 0.2 before the classifier as in that code
    (a no-op in eval, and dropped by `fold`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        activation: str = "relu6",
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        channels = scaled(32, width)
        self.stem = ConvBNAct(in_channels, channels, 3, 1, 1, activation)
        blocks: list[nn.Module] = []
        for expand, c, n, s in MOBILENETV2_CIFAR:
            for index in range(n):
                out = scaled(c, width)
                blocks.append(InvertedResidual(channels, out, s if index == 0 else 1, expand,
                                               activation))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        last = scaled(1280, width)
        self.last = ConvBNAct(channels, last, 1, 1, 1, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.last(self.blocks(self.stem(x)))
        return self.fc(self.dropout(self.pool(x).flatten(1)))


register_family(architecture_family("mobilenetv2", MobileNetV2, paper_lr=0.1))
