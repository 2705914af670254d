"""Chain-optimal folding and bias maps (METHODS section 6; issue 13, points 1 and 2).

A chain of linear ops is folded as the partition into merged segments of least total cost;
a merge whose inner zero padding sees only the composed bias (a 1x1 or BN with a bias before a
zero-padded spatial conv) is exact with a per-position bias map, valid for the input size the
model was folded at. Outputs are compared with the unfolded model on fresh inputs. Random
models and inputs come from the `seed` fixture (replay with DEPTHCUT_TEST_SEED=<seed>).
"""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from torch import nn

from depthcut.affine import (
    affine_of,
    compose,
    compose_chain,
    compose_shape,
    linear_parts_agree,
)
from depthcut.cost import count_macs
from depthcut.errors import DepthcutError
from depthcut.fold import POLICIES, FoldPolicy, Merge, MergeSides, fold
from depthcut.layers import BiasMapConv2d, InputSizeError
from depthcut.models import InvertedResidual, build_model
from depthcut.sites import find_sites, linearize
from tests.helpers import (  # noqa: F401 (fixtures)
    Seed,
    assert_matches,
    one_thread,
    randomize_batchnorm,
    relative_deviation,
    seed_fixture,
)

pytestmark = pytest.mark.usefixtures("one_thread", "seed")


