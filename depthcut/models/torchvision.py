"""torchvision's models as a family: `--model torchvision:NAME[:options]` (`library`)."""

from __future__ import annotations

from torch import nn

from depthcut.models.library import Library, register_library


def create(architecture: str, num_classes: int, in_channels: int, options: dict) -> nn.Module:
    """torchvision's builder, random init (its models take 3 channels: `adapt` sets the stem's)."""
    del in_channels
    import torchvision.models

    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes,
                                        **options)


register_library(Library(name="torchvision", package="torchvision", create=create,
                         image_size_argument="image_size", usage="torchvision:NAME"))
