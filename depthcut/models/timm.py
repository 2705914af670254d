"""timm's models as a family: `--model timm:NAME[:options]` (`library`)."""

from __future__ import annotations

from torch import nn

from depthcut.models.library import Library, register_library


def create(architecture: str, num_classes: int, in_channels: int, options: dict) -> nn.Module:
    """timm's builder, random init, for `in_channels` input channels."""
    import timm

    return timm.create_model(architecture, pretrained=False, num_classes=num_classes,
                             in_chans=in_channels, **options)


register_library(Library(name="timm", package="timm", create=create,
                         image_size_argument="img_size", usage="timm:NAME"))