def convs_of(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def run_chain(convs: list[nn.Conv2d], x: torch.Tensor) -> torch.Tensor:
    for conv in convs:
        x = conv(x)
    return x


# --------------------------------------------------------------------------------------------
# The algebra: when one conv (plus a bias map) is exact


def random_chain(r: random.Random, channels: int) -> list[nn.Conv2d]:
    """2 to 4 convs: 1x1 or 3x3, padded or not, stride 1 or 2, with or without bias, some
    depthwise."""
    convs, c = [], channels
    for _ in range(r.randrange(2, 5)):
        k = r.choice((1, 3))
        depthwise = k == 3 and r.random() < 0.4
        out = c if depthwise else r.choice((2, 4, 6))
        convs.append(nn.Conv2d(c, out, k, r.choice((1, 1, 2)), r.choice((0, 1, 1)) if k > 1 else 0,
                               groups=c if depthwise else 1, bias=r.random() < 0.7).double())
        c = out
    return convs


def test_compose_chain_is_exact_with_a_bias_map_where_linear_parts_agree(seed: Seed) -> None:
    """Exact (with its bias map) when no op after the first spatial op pads; then it matches
    the chain everywhere, border included. Otherwise it differs at the border only."""
    r, g = seed.random(), seed.generator()
    exact_seen = approximate_seen = 0
    for trial in range(60):
        channels = r.choice((2, 3))
        convs = random_chain(r, channels)
        size = (r.randrange(7, 12), r.randrange(7, 12))
        x = torch.randn(2, channels, *size, generator=g, dtype=torch.float64)
        ops = [affine_of(conv, 4) for conv in convs]
        context = (str(seed), trial, convs, size)
        with torch.no_grad():
            try:
                expected = run_chain(convs, x)
            except RuntimeError:
                continue  # the map got smaller than a kernel: not a chain of this size
            result = compose_chain(ops, size)
            if result is None or expected.shape[2:] != result[0].to_module(x)(x).shape[2:]:
                continue  # one conv cannot give this output size (fold checks it)
            merged, exact = result
            got = merged.to_module(x)(x)
        assert exact == linear_parts_agree(ops), context
        if exact:
            exact_seen += 1
            assert_matches(got, expected, context, rel=1e-10)
        else:
            approximate_seen += 1
            assert merged.bias_map is None, context  # no op carried a map: plain extension
    print(f"{exact_seen} exact, {approximate_seen} border-approximate chains")
    assert exact_seen >= 10 and approximate_seen >= 5, (exact_seen, approximate_seen, str(seed))


def test_pointwise_with_bias_then_padded_conv_is_exact_only_with_its_map() -> None:
    g = torch.Generator().manual_seed(0)
    first = nn.Conv2d(4, 6, 1).double()
    second = nn.Conv2d(6, 5, 3, padding=1).double()
    x = torch.randn(2, 4, 9, 9, generator=g, dtype=torch.float64)
    a, b = affine_of(first, 4), affine_of(second, 4)
    _, plain_exact = compose(a, b)
    assert not plain_exact  # as one plain conv the border differs by a constant
    merged, exact = compose_chain([a, b], (9, 9))
    assert exact and merged.bias_map is not None and merged.input_size == (9, 9)
    # The map is zero inside, and the bias b1 seen at the padding on the outer ring.
    assert merged.bias_map[:, 1:-1, 1:-1].abs().max() < 1e-12
    assert merged.bias_map[:, 0].abs().max() > 1e-3
    module = merged.to_module(x, (4, 9, 9))
    assert isinstance(module, BiasMapConv2d)
    with torch.no_grad():
        assert_matches(module(x), second(first(x)), rel=1e-12)
        with pytest.raises(InputSizeError, match="9x9"):
            module(torch.randn(1, 4, 10, 9, dtype=torch.float64))


def test_compose_shape_predicts_compose(seed: Seed) -> None:
    r = seed.random()
    for trial in range(40):
        convs = random_chain(r, r.choice((2, 4)))[:2]
        a, b = (affine_of(conv, 4) for conv in convs)
        real, shape = compose(a, b), compose_shape(a, b)
        assert (real is None) == (shape is None), (str(seed), trial)
        if real is not None:
            merged = real[0]
            assert (shape.weight.shape, shape.stride, shape.padding, shape.groups) == (
                merged.weight.shape, merged.stride, merged.padding, merged.groups), (
                str(seed), trial, convs)
            out = torch.Size([1, merged.out_features, 5, 5])
            assert shape.macs(out) == merged.macs(out)


# --------------------------------------------------------------------------------------------
# MobileNetV2


@pytest.mark.parametrize(("c_in", "c_out", "stride"), [(8, 8, 1), (8, 12, 2)])
def test_linear_inverted_residual_block_becomes_one_exact_conv(c_in: int, c_out: int,
                                                               stride: int, seed: Seed) -> None:
    """1x1 C->6C, depthwise 3x3, 1x1 6C->C' with both sites linear: one 3x3 conv (the shortcut
    as its centre tap at stride 1), exact with a bias map, with fewer MACs, though each pairwise
    merge on the way raises them."""
    g = seed.generator()
    block = randomize_batchnorm(InvertedResidual(c_in, c_out, stride, 6, "relu6"), g)
    linearize(block, ["expand.act", "depthwise.act"])
    x = torch.randn(2, c_in, 12, 12, generator=g)
    folded = fold(block, x, "macs")
    report = folded.fold_report
    context = (str(seed), report.markdown())
    convs = convs_of(folded)
    assert len(convs) == 1 and isinstance(convs[0], BiasMapConv2d), context
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (stride, stride), context
    assert (convs[0].in_channels, convs[0].out_channels) == (c_in, c_out), context
    assert report.exact and report.depth_after == 1, context
    # per output position: 9 c_in c_out against 6 c_in^2 s^2 + 54 c_in + 6 c_in c_out
    positions = (12 // stride) ** 2
    assert report.macs_after == 2 * positions * 9 * c_in * c_out, context
    assert report.macs_after < report.macs_before, context
    chains = [m for m in report.merges if m.rule == "chain"]
    assert len(chains) == 1 and chains[0].taken and chains[0].exact, context
    assert "bias map for 12x12 inputs" in chains[0].reason, context
    rules = [m.rule for m in report.merges if m.taken and m.rule != "sequential"]
    assert rules == (["chain", "parallel"] if block.residual else ["chain"]), context
    assert report.input_size == [c_in, 12, 12] and report.bias_maps, context
    assert f"folded at input size {c_in}x12x12" in report.markdown(), context
    y = torch.randn(3, c_in, 12, 12, generator=g)  # not the input the fold saw
    with torch.no_grad():
        assert_matches(folded(y), block(y), context)
    # Pairwise merging (a policy without a chain cost) cannot get there: each step costs more.
    pairwise = fold(block, x, lambda merge: POLICIES["macs"].decide(merge)).fold_report
    assert pairwise.macs_after == report.macs_before, pairwise.markdown()


def test_mobilenetv2_with_every_site_linear_folds_exactly_to_fewer_macs(seed: Seed) -> None:
    """The whole network (x0.25, 35 sites linear) under "macs": at most 0.80 of the BN-folded
    dense MACs (measured 0.61 at x0.25, 0.68 at x0.5, 0.72 at x1), exact to float32 rounding."""
    g = seed.generator()
    base = randomize_batchnorm(build_model("mobilenetv2", width=0.25), g)
    x = torch.randn(2, 3, 32, 32, generator=g)
    dense = fold(base, x, "macs").fold_report.macs_after
    model = linearize(build_model("mobilenetv2", width=0.25), find_sites(base))
    model.load_state_dict(base.state_dict())
    model.eval()
    folded = fold(model, x, "macs")
    report = folded.fold_report
    context = (str(seed), report.markdown())
    assert report.macs_after <= 0.80 * dense, (report.macs_after / dense, context)
    assert report.exact and report.bias_maps, context
    # The 10 residual blocks (stride 1, same width) each became one conv with its shortcut.
    assert sum(m.taken and m.rule == "parallel" for m in report.merges) == 10, context
    y = torch.randn(4, 3, 32, 32, generator=g)
    with torch.no_grad():
        got, expected = folded(y), model(y)
    assert relative_deviation(got, expected) < 1e-5, context
    assert_matches(got, expected, context)
    # The bias maps hold for 32x32 inputs only: another size is refused, clearly.
    with pytest.raises(InputSizeError, match="folded at input shape 3x32x32") as error:
        folded(torch.randn(1, 3, 40, 40))
    assert isinstance(error.value, DepthcutError)
    # A folded model is saved by pickling it (run.save_folded): the maps and checks survive.
    again = pickle.loads(pickle.dumps(folded))
    with torch.no_grad():
        assert torch.equal(again(y), got)


# --------------------------------------------------------------------------------------------
# The chain decision


class Chain(nn.Module):
    """X 3x3 8->8, E 1x1 8->48 (bias), D depthwise 3x3, Q 1x1 48->8, Y 1x1 8->64, all linear.

    MACs per position: X 576, E 384, D 432, Q 384, Y 512 (2288). E D Q as one exact 3x3 8->8
    (with a bias map): 576. Every pairwise merge costs more (X E 3456, E D 3456, D Q 3456,
    Q Y 3072), merging X with anything after it is border-approximate, and so is everything
    longer: the least exact partition is X | E D Q | Y, 1664.
    """

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Conv2d(8, 8, 3, padding=1)
        self.e = nn.Conv2d(8, 48, 1)
        self.d = nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False)
        self.q = nn.Conv2d(48, 8, 1, bias=False)
        self.y = nn.Conv2d(8, 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.y(self.q(self.d(self.e(self.x(x)))))


def test_chain_takes_the_middle_partition_of_least_macs(seed: Seed) -> None:
    g = seed.generator()
    model = Chain().eval()
    x = torch.randn(2, 8, 10, 10, generator=g)
    folded = fold(model, x, "macs")
    report = folded.fold_report
    context = (str(seed), report.markdown())
    assert count_macs(model, x[:1]) == 100 * 2288
    assert count_macs(folded, x[:1]) == 100 * 1664, context
    taken = [m for m in report.merges if m.taken]
    assert [(m.rule, m.replaces, m.exact) for m in taken] == [("chain", ["e", "d", "q"], True)]
    assert (taken[0].macs_before, taken[0].macs_after) == (2 * 100 * 1200, 2 * 100 * 576)
    declined = [m for m in report.merges if not m.taken]
    assert [m.replaces for m in declined] == [["x", "e", "d", "q", "y"]], context
    assert "MACs" in declined[0].reason and "border-approximate" in declined[0].reason
    assert report.exact and report.depth_after == 3, context
    y = torch.randn(3, 8, 10, 10, generator=g)
    with torch.no_grad():
        assert_matches(folded(y), model(y), context)
    # Merge by merge (a plain callable: no chain cost), nothing is taken.
    greedy = fold(model, x, lambda merge: POLICIES["macs"].decide(merge))
    assert count_macs(greedy, x[:1]) == 100 * 2288
    # "all": the whole chain as one op (border-approximate: X is spatial, D pads after it).
    everything = fold(model, x, "all").fold_report
    assert everything.depth_after == 1 and not everything.exact


def test_resnet_style_spatial_after_spatial_stays_approximate_and_declined(seed: Seed) -> None:
    """3x3 after 3x3 (both padded): the border error depends on the input, so no bias map can
    make it exact; one 5x5 costs 25 C^2 against 18 C^2: "macs" declines it."""
    g = seed.generator()
    model = randomize_batchnorm(nn.Sequential(
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Identity(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)), g)
    x = torch.randn(2, 8, 8, 8, generator=g)
    report = fold(model, x, "macs").fold_report
    chains = [m for m in report.merges if m.rule == "chain"]
    assert len(chains) == 1 and not chains[0].taken and not chains[0].exact, report.markdown()
    assert chains[0].macs_after * 18 == chains[0].macs_before * 25
    assert "border-approximate" in chains[0].reason and "MACs" in chains[0].reason
    assert report.exact and not report.bias_maps
    folded = fold(model, x, "all")
    assert not folded.fold_report.exact and not folded.fold_report.bias_maps
    y = torch.randn(2, 8, 8, 8, generator=g)
    with torch.no_grad():
        got, expected = folded(y), model(y)
    assert_matches(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1])  # the interior only
    assert relative_deviation(got, expected) > 1e-3


def test_policy_with_a_segment_cost_sees_every_segment() -> None:
    """A policy with a `segment_cost` decides chains as a whole (it prices every segment,
    single ops too); a plain callable decides merge by merge, as before."""
    g = torch.Generator().manual_seed(0)
    block = randomize_batchnorm(InvertedResidual(4, 4, 1, 6, "relu6"), g)
    linearize(block, ["expand.act", "depthwise.act"])
    x = torch.randn(2, 4, 8, 8, generator=g)
    priced: list[list[str]] = []

    class ExactFewest(FoldPolicy):
        name = "exact_fewest"

        def decide(self, merge: Merge, sides: MergeSides | None = None) -> bool:
            return merge.exact

        def segment_cost(self, merge: Merge, sides: MergeSides | None = None) -> float | None:
            priced.append(merge.replaces)
            return 1.0 if merge.exact else None

    report = fold(block, x, ExactFewest()).fold_report
    assert len(priced) == 6  # segments of a 3-op chain: 3 singles, 2 pairs, the whole
    assert [m.rule for m in report.merges if m.taken][-2:] == ["chain", "parallel"]
    plain = fold(block, x, lambda merge: merge.exact).fold_report
    assert {m.rule for m in plain.merges} <= {"sequential", "parallel"}


def test_latency_policy_times_chain_segments_and_folded_models_fold_again() -> None:
    g = torch.Generator().manual_seed(1)
    block = randomize_batchnorm(InvertedResidual(4, 4, 1, 6, "relu6"), g)
    linearize(block, ["expand.act", "depthwise.act"])
    x = torch.randn(2, 4, 8, 8, generator=g)
    report = fold(block, x, "latency").fold_report
    chains = [m for m in report.merges if m.rule == "chain"]
    assert chains and all(m.seconds_after is not None for m in chains), report.markdown()
    assert report.exact
    # A folded model (with its bias map) is read back exactly by a second fold.
    once = fold(block, x, "macs")
    twice = fold(once, x, "all")
    assert twice.fold_report.exact and twice.fold_report.bias_maps
    y = torch.randn(3, 4, 8, 8, generator=g)
    with torch.no_grad():
        assert_matches(twice(y), block(y))
