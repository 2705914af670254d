"""Neuron-state entropy against hand-computed and brute-force counts."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from depthcut import count_states, find_sites, measure_entropy, neuron_entropy
from depthcut.entropy import ENTROPY_VARIANTS, per_neuron_sum
from depthcut.sites import SiteError


def h2(p: float) -> float:
    """Binary entropy in bits, written out by hand."""
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


class HandModel(nn.Module):
    """act_a is in place on the input copy, act_b follows a fixed Linear, `never` is not called."""

    def __init__(self) -> None:
        super().__init__()
        self.act_a = nn.ReLU(inplace=True)
        self.lin = nn.Linear(3, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]))
            self.lin.bias.copy_(torch.tensor([0.0, 0.5]))
        self.act_b = nn.ReLU()
        self.never = nn.ReLU()
        self.use_never = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act_a(x * 1.0)
        out = self.act_b(self.lin(y))
        return self.never(out) if self.use_never else out


BATCHES = [
    torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -3.0]]),
    (torch.tensor([[-1.0, 0.0, 5.0]]), torch.tensor([0])),  # (input, target) pair
]


def test_hand_computed_case():
    model = HandModel()
    counts = count_states(model, BATCHES, ["act_a", "act_b", "never"])
    # act_a sees the raw inputs: neuron 0: +1 +2 -1; neuron 1: exact zeros; neuron 2: -1 -3 +5.
    # Read after the in-place op, neuron 0 would look always ON (entropy 0) instead.
    assert counts["act_a"].n_on.tolist() == [2, 0, 1]
    assert counts["act_a"].n_off.tolist() == [1, 0, 2]
    # act_b sees relu(x) @ W.T + b: rows (1, .5), (2, .5), (0, -4.5); the exact 0 is not counted.
    assert counts["act_b"].n_on.tolist() == [2, 2]
    assert counts["act_b"].n_off.tolist() == [0, 1]
    assert counts["never"] is None

    entropy = measure_entropy(model, BATCHES, ["act_a", "act_b", "never"])
    assert entropy["act_a"] == pytest.approx((h2(2 / 3) + 0.0 + h2(1 / 3)) / 3, abs=1e-12)
    assert entropy["act_b"] == pytest.approx((0.0 + h2(2 / 3)) / 2, abs=1e-12)
    assert math.isnan(entropy["never"])


def test_default_sites_and_model_restored():
    model = HandModel()
    model.train()
    model.lin.eval()  # a mixed state must come back exactly
    entropy = measure_entropy(model, BATCHES)
    assert list(entropy) == ["act_a", "act_b", "never"]
    assert model.training and not model.lin.training and model.act_a.training
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


def test_hooks_removed_after_an_error():
    model = HandModel()
    with pytest.raises(TypeError, match="batches must yield"):
        count_states(model, ["not a tensor"], ["act_a"])
    assert not model.act_a._forward_pre_hooks


def test_neuron_entropy_formula():
    n_on = torch.tensor([0, 5, 3, 0, 7])
    n_off = torch.tensor([0, 0, 3, 4, 1])
    expected = [0.0, 0.0, 1.0, 0.0, h2(7 / 8)]
    assert neuron_entropy(n_on, n_off).tolist() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (6, 9), (3, 8, 5)])
def test_counts_match_brute_force(shape):
    """Images count per channel (dim 1) over samples and positions; tokens per last dim."""
    generator = torch.Generator().manual_seed(sum(shape))
    data = [torch.randn(shape, generator=generator).round() for _ in range(3)]  # many exact zeros
    model = nn.Sequential(nn.ReLU())
    counts = count_states(model, data, ["0"])["0"]
    stacked = np.concatenate([d.numpy() for d in data])
    channel_axis = 1 if len(shape) == 4 else len(shape) - 1
    moved = np.moveaxis(stacked, channel_axis, 0).reshape(shape[channel_axis], -1)
    assert counts.n_on.tolist() == (moved > 0).sum(1).tolist()
    assert counts.n_off.tolist() == (moved < 0).sum(1).tolist()
    assert (moved == 0).any()


def test_always_on_and_always_off_neurons():
    model = nn.Sequential(nn.ReLU())
    data = [torch.tensor([[1.0, -1.0, 0.0, 2.0], [3.0, -2.0, 0.0, -1.0]])]
    counts = count_states(model, data, ["0"])["0"]
    assert counts.always_on().tolist() == [True, False, False, False]
    assert counts.always_off().tolist() == [False, True, True, False]


class SharedAct(nn.Module):
    """One activation module at two places (as ALBERT shares its layer across depth); the
    second call reads the first's output shifted, so the two places see different values."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.head = nn.Linear(width, 2)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)) - 1)))


def _places_counts(model: SharedAct, data: list[torch.Tensor]) -> tuple[list, list]:
    """Each call's ON/OFF counts per neuron, summed over the batches, read by hand."""
    first = [model.fc1(x) for x in data]
    second = [model.fc2(torch.relu(z) - 1) for z in first]
    return ([sum(((z > 0).sum(0) for z in zs), torch.zeros(3, dtype=torch.long))
             for zs in (first, second)],
            [sum(((z < 0).sum(0) for z in zs), torch.zeros(3, dtype=torch.long))
             for zs in (first, second)])


