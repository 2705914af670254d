"""The model-family seam: a family registered from outside depthcut builds through `ModelSpec`,
answers the presets' questions (paper lr, default activation, image size), and leaves no trace
once unregistered; the built-in families keep their names, order and Table 4 rates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthcut.errors import ConfigError
from depthcut.models import (
    MODELS,
    PAPER_LR,
    PAPER_LR_OTHER,
    ModelFamily,
    ModelSpec,
    default_activation,
    find_family,
    paper_lr,
    register_family,
    takes_image_size,
    unregister_family,
)

UNKNOWN = ("unknown model 'toy:small'; choose one of resnet18, vgg16, mobilenetv2, swin-t, "
           "transformer, or torchvision:NAME / timm:NAME when those are installed, or your own "
           "model as path/to/file.py:FACTORY or package.module:FACTORY")


def build_toy(spec: ModelSpec) -> nn.Module:
    """A two-layer MLP whose hidden size is the name after "toy:" ("small": 8)."""
    hidden = {"small": 8, "large": 32}[spec.name.removeprefix("toy:")]
    return nn.Sequential(nn.Flatten(), nn.Linear(spec.in_channels * 4 * 4, hidden), nn.ReLU(),
                         nn.Linear(hidden, spec.num_classes))


@pytest.fixture
def toy_family():
    family = register_family(ModelFamily(name="toy", build=build_toy, prefix="toy:",
                                         paper_lr=0.05, default_activation="relu"))
    try:
        yield family
    finally:
        unregister_family("toy")


def test_a_family_registered_outside_builds_through_the_spec(toy_family):
    model = ModelSpec(name="toy:small", num_classes=3, in_channels=2).build()
    assert model[1].out_features == 8 and model(torch.randn(5, 2, 4, 4)).shape == (5, 3)
    assert find_family("toy:large") is toy_family
    assert paper_lr("toy:small") == 0.05 and default_activation("toy:small") == "relu"
    assert not takes_image_size("toy:small")
    assert "toy" not in MODELS and "toy" not in PAPER_LR  # prefix families are not listed there


def test_unregistered_family_is_unknown_again(toy_family):
    unregister_family("toy")
    with pytest.raises(ConfigError) as error:
        ModelSpec(name="toy:small").build()
    assert str(error.value) == UNKNOWN
    assert paper_lr("toy:small") == PAPER_LR_OTHER and default_activation("toy:small") is None


def test_a_name_or_prefix_is_registered_once(toy_family):
    for clash in (ModelFamily(name="toy", build=build_toy),
                  ModelFamily(name="toy2", build=build_toy, prefix="toy:"),
                  ModelFamily(name="resnet18", build=build_toy)):
        with pytest.raises(ConfigError, match="registered already"):
            register_family(clash)


def test_built_in_families_keep_names_order_and_table_4_rates():
    assert list(MODELS) == ["resnet18", "vgg16", "mobilenetv2", "swin-t", "transformer"]
    assert PAPER_LR == {"resnet18": 0.1, "mobilenetv2": 0.1, "vgg16": 0.01, "swin-t": 0.001}
    assert paper_lr("transformer") == paper_lr("timm:resnet18") == PAPER_LR_OTHER == 0.1
    assert [default_activation(name) for name in MODELS] == ["relu", "relu", "relu6", "gelu",
                                                              "gelu"]
    assert all(takes_image_size(n) for n in ("timm:x", "torchvision:x", "hf:bert"))
    assert not any(takes_image_size(n) for n in (*MODELS, "timm", "nope"))
