"""Entropy variants (paper, easier-code, egp-code) and the channel axis of 3-D inputs, by hand."""

import math

import pytest
import torch
from torch import nn

import depthcut.distributed as distributed_module
import depthcut.entropy as entropy_module
from depthcut.entropy import (
    ENTROPY_VARIANTS,
    BatchAveragedCounts,
    SiteCounts,
    count_states,
    measure_entropy,
)

torch.set_num_threads(1)


def h2(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


# Three batches of (N, C=3) pre-activations for one ReLU site, with exact zeros.
BATCHES = [
    torch.tensor([[1.0, -1.0, 2.0], [0.0, -2.0, -1.0]]),
    torch.tensor([[-1.0, -3.0, 0.0], [1.0, 0.0, 0.0]]),
    torch.tensor([[-1.0, -1.0, -1.0]]),  # no channel mixed within this batch
]


def relu_site():
    return nn.Sequential(nn.ReLU())


def test_paper_variant_hand_computed_and_default():
    # Zeros excluded. col0: on 1+1+0, off 0+1+1; col1: off 2+1+1; col2: on 1, off 1+0+1.
    counts = count_states(relu_site(), BATCHES, ["0"])["0"]
    assert type(counts) is SiteCounts
    assert counts.n_on.tolist() == [2, 0, 1]
    assert counts.n_off.tolist() == [2, 4, 2]
    expected = (h2(2 / 4) + 0.0 + h2(1 / 3)) / 3
    assert measure_entropy(relu_site(), BATCHES)["0"] == pytest.approx(expected, abs=1e-12)
    assert measure_entropy(relu_site(), BATCHES, variant="paper")["0"] == pytest.approx(
        expected, abs=1e-12
    )


def test_easier_code_variant_hand_computed():
    # z >= 0 is ON. Per batch p_on per channel, then mean entropy over channels:
    # batch 1: p = (1, 0, 1/2) -> (0 + 0 + 1) / 3; batch 2: p = (1/2, 1/2, 1) -> (1 + 1 + 0) / 3;
    # batch 3: p = (0, 0, 0) -> 0. Layer entropy = mean over the three batches = 1/3.
    counts = count_states(relu_site(), BATCHES, ["0"], variant="easier-code")["0"]
    assert isinstance(counts, BatchAveragedCounts) and counts.variant == "easier-code"
    assert counts.n_on.tolist() == [3, 1, 3]
    assert counts.n_off.tolist() == [2, 4, 2]
    assert counts.batches == 3
    assert counts.layer_entropy() == pytest.approx(1 / 3, abs=1e-12)
    h = measure_entropy(relu_site(), BATCHES, variant="easier-code")["0"]
    assert h == pytest.approx(1 / 3, abs=1e-12)
    # Not a function of the totals: the pooled entropy of the same counts differs.
    assert float(counts.neuron_entropy().mean()) != pytest.approx(1 / 3, abs=1e-3)


def test_egp_code_variant_hand_computed():
    # z > 0 is ON, zeros OFF. Per batch, mean entropy over mixed channels (0 < p < 1) only:
    # batch 1: p = (1/2, 0, 1/2) -> mixed 0 and 2 -> 1; batch 2: p = (1/2, 0, 0) -> 1;
    # batch 3: nothing mixed -> 0. Mean over the three batches = 2/3.
    counts = count_states(relu_site(), BATCHES, ["0"], variant="egp-code")["0"]
    assert isinstance(counts, BatchAveragedCounts) and counts.variant == "egp-code"
    assert counts.n_on.tolist() == [2, 0, 1]
    assert counts.n_off.tolist() == [3, 5, 4]
    assert counts.layer_entropy() == pytest.approx(2 / 3, abs=1e-12)
    # A constant channel drags the paper's mean down but is left out by egp-code.
    one = [torch.tensor([[1.0, -1.0], [-1.0, -2.0]])]
    assert measure_entropy(relu_site(), one)["0"] == pytest.approx(0.5, abs=1e-12)
    assert measure_entropy(relu_site(), one, variant="egp-code")["0"] == pytest.approx(1.0)


def test_variants_count_in_train_mode_and_restore_the_model():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU())
    model.eval()
    mean = model[1].running_mean.clone()
    data = [torch.randn(8, 3, generator=torch.Generator().manual_seed(0)) + 3.0]
    for variant in ENTROPY_VARIANTS:
        h = measure_entropy(model, data, ["2"], mode="train", variant=variant)["2"]
        assert 0.0 < h <= 1.0  # batch statistics centre z: mixed states
    assert not model.training and torch.equal(model[1].running_mean, mean)