@pytest.mark.parametrize("variant", ENTROPY_VARIANTS)
def test_a_shared_module_is_one_site_pooling_its_calls(variant: str) -> None:
    torch.manual_seed(0)
    model = SharedAct().eval()
    data = [torch.randn(5, 3), torch.randn(7, 3)]
    with pytest.warns(UserWarning, match="one shared site"):
        assert find_sites(model) == ["act"]
    with pytest.warns(UserWarning, match=r"act \(2 places\)"):
        counts = count_states(model, data, ["act"], variant=variant)["act"]
    assert not model.act._forward_pre_hooks
    with torch.no_grad():
        (on1, on2), (off1, off2) = _places_counts(model, data)
    assert counts.places == 2
    assert counts.n_on.tolist() == (on1 + on2).tolist()  # no pre-activation is exactly 0
    assert (counts.n_on + counts.n_off).tolist() == (on1 + on2 + off1 + off2).tolist()
    if variant == "easier-code":  # each batch's entropy from both calls' counts together
        with torch.no_grad():
            per_batch = [model.fc1(x) for x in data]
            per_batch = [torch.cat([z, model.fc2(torch.relu(z) - 1)]) for z in per_batch]
        expected = sum(float(neuron_entropy((z >= 0).sum(0), (z < 0).sum(0)).mean())
                       for z in per_batch) / 2
        assert counts.layer_entropy() == pytest.approx(expected)


def test_a_shared_module_with_different_widths_is_refused() -> None:
    class Widths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(self.act(x)))

    model = Widths()
    with pytest.raises(SiteError, match=r"2 places in one forward with different neuron "
                                        r"counts \(3, 4\)"):
        measure_entropy(model, [torch.randn(2, 3)], ["act"])
    assert not model.act._forward_pre_hooks


def test_train_mode_variant_and_bad_mode():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3), nn.ReLU())
    model.eval()
    data = [torch.randn(16, 3) + 3.0]
    eval_h = measure_entropy(model, data, ["2"])  # fresh BN stats: z > 0 nearly always
    running_mean = model[1].running_mean.clone()
    train_h = measure_entropy(model, data, ["2"], mode="train")  # batch stats: centred, mixed
    assert train_h["2"] > eval_h["2"]
    assert not model.training
    assert torch.equal(model[1].running_mean, running_mean)
    with pytest.raises(ValueError, match="mode"):
        measure_entropy(model, data, ["2"], mode="test")


@pytest.mark.parametrize("shape, dim, channels_last", [
    ((4, 5, 6, 7), 1, True), ((4, 5, 6, 7), 1, False), ((4, 9, 5), 2, False),
    ((4, 5, 9), 1, False), ((6, 5), 1, False), ((4, 5, 6, 7), 1, "sliced")])
def test_per_neuron_sum_equals_the_sum_over_every_other_axis(shape, dim, channels_last):
    """The fast views give exactly torch's sum over all axes but the neuron axis, for signs
    (float) and comparisons (bool), in every memory layout a site can see."""
    z = torch.randn(*shape)
    if channels_last is True:
        z = z.contiguous(memory_format=torch.channels_last)
    elif channels_last == "sliced":  # neither contiguous nor channels_last
        z = torch.randn(shape[0], shape[1], shape[2], 2 * shape[3])[..., ::2]
    others = [d for d in range(z.dim()) if d != dim]
    assert torch.equal(per_neuron_sum(torch.sign(z), dim), torch.sign(z).sum(dim=others))
    assert torch.equal(per_neuron_sum(z > 0, dim), (z > 0).sum(dim=others))


def test_per_neuron_sum_is_exact_under_bf16_autocast():
    """Sign sums are counts: 3001 ON neurons must read 3001, not bf16's nearest (3008)."""
    signs = torch.ones(3001, 4).contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = per_neuron_sum(signs, 1)
    assert total.dtype == torch.float32 and torch.equal(total, torch.full((4,), 3001.0))


def test_counts_agree_in_every_memory_layout_with_one_scratch_buffer():
    """The sign buffer is shared by every site and reused across batches; channels_last maps
    keep their strides in it. Counts must equal the contiguous model's exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(4 * 7 * 7, 6), nn.ReLU())
    batches = [torch.randn(5, 3, 16, 16) for _ in range(3)] + [torch.randn(2, 3, 16, 16)]
    plain = count_states(model, batches)
    last = count_states(model.to(memory_format=torch.channels_last),
                        [b.contiguous(memory_format=torch.channels_last) for b in batches])
    for site, counts in plain.items():
        assert torch.equal(counts.n_on, last[site].n_on), site
        assert torch.equal(counts.n_off, last[site].n_off), site
        positions = {"1": 17 * 16 * 16, "3": 17 * 7 * 7, "6": 17}[site]  # per neuron
        assert torch.all(counts.n_on + counts.n_off == positions), site  # each counted once
