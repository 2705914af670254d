"""Entropy-guided pruning parts: budget arithmetic, layer discovery, persistent masks, H = 0."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from depthcut.entropy import SiteCounts
from depthcut.masks import (
    apply_masks,
    clone_model,
    effective_weight,
    global_magnitude_prune,
    make_permanent,
    masks_from_state_dict,
    masks_of,
    mean_abs_nonzero,
    nonzero_count,
    prune_group,
    prune_smallest,
    sparsity,
)
from depthcut.models import build_model
from depthcut.pruning import (
    causes_layer_collapse,
    prunable_layers,
    pruning_budget,
    zero_entropy_sites,
)
from depthcut.sites import SiteError

# --------------------------------------------------------------------------------------------
# pruning_budget


def test_budget_three_layers_with_rounding() -> None:
    # H m = [1*2, 0.5*2, 0.25*4] = [2, 1, 1]; S = 4; I = 4 / Hm = [2, 4, 4].
    # softmax: exp([2, 4, 4] - 4) = [e^-2, 1, 1] = [0.135335, 1, 1]; sum 2.135335
    #   p = [0.063379, 0.468311, 0.468311]
    # B = 0.5 * 300 = 150 -> n = [9.507, 70.247, 70.247]; floors 9 + 70 + 70 = 149
    # one unit left -> largest fractional part (0.507, layer 0) -> [10, 70, 70]
    assert pruning_budget([1.0, 0.5, 0.25], [2.0, 2.0, 4.0], [100, 100, 100]) == [10, 70, 70]


def test_budget_caps_a_layer_and_reallocates() -> None:
    # H m = [1, 1, 0.25]; S = 2.25; I = [2.25, 2.25, 9]
    # p_2 = 1 / (1 + 2 e^-6.75) = 0.99767; B = 0.5 * 2100 = 1050 -> n_2 = 1047.6 > 100: capped.
    # B = 1050 - 100 = 950 over layers 0, 1 (equal I) -> 475 each.
    assert pruning_budget([1, 1, 1], [1, 1, 0.25], [1000, 1000, 100]) == [475, 475, 100]
    # Same scores, nnz = [1000, 250, 100]: B = 675; layer 2 capped (673.4 > 100), B = 575;
    # 287.5 each -> layer 1 capped at 250, B = 325 -> all to layer 0.
    assert pruning_budget([1, 1, 1], [1, 1, 0.25], [1000, 250, 100]) == [325, 250, 100]


def test_budget_keeps_first_round_irrelevance_when_reallocating() -> None:
    # H m = [0.5, 1, 0.1]; S = 1.6; I = [3.2, 1.6, 16]; nnz = [1000, 1000, 10]; B = 1005.
    # Layer 2 takes ~all of B (p_2 = 0.99999) -> capped at 10; B = 995.
    # Kept scores: exp(3.2 - 3.2) = 1, exp(1.6 - 3.2) = 0.201897 -> p = [0.832018, 0.167982]
    #   n = [827.858, 167.142]; floors 827 + 167 = 994, +1 to layer 0 -> [828, 167]
    # (recomputing I over layers 0, 1 would give S' = 1.5, I' = [3, 1.5] and n_0 = 813.5.)
    assert pruning_budget([0.5, 1, 0.1], [1, 1, 1], [1000, 1000, 10]) == [828, 167, 10]


def test_budget_equal_scores_give_equal_shares() -> None:
    # Equal H and m -> equal I -> p = 1/4 each; B = 0.5 * 400 = 200 -> 50 each.
    assert pruning_budget([0.7] * 4, [0.3] * 4, [100] * 4) == [50, 50, 50, 50]
    # Equal shares are shares of B, not of nnz: B = 0.5 * 1000 = 500 -> 125 each; layer 0
    # (nnz 100) capped; B = 400 over 3 -> 133.33 each; floors 399, the unit left goes to the
    # earliest layer among the equal fractional parts.
    assert pruning_budget([1] * 4, [1] * 4, [100, 200, 300, 400]) == [100, 134, 133, 133]


def test_budget_huge_irrelevance_is_stable() -> None:
    # H m = [1, 1, 1e-9]; I = [~2, ~2, ~2e9]: a naive exp(2e9) overflows; p_2 = 1 after the
    # max subtraction. nnz = [100, 100, 1000]: B = 600, all to layer 2 (600 <= 1000).
    assert pruning_budget([1, 1, 1e-9], [1, 1, 1], [100, 100, 1000]) == [0, 0, 600]
    # nnz = [100, 100, 100]: B = 150 -> layer 2 capped at 100, 50 left -> 25 each.
    assert pruning_budget([1, 1, 1e-9], [1, 1, 1], [100, 100, 100]) == [25, 25, 100]
    # H m underflows to 0.0 (1e-300 * 1e-300): infinitely irrelevant, takes B = 55 whole.
    assert pruning_budget([1, 1e-300], [1, 1e-300], [10, 100]) == [0, 55]


def test_budget_temperature() -> None:
    h, m, nnz = [1.0, 0.5, 0.25], [2.0, 2.0, 4.0], [100, 100, 100]  # I = [2, 4, 4], B = 150
    # T = 2: exp([-1, 0, 0]) = [0.367879, 1, 1]; sum 2.367879 -> p = [0.155362, 0.422319, x2]
    #   n = [23.304, 63.348, 63.348]; floors 149; +1 to the largest fraction (0.348, tie ->
    #   earlier layer 1) -> [23, 64, 63]
    assert pruning_budget(h, m, nnz, temperature=2.0) == [23, 64, 63]
    # T = 0.1: exp([-20, 0, 0]) -> p_0 = 1e-9 -> n = [0.0000003, 75, 75] -> [0, 75, 75]
    assert pruning_budget(h, m, nnz, temperature=0.1) == [0, 75, 75]
    # T -> infinity: uniform -> 50 each (n_0 = 49.99999 floors to 49, then gets the unit).
    assert pruning_budget(h, m, nnz, temperature=1e6) == [50, 50, 50]


def test_budget_skips_zero_entropy_empty_and_unreached_layers() -> None:
    # Only layer 1 is in P (H = 0, NaN entropy and nnz = 0 are out): B = 0.5 * 100 = 50.
    nan = float("nan")
    assert pruning_budget([0, 1, nan, 1], [1, 1, 1, 0], [100, 100, 100, 0]) == [0, 50, 0, 0]
    assert pruning_budget([0, nan], [1, 1], [10, 10]) == [0, 0]
    assert pruning_budget([], [], []) == []


def test_budget_total_and_zeta_one() -> None:
    # zeta = 1 prunes everything in P; total = floor(zeta * sum nnz) otherwise.
    assert pruning_budget([0.3, 0.9], [0.1, 0.5], [10, 20], zeta=1.0) == [10, 20]
    n = pruning_budget([0.3, 0.9, 0.5], [0.1, 0.5, 0.2], [17, 23, 31], zeta=0.3)
    assert sum(n) == math.floor(0.3 * 71)
    assert all(0 <= a <= b for a, b in zip(n, [17, 23, 31], strict=True))


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (([1, 1], [1], [1, 1]), {}, "one entry per layer"),
        (([1], [1], [1]), {"zeta": 0.0}, "zeta"),
        (([1], [1], [1]), {"zeta": 1.5}, "zeta"),
        (([1], [1], [1]), {"temperature": 0.0}, "temperature"),
        (([-1], [1], [1]), {}, "entropy"),
        (([1], [float("nan")], [1]), {}, "mean_abs_weight"),
        (([1], [-0.1], [1]), {}, "mean_abs_weight"),
        (([1], [1], [-3]), {}, "nonzero"),
        (([1], [1], [2.5]), {}, "whole number"),
        (([1], [0.0], [5]), {}, "mean |w| = 0"),
    ],
)
def test_budget_rejects_bad_input(args, kwargs, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        pruning_budget(*args, **kwargs)


# --------------------------------------------------------------------------------------------
# prunable_layers


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", width=0.125)


def test_prunable_layers_resnet(resnet) -> None:
    layers = prunable_layers(resnet, torch.randn(1, 3, 32, 32))
    assert len(layers) == 17
    assert layers["act"] == ["conv1"]
    assert layers["layer1.0.act1"] == ["layer1.0.conv1"]
    assert layers["layer2.0.act2"] == ["layer2.0.conv2", "layer2.0.shortcut.0"]
    assert layers["layer1.1.act2"] == ["layer1.1.conv2"]
    claimed = [name for names in layers.values() for name in names]
    assert len(claimed) == len(set(claimed)) == 20  # 17 site-feeding convs + 3 projections
    assert "fc" not in claimed  # after the last site


def test_prunable_layers_sequential() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 0
        nn.BatchNorm2d(4),  # 1
        nn.ReLU(),  # 2
        nn.Conv2d(4, 4, 3, padding=1),  # 3
        nn.Dropout(0.1),  # 4
        nn.Identity(),  # 5
        nn.ReLU(),  # 6
        nn.MaxPool2d(2),  # 7
        nn.ReLU(),  # 8: fed by pooling only
        nn.Flatten(),  # 9
        nn.Linear(16, 5),  # 10
        nn.ReLU(),  # 11
    )
    assert prunable_layers(model, torch.randn(1, 3, 4, 4)) == {
        "2": ["0"], "6": ["3"], "8": [], "11": ["10"],
    }


class TwoSitesOneConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.left = nn.ReLU()
        self.right = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return self.left(y) + self.right(y)


def test_prunable_layers_refuses_a_conv_shared_by_two_sites() -> None:
    with pytest.raises(SiteError, match=r"conv feeds both site left and site right"):
        prunable_layers(TwoSitesOneConv(), torch.randn(1, 3, 5, 5))


# --------------------------------------------------------------------------------------------
# Masks


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


def pruned_small(seed: int = 0) -> Small:
    torch.manual_seed(seed)
    model = Small()
    for module in (model.conv, model.fc):
        prune_smallest(module, nonzero_count(module) // 2)
    return model


def train_steps(model: nn.Module, steps: int = 5, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(steps):
        x = torch.randn(8, 3, 6, 6, generator=g)
        y = torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_prune_smallest_prunes_the_smallest_and_combines() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    before = layer.weight.detach().abs().flatten().clone()
    prune_smallest(layer, 5)
    mask = masks_of(layer)[""].flatten()
    assert int((~mask).sum()) == 5
    assert before[~mask].max() < before[mask].min()
    assert nonzero_count(layer) == 7
    prune_smallest(layer, 3)  # combined: 8 pruned, the first 5 still among them
    mask2 = masks_of(layer)[""].flatten()
    assert int((~mask2).sum()) == 8 and bool((~mask2)[~mask].all())
    assert before[~mask2].max() < before[mask2].min()
    with pytest.raises(ValueError, match="only 4 are still unpruned"):
        prune_smallest(layer, 5)


def test_prune_smallest_breaks_ties_by_position() -> None:
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.fill_(0.5)
    prune_smallest(layer, 2)
    assert masks_of(layer)[""].tolist() == [[False, False, True], [True, True, True]]


def test_prune_group_uses_the_union() -> None:
    a, b = nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[0.5, -0.1], [3.0, 4.0]]))
        b.weight.copy_(torch.tensor([[0.2, 5.0], [-0.05, 6.0]]))
    # Union sorted by |w|: 0.05 (b), 0.1 (a), 0.2 (b), 0.5 (a), ...
    prune_group([a, b], 3)
    assert masks_of(a)[""].tolist() == [[True, False], [True, True]]
    assert masks_of(b)[""].tolist() == [[False, True], [False, True]]
    prune_group([a, b], 1)  # next smallest: 0.5 in a
    assert masks_of(a)[""].tolist() == [[False, False], [True, True]]
    assert masks_of(b)[""].tolist() == [[False, True], [False, True]]
    assert nonzero_count(a) == 2 and nonzero_count(b) == 2
    assert mean_abs_nonzero(a) == pytest.approx(3.5)
    assert mean_abs_nonzero(b) == pytest.approx(5.5)


def test_global_magnitude_prune() -> None:
    torch.manual_seed(0)
    a, b = nn.Linear(8, 4), nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        b.weight.mul_(10)  # b's weights are larger: global pruning must take mostly from a
    n = global_magnitude_prune([a, b], 0.5)
    assert n == (32 + 54) // 2
    weights = torch.cat([effective_weight(m).flatten() for m in (a, b)])
    original = torch.cat([m.weight_orig.detach().flatten() for m in (a, b)])
    pruned = weights == 0
    assert int(pruned.sum()) == n
    assert original[pruned].abs().max() <= original[~pruned].abs().min()
    assert nonzero_count(a) < nonzero_count(b)
    # A second round prunes half of what is left.
    assert global_magnitude_prune([a, b], 0.5) == (86 - 43) // 2


def test_masks_persist_through_sgd_with_momentum_and_weight_decay() -> None:
    model = pruned_small()
    masks = masks_of(model)
    assert set(masks) == {"conv", "fc"}
    orig_before = {n: model.get_submodule(n).weight_orig.detach().clone() for n in masks}
    train_steps(model)
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert torch.equal(module.weight_mask.bool(), mask)
        assert bool((effective_weight(module)[~mask] == 0).all())
        # Training really moved the weights (the kept ones, and weight_orig under the mask
        # through weight decay), so the zeros above are the masks' doing.
        assert not torch.equal(module.weight_orig[mask], orig_before[name][mask])
        assert not torch.equal(module.weight_orig[~mask], orig_before[name][~mask])
    model(torch.randn(1, 3, 6, 6))  # the pre-hook refreshes .weight
    for name, mask in masks.items():
        assert bool((model.get_submodule(name).weight[~mask] == 0).all())


def test_checkpoint_round_trip_with_apply_masks(tmp_path) -> None:
    model = pruned_small()
    train_steps(model, steps=2)
    path = tmp_path / "pruned.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert {"conv.weight_orig", "conv.weight_mask", "fc.weight_orig", "fc.weight_mask"} <= set(
        state
    )
    with pytest.raises(RuntimeError):  # a fresh model has plain 'weight' keys
        Small().load_state_dict(state)
    fresh = Small()
    apply_masks(fresh, masks_from_state_dict(state))
    fresh.load_state_dict(state)
    for name in ("conv", "fc"):
        assert torch.equal(effective_weight(fresh.get_submodule(name)),
                           effective_weight(model.get_submodule(name)))
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(fresh(x), model(x))
    masks = masks_of(fresh)
    assert all(torch.equal(masks[n], masks_of(model)[n]) for n in masks)
    train_steps(fresh, steps=2, seed=3)
    for name, mask in masks.items():
        assert bool((effective_weight(fresh.get_submodule(name))[~mask] == 0).all())


def test_apply_masks_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        apply_masks(Small(), {"fc": torch.ones(2, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no module"):
        apply_masks(Small(), {"nope": torch.ones(2, 2, dtype=torch.bool)})


def test_make_permanent_gives_plain_weights_with_the_zeros() -> None:
    model = pruned_small()
    train_steps(model, steps=2)
    masks = masks_of(model)
    effective = {n: effective_weight(model.get_submodule(n)).clone() for n in masks}
    before = sparsity(model)
    make_permanent(model)
    params = dict(model.named_parameters())
    assert "conv.weight" in params and "fc.weight" in params
    assert not any(name.endswith("_orig") for name in params)
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert masks_of(model) == {}
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight.detach(), effective[name])
        assert bool((weight[~mask] == 0).all())
    assert sparsity(model) == before
    assert set(Small().state_dict()) == set(model.state_dict())


def test_clone_model_copies_a_pruned_model() -> None:
    model = pruned_small()
    train_steps(model, steps=1)  # .weight is now stale: the clone must use weight_orig * mask
    with pytest.raises(RuntimeError):
        copy.deepcopy(model)  # why clone_model exists
    clone = clone_model(model)
    for name, mask in masks_of(model).items():
        module = clone.get_submodule(name)
        assert torch.equal(module.weight_mask.bool(), mask)
        assert torch.equal(module.weight, effective_weight(model.get_submodule(name)))
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(clone(x), model(x))
    with torch.no_grad():
        clone.fc.weight_orig.add_(1.0)
    assert not torch.equal(clone(x), model(x))  # independent parameters


def test_sparsity_counts_zeros() -> None:
    model = Small()
    assert sparsity(model)["overall"] == 0.0
    prune_smallest(model.conv, 27)  # conv: 4*3*3*3 = 108 weights, a quarter pruned
    result = sparsity(model)
    assert result["modules"] == {"conv": 0.25, "fc": 0.0}
    assert result["weights"] == 108 + 320 and result["zeros"] == 27
    assert result["overall"] == pytest.approx(27 / 428)


# --------------------------------------------------------------------------------------------
# Zero-entropy sites


def counts(n_on: list[int], n_off: list[int]) -> SiteCounts:
    return SiteCounts(n_on=torch.tensor(n_on), n_off=torch.tensor(n_off))


def test_zero_entropy_sites() -> None:
    result = zero_entropy_sites({
        "on": counts([5, 3], [0, 0]),
        "off": counts([0, 0], [4, 2]),
        "mixed": counts([5, 0], [0, 7]),
        "alive": counts([3, 1], [1, 2]),
        "partly": counts([3, 0], [1, 2]),  # one neuron constant, the other not
        "unreached": None,
    })
    assert result == {"on": "on", "off": "off", "mixed": "mixed"}


def test_causes_layer_collapse_plain_stack() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 8 * 8, 3),
    )
    x = torch.randn(2, 3, 8, 8)
    assert causes_layer_collapse(model, ["1"], x) is True
    assert causes_layer_collapse(model, [], x) is False
    assert isinstance(model[1], nn.ReLU)  # worked on a copy


def test_causes_layer_collapse_residual_block_keeps_shortcut(resnet) -> None:
    x = torch.randn(1, 3, 32, 32)
    assert causes_layer_collapse(resnet, ["layer1.0.act1"], x) is False
    assert causes_layer_collapse(resnet, ["act"], x) is True  # the stem has no skip
    pruned = clone_model(resnet)
    prune_smallest(pruned.layer1[0].conv2, 100)  # a pruned model cannot be deepcopied
    assert causes_layer_collapse(pruned, ["layer1.0.act1"], x) is False
