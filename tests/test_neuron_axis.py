"""The neuron axis comes from the op that produced the pre-activation: channels of Conv1d and
Conv3d maps, the last dimension of Linear outputs on (N, T, D) tokens, for counting and for
freezing (the ChannelScale of a zero-entropy site) alike. Entropies are computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from depthcut.entropy import count_states, measure_entropy
from depthcut.layers import ChannelScale
from depthcut.neuron_axis import neuron_axes
from depthcut.sites import freeze
from tests.helpers import one_thread  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

H_QUARTER = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # p(ON) = 1/4: 0.811 bits


def _signs_conv(conv: nn.Module) -> nn.Module:
    """Channel 0 always ON (bias +10), channel 1 always OFF (bias -10), channel 2 copies input
    channel 0 (1x1 tap), whose sign the test sets."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[2, 0].view(-1)[0] = 1.0
        conv.bias.copy_(torch.tensor([10.0, -10.0, 0.0]))
    return conv


def test_conv1d_site_counts_channels() -> None:
    model = nn.Sequential(_signs_conv(nn.Conv1d(1, 3, 1)), nn.ReLU())
    x = torch.tensor([[[1.0, -1.0, -2.0, -3.0]], [[2.0, -1.0, -1.0, -1.0]]])  # (N=2, C=1, L=4)
    assert neuron_axes(model, ["1"]) == {"1": 1}
    counts = count_states(model, [x])["1"]
    assert counts.n_on.tolist() == [8, 0, 2] and counts.n_off.tolist() == [0, 8, 6]
    assert measure_entropy(model, [x])["1"] == pytest.approx(H_QUARTER / 3)
    # Taken as tokens (last dim, the rank rule), the 4 positions would be the neurons:
    per_position = measure_entropy(model, [x], channel_dim=-1)["1"]
    assert per_position != pytest.approx(H_QUARTER / 3)


def test_conv3d_site_counts_channels() -> None:
    model = nn.Sequential(_signs_conv(nn.Conv3d(1, 3, 1)), nn.ReLU())
    x = -torch.ones(2, 1, 2, 2, 2)
    x[:, :, 0, 0, :] = 1.0  # 2 of 8 positions ON in each sample: p(ON) = 1/4 for channel 2
    assert neuron_axes(model, ["1"]) == {"1": 1}
    assert measure_entropy(model, [x])["1"] == pytest.approx(H_QUARTER / 3)


def test_linear_site_on_tokens_counts_the_last_dimension() -> None:
    """(N, T, D) tokens through Linear: D neurons, every token a sample."""
    linear = nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[2, 0] = 1.0
        linear.bias.copy_(torch.tensor([10.0, -10.0, 0.0]))
    model = nn.Sequential(linear, nn.ReLU())
    x = -torch.ones(2, 4, 2)  # (N=2, T=4, D=2)
    x[:, 0, 0] = 1.0  # token 0 of each sample: neuron 2 ON in 2 of 8 tokens
    assert neuron_axes(model, ["1"]) == {"1": -1}
    counts = count_states(model, [x])["1"]
    assert counts.n_on.tolist() == [8, 0, 2]
    assert measure_entropy(model, [x])["1"] == pytest.approx(H_QUARTER / 3)


def test_batchnorm_after_conv1d_and_the_producer_through_no_ops() -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Dropout(), nn.ReLU(),
                          nn.Flatten(), nn.ReLU())
    assert neuron_axes(model, ["3", "5"]) == {"3": 1, "5": None}  # Flatten: not a producer


def test_freeze_takes_the_same_axis_as_counting() -> None:
    """A Conv1d site with channel 0 always ON and channels 1, 2 always OFF (LeakyReLU 0.1):
    its ChannelScale scales channels, so the frozen model computes what the site did."""
    conv = _signs_conv(nn.Conv1d(1, 3, 1))
    with torch.no_grad():
        conv.bias[2] = -10.0
    model = nn.Sequential(conv, nn.LeakyReLU(0.1))
    x = torch.randn(2, 1, 5)
    expected = model(x)
    counts = count_states(model, [x])["1"]
    assert counts.always_on().tolist() == [True, False, False]
    assert freeze(model, {"1": counts.always_on()}) == {"1": "scale"}
    assert isinstance(model[1], ChannelScale) and model[1].channel_dim(3) == 1
    assert torch.allclose(model(x), expected)
