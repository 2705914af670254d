"""Folding: every exact merge agrees with the unfolded model to float32 rounding.

Random stacks are drawn fresh each run (the seed is in every failure message).
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from depthcut.fold import FoldError, add_parallel, affine_of, compose, fold
from depthcut.models import build_model
from depthcut.sites import find_sites, linearize, silence
from tests.helpers import one_thread, randomize_batchnorm  # noqa: F401 (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

EXACT = 1e-5




def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture
def rng() -> tuple[int, random.Random, torch.Generator]:
    seed = random.SystemRandom().randrange(2**31)
    return seed, random.Random(seed), torch.Generator().manual_seed(seed)


def random_conv(r: random.Random, c_in: int, *, allow_groups: bool = True) -> nn.Conv2d:
    k = r.choice((1, 3))
    groups = 1
    if allow_groups and r.random() < 0.4:
        groups = r.choice([g for g in (2, 4, c_in) if c_in % g == 0])
    c_out = groups * r.choice((1, 2, 3)) if groups > 1 else r.choice((3, 4, 6, 8))
    if groups == c_in and r.random() < 0.5:
        c_out = c_in  # plain depthwise
    return nn.Conv2d(c_in, c_out, k, r.choice((1, 2)), r.choice((0, k // 2)) if k > 1 else 0,
                     groups=groups, bias=r.random() < 0.5)


def test_compose_matches_two_convs_exactly_or_in_the_interior(rng) -> None:
    seed, r, g = rng
    for trial in range(40):
        c_in = r.choice((2, 4, 8))
        first = random_conv(r, c_in)
        second = random_conv(r, first.out_channels)
        x = torch.randn(2, c_in, 17, 15, generator=g, dtype=torch.float64)
        with torch.no_grad():
            first, second = first.double(), second.double()
            expected = second(first(x))
            merged, exact = compose(affine_of(first, 4), affine_of(second, 4))
            got = merged.to_module(x)(x)
        assert got.shape == expected.shape, (seed, trial)
        if exact:
            assert relative_error(got, expected) < 1e-10, (seed, trial, first, second)
        else:
            # Only outputs that read B's zero padding may differ.
            border = -(-second.padding[0] // second.stride[0])
            inner = (slice(None), slice(None), slice(border, -border or None),
                     slice(border, -border or None))
            assert relative_error(got[inner], expected[inner]) < 1e-10, (seed, trial)
            assert second.padding != (0, 0)


def test_compose_declares_spatial_after_spatial_inexact() -> None:
    a = affine_of(nn.Conv2d(4, 4, 3, padding=1), 4)
    b = affine_of(nn.Conv2d(4, 4, 3, padding=1), 4)
    merged, exact = compose(a, b)
    assert not exact
    assert merged.kernel == (5, 5) and merged.padding == (2, 2)
    strided = affine_of(nn.Conv2d(4, 4, 3, stride=2, padding=1), 4)
    merged, _ = compose(strided, b)
    assert merged.kernel == (7, 7) and merged.stride == (2, 2) and merged.padding == (3, 3)


def test_parallel_branches_merge_exactly(rng) -> None:
    seed, r, g = rng
    for _ in range(20):
        c_in, c_out, stride = r.choice((4, 8)), r.choice((4, 8)), r.choice((1, 2))
        main = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=r.random() < 0.5).double()
        side = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=r.random() < 0.5).double()
        x = torch.randn(2, c_in, 9, 9, generator=g, dtype=torch.float64)
        merged = add_parallel(affine_of(main, 4), affine_of(side, 4))
        with torch.no_grad():
            assert relative_error(merged.to_module(x)(x), main(x) + side(x)) < 1e-10, seed


class Stack(nn.Module):
    """A random plain or residual conv-BN-ReLU stack (VGG-like, or ResNet-like with skips)."""

    def __init__(self, r: random.Random, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        channels = r.choice((4, 8))
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.ModuleList()
        for _ in range(3):
            groups = r.choice((1, 2, channels))
            k = r.choice((1, 3))
            self.blocks.append(nn.Sequential(
                nn.Conv2d(channels, channels, k, 1, k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
                nn.Conv2d(channels, channels, r.choice((1, 3)) if not residual else 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(),
            ))
        self.head = nn.Linear(channels, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x) if self.residual else block(x)
        return self.head(x.mean((2, 3)))


def test_random_stacks_fold_exactly_under_macs_policy(rng) -> None:
    seed, r, g = rng
    for trial in range(6):
        residual = r.random() < 0.5
        model = randomize_batchnorm(Stack(r, residual), g)
        if not residual:  # a plain stack pads inside its blocks; keep shapes consistent
            for block in model.blocks:
                block[3].padding = (block[3].kernel_size[0] // 2,) * 2
        sites = find_sites(model)
        linearize(model, r.sample(sites, r.randrange(1, len(sites) + 1)))
        x = torch.randn(3, 3, 12, 12, generator=g)
        folded = fold(model, x, "macs")
        report = folded.fold_report
        assert report.macs_after <= report.macs_before, (seed, trial)
        with torch.no_grad():
            error = relative_error(folded(x), model(x))
        if report.exact:
            assert error < EXACT, (seed, trial, report.markdown())
        assert report.relative_error == pytest.approx(error, rel=0.5, abs=1e-7)


def test_resnet18_with_random_sites_linearized(rng) -> None:
    seed, r, g = rng
    model = randomize_batchnorm(build_model("resnet18", width=0.125), g)
    sites = find_sites(model)
    chosen = r.sample(sites, r.randrange(1, len(sites) + 1))
    linearize(model, chosen)
    x = torch.randn(2, 3, 32, 32, generator=g)
    before = [p.clone() for p in model.parameters()]
    for policy in ("macs", "all"):
        folded = fold(model, x, policy)
        report = folded.fold_report
        assert not folded.training
        assert report.ops_after < report.ops_before
        if report.exact:
            assert report.relative_error < EXACT, (seed, chosen, policy)
    after = list(model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), "input modified"
    assert model.layer1[0].act1.__class__ in (nn.ReLU, nn.Identity)


def test_fully_linear_basic_block_becomes_one_conv_under_all_policy() -> None:
    g = torch.Generator().manual_seed(0)
    model = randomize_batchnorm(build_model("resnet18", width=0.125), g)
    linearize(model, ["layer1.0.act1", "layer1.0.act2"])
    block = model.layer1[0]
    folded = fold(block, torch.randn(1, 8, 8, 8), "all")
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (5, 5)
    assert folded.fold_report.depth_after == 1 and folded.fold_report.depth_before == 2
    assert not folded.fold_report.exact


class MLPBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(x)))


def test_linearized_transformer_mlp_folds_to_one_linear() -> None:
    model = MLPBlock()
    linearize(model, ["act"])
    x = torch.randn(2, 5, 8)
    folded = fold(model, x)
    linears = [m for m in folded.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1
    assert folded.fold_report.macs_after < folded.fold_report.macs_before
    assert folded.fold_report.exact
    with torch.no_grad():
        assert relative_error(folded(x), model(x)) < EXACT


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 project, residual."""

    def __init__(self, channels: int = 8, expand: int = 4) -> None:
        super().__init__()
        hidden = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False),
                                    nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden,
                                                 bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, channels, 1, bias=False),
                                     nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.depthwise(self.expand(x)))