def test_unreached_site_is_none_and_nan_for_variants():
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.ReLU(), nn.ReLU()

        def forward(self, x):
            return self.a(x)

    for variant in ENTROPY_VARIANTS:
        assert count_states(Skip(), BATCHES, ["a", "b"], variant=variant)["b"] is None
        assert math.isnan(measure_entropy(Skip(), BATCHES, ["a", "b"], variant=variant)["b"])


def conv1d_model() -> nn.Sequential:
    """Conv1d with two constant channels on positive inputs: channel 0 always ON, 1 always OFF."""
    conv = nn.Conv1d(1, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0]], [[-1.0]]]))
    return nn.Sequential(conv, nn.ReLU())


CONV1D_DATA = [torch.rand(4, 1, 5) + 0.5, torch.rand(2, 1, 5) + 0.5]  # (N, C=1, L=5), all > 0


@pytest.mark.parametrize("variant", ENTROPY_VARIANTS)
def test_conv1d_maps_counted_along_channels(variant):
    per_channel = measure_entropy(conv1d_model(), CONV1D_DATA, variant=variant, channel_dim=1)
    assert per_channel["1"] == 0.0
    by_name = measure_entropy(conv1d_model(), CONV1D_DATA, variant=variant, channel_dim={"1": 1})
    assert by_name["1"] == 0.0
    # By default the axis comes from the producing op (Conv1d: channels), as above ...
    assert measure_entropy(conv1d_model(), CONV1D_DATA, variant=variant)["1"] == 0.0
    # ... where the rank rule alone would take (N, T, C): 5 "neurons" along L, each half ON.
    by_rank = measure_entropy(conv1d_model(), CONV1D_DATA, variant=variant, channel_dim=-1)
    assert by_rank["1"] == pytest.approx(1.0)
    counts = count_states(conv1d_model(), CONV1D_DATA, channel_dim=1)["1"]
    assert counts.n_on.tolist() == [30, 0] and counts.n_off.tolist() == [0, 30]


def test_tokens_default_to_the_last_dim():
    tokens = torch.rand(2, 3, 2) + 0.5  # (N, T=3, C=2)
    tokens[..., 1] *= -1  # channel 0 always ON, channel 1 always OFF
    model = relu_site()
    default = count_states(model, [tokens], ["0"])["0"]
    assert default.n_on.tolist() == [6, 0] and default.n_off.tolist() == [0, 6]
    assert measure_entropy(model, [tokens])["0"] == 0.0
    assert measure_entropy(model, [tokens], channel_dim=-1)["0"] == 0.0
    assert measure_entropy(model, [tokens], channel_dim=2)["0"] == 0.0
    assert measure_entropy(model, [tokens], channel_dim=1)["0"] == pytest.approx(1.0)


def test_bad_variant_and_bad_channel_dim():
    with pytest.raises(ValueError, match="paper.*easier-code.*egp-code"):
        measure_entropy(relu_site(), BATCHES, variant="easier")
    model = relu_site()
    x = [torch.randn(2, 3, 4)]
    for bad in (3, -4, 0, -3):
        with pytest.raises(ValueError, match="channel_dim"):
            measure_entropy(model, x, channel_dim=bad)
        assert not model[0]._forward_pre_hooks
    with pytest.raises(ValueError, match="not counted"):
        measure_entropy(model, x, channel_dim={"nope": 1})
    with pytest.raises(ValueError, match="must be an int"):
        measure_entropy(model, x, channel_dim="1")
    with pytest.raises(ValueError, match="must be an int"):
        measure_entropy(model, x, channel_dim={"0": 1.0})


@pytest.mark.parametrize("variant", ENTROPY_VARIANTS)
def test_ranks_are_summed(monkeypatch, variant):
    """Two ranks that counted the same shard: counts double, the layer entropy is unchanged."""
    calls = []

    def fake_all_reduce(tensor, op=None):
        calls.append(op)
        if op != torch.distributed.ReduceOp.MAX:
            tensor.mul_(2)

    monkeypatch.setattr(torch.distributed, "all_reduce", fake_all_reduce)
    single = count_states(relu_site(), BATCHES, ["0"], variant=variant)["0"]
    monkeypatch.setattr(entropy_module, "world_size", lambda: 2)
    monkeypatch.setattr(distributed_module, "world_size", lambda: 2)
    both = count_states(relu_site(), BATCHES, ["0"], variant=variant)["0"]
    assert calls
    assert both.n_on.tolist() == [2 * n for n in single.n_on.tolist()]
    assert both.n_off.tolist() == [2 * n for n in single.n_off.tolist()]
    assert both.layer_entropy() == pytest.approx(single.layer_entropy(), abs=1e-12)
    if variant != "paper":
        assert both.batches == 2 * single.batches
