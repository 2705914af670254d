"""VGG-16 with BatchNorm, CIFAR variant (METHODS section 8): 15 sites, Table 4 lr 0.01."""

from __future__ import annotations

from torch import Tensor, nn

from depthcut.models.parts import architecture_family, make_activation, scaled
from depthcut.models.registry import register_family

VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)


class VGG16(nn.Module):
    """VGG-16 with BatchNorm, CIFAR variant: 13 conv3x3-BN-act sites + 2 classifier sites = 15.

    Five 2x2 max-pools take 32x32 to 1x1, so the classifier reads 512w features. Dropout after
    each hidden classifier activation is optional (`dropout`, off by default); in eval mode it
    is a no-op that `fold` drops.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out = scaled(int(item), width)
            layers += [nn.Conv2d(channels, out, 3, 1, 1, bias=False), nn.BatchNorm2d(out),
                       make_activation(activation)]
            channels = out
        self.features = nn.Sequential(*layers)
        hidden = scaled(512, width)
        head: list[nn.Module] = []
        for features_in in (channels, hidden):
            head += [nn.Linear(features_in, hidden), make_activation(activation)]
            if dropout > 0:
                head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, num_classes))
        self.classifier = nn.Sequential(*head)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


register_family(architecture_family("vgg16", VGG16, paper_lr=0.01))