def test_mobilenet_block_depthwise_with_pointwise() -> None:
    g = torch.Generator().manual_seed(1)
    model = randomize_batchnorm(InvertedResidual(), g)
    linearize(model, ["depthwise.2"])
    x = torch.randn(2, 8, 6, 6, generator=g)
    folded = fold(model, x, "all")
    report = folded.fold_report
    assert report.exact  # depthwise then pointwise: B is 1x1, no padding: exact
    assert report.depth_after == report.depth_before - 1
    with torch.no_grad():
        assert relative_error(folded(x), model(x)) < EXACT
    # Under the MACs policy a dense 3x3 replacing depthwise + pointwise costs more: declined.
    cheap = fold(model, x, "macs").fold_report
    assert cheap.macs_after <= cheap.macs_before
    assert any(not m.taken and "MACs" in m.reason for m in cheap.merges)


def test_always_off_site_reduces_block_to_its_shortcut() -> None:
    g = torch.Generator().manual_seed(2)
    model = randomize_batchnorm(build_model("resnet18", width=0.125), g)
    silence(model, ["layer2.0.act1"])
    x = torch.randn(2, 3, 32, 32, generator=g)
    folded = fold(model, x)
    report = folded.fold_report
    assert report.removed_branches == ["layer2.0.act1"]
    names = " ".join(name for m in report.merges for name in m.replaces)
    assert "layer2.0.conv2" not in names
    assert not any("layer2.0.conv" in t for t in dict(folded.named_modules()))
    assert report.relative_error < EXACT
    assert report.ops_after < fold(build_model("resnet18", width=0.125), x).fold_report.ops_after


def test_layer_collapse_is_an_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(1, 3, 8, 8)
    model(x)
    silence(model, ["1"])
    with pytest.raises(FoldError, match="layer collapse"):
        fold(model, x)


def test_silence_refuses_leaky_sites() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LeakyReLU())
    with pytest.raises(ValueError, match="only ReLU/ReLU6"):
        silence(model, ["1"])


def test_bad_policy_and_untraceable_model() -> None:
    model = build_model("resnet18", width=0.125)
    with pytest.raises(FoldError, match="unknown fold policy"):
        fold(model, torch.randn(1, 3, 32, 32), policy="fast")

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(FoldError, match="cannot trace"):
        fold(Branchy(), torch.randn(2, 3))


def test_latency_policy_times_each_merge_and_data_gives_agreement() -> None:
    g = torch.Generator().manual_seed(3)
    model = randomize_batchnorm(MLPBlock(16), g)
    linearize(model, ["act"])
    x = torch.randn(4, 16, generator=g)
    data = [(torch.randn(8, 16, generator=g), torch.randint(0, 16, (8,), generator=g))]
    folded = fold(model, x, "latency", data=data)
    report = folded.fold_report
    timed = [m for m in report.merges if m.seconds_before is not None]
    assert timed and all(m.seconds_after is not None for m in timed)
    assert report.agreement == 100.0
    assert report.top1_folded == report.top1_unfolded
    assert "Fold report (policy latency)" in report.markdown()
