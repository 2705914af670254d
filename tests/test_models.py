"""The architectures of METHODS section 8: sites, shapes, entropy, linearize-then-fold.

Models are built at small widths; BatchNorms get random statistics so folding them is tested.
Folded models are compared with the unfolded ones on fresh inputs. Every test takes the `seed`
fixture, which also seeds torch's global generator (replay with DEPTHCUT_TEST_SEED=<seed>).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from depthcut.cost import count_macs
from depthcut.entropy import count_states, measure_entropy
from depthcut.fold import fold
from depthcut.models import (
    ACTIVATIONS,
    MODELS,
    ModelSpec,
    SwinBlock,
    TransformerEncoder,
    build_model,
    count_parameters,
)
from depthcut.sites import find_sites, linearize
from tests.helpers import (  # noqa: F401 (fixtures)
    Seed,
    assert_matches,
    border_reference,
    one_thread,
    randomize_batchnorm,
    seed_fixture,
)

pytestmark = pytest.mark.usefixtures("one_thread", "seed")

# Transformers only merge linear layers (exact); conv nets may merge a padded conv after another.
CONV_NETS = ("resnet18", "vgg16", "mobilenetv2")
# name: (test width, sites, sites whose linearization folds exactly under every policy)
ARCHITECTURES: dict[str, tuple[float, int, list[str]]] = {
    "resnet18": (0.125, 17, ["layer1.0.act2", "layer4.1.act2"]),
    # an activation before a max-pool (nothing to merge) and the two hidden classifier sites
    "vgg16": (0.125, 15, ["features.5", "classifier.1", "classifier.3"]),
    # depthwise then pointwise (B is 1x1 without padding), and the site before the pooling
    "mobilenetv2": (0.125, 35, ["blocks.0.depthwise.act", "blocks.5.depthwise.act", "last.act"]),
    "swin-t": (0.125, 12, ["stages.0.1.act", "stages.2.3.act"]),
    "transformer": (0.25, 4, ["blocks.0.act", "blocks.3.act"]),
}
DEFAULT_KIND = {"resnet18": nn.ReLU, "vgg16": nn.ReLU, "mobilenetv2": nn.ReLU6,
                "swin-t": nn.GELU, "transformer": nn.GELU}






def example(name: str, batch: int, generator: torch.Generator) -> torch.Tensor:
    if name == "transformer":
        return torch.randint(0, 1000, (batch, 16), generator=generator)
    return torch.randn(batch, 3, 32, 32, generator=generator)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_sites_forward_shape_and_tracing(name: str) -> None:
    width, count, _ = ARCHITECTURES[name]
    model = ModelSpec(name=name, num_classes=7, width=width).build().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # find_sites warns when torch.fx cannot trace
        sites = find_sites(model)
    assert len(sites) == count
    modules = [model.get_submodule(site) for site in sites]
    assert len({id(m) for m in modules}) == count, "every site needs its own module"
    assert all(type(m) is DEFAULT_KIND[name] for m in modules)
    with torch.no_grad():
        out = model(example(name, 3, torch.Generator().manual_seed(0)))
    assert out.shape == (3, 7) and bool(out.isfinite().all())


def test_registry_and_spec_round_trip() -> None:
    assert set(ARCHITECTURES) <= set(MODELS)
    spec = ModelSpec(name="swin-t", width=0.125, activation="silu")
    rebuilt = ModelSpec(**spec.to_dict()).build()
    assert all(isinstance(rebuilt.get_submodule(s), nn.SiLU) for s in find_sites(rebuilt))
    assert ModelSpec(name="mobilenetv2").to_dict()["activation"] is None  # = its own default


def test_parameter_counts_at_width_1() -> None:
    """Pins each configuration (MobileNetV2: same count as torchvision's with 10 classes)."""
    expected = {"resnet18": 11_173_962, "vgg16": 15_249_354, "mobilenetv2": 2_236_682,
                "swin-t": 27_505_108, "transformer": 930_826}
    assert {name: count_parameters(build_model(name)) for name in expected} == expected


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_entropy_is_finite_for_every_site(name: str) -> None:
    width = ARCHITECTURES[name][0]
    g = torch.Generator().manual_seed(1)
    model = randomize_batchnorm(build_model(name, width=width), g)
    batches = [example(name, 4, g) for _ in range(2)]
    entropies = measure_entropy(model, batches)
    assert list(entropies) == find_sites(model)
    assert all(math.isfinite(h) and 0.0 <= h <= 1.0 for h in entropies.values()), entropies


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_linearize_then_fold(name: str, seed: Seed) -> None:
    width, _, exact_sites = ARCHITECTURES[name]
    g = seed.generator()
    base = randomize_batchnorm(build_model(name, width=width), g)
    x = example(name, 2, g)
    y = example(name, 3, g)  # not the input the fold saw
    sites = find_sites(base)
    chosen_random = seed.random().sample(sites, 3)
    for chosen in (exact_sites, chosen_random):
        model = linearize(build_model(name, width=width), chosen)
        model.load_state_dict(base.state_dict())
        model.eval()
        with torch.no_grad():
            reference = model(y)
        for policy in ("all", "macs"):
            folded = fold(model, x, policy)
            report = folded.fold_report
            context = (str(seed), chosen, policy, report.markdown())
            assert report.ops_after < report.ops_before, context
            if policy == "macs":
                assert report.macs_after <= report.macs_before, context
            if chosen is exact_sites or name not in CONV_NETS:
                assert report.exact, context
            with torch.no_grad():
                got = folded(y)
                reported = relative_error(folded(x), model(x))
            assert report.relative_error == pytest.approx(reported, rel=1e-3, abs=1e-7), context
            if report.exact:
                assert_matches(got, reference, context)
            else:
                # Each approximate chain evaluated layer by layer on the merged conv's grid
                # (skipped when the chain holds a merged skip connection).
                emulated = border_reference(model, report.merges)
                if emulated is not None:
                    with torch.no_grad():
                        assert_matches(got, emulated(y), context)


@pytest.mark.parametrize("kind", sorted(ACTIVATIONS))
def test_resnet18_with_each_activation(kind: str) -> None:
    g = torch.Generator().manual_seed(2)
    model = randomize_batchnorm(build_model("resnet18", width=0.0625, activation=kind), g)
    sites = find_sites(model)
    assert len(sites) == 17
    assert all(type(model.get_submodule(s)) is type(ACTIVATIONS[kind]()) for s in sites)
    linearize(model, ["act", "layer2.0.act2", "layer3.1.act1"])
    x = torch.randn(2, 3, 32, 32, generator=g)
    folded = fold(model, x, "macs")
    report = folded.fold_report
    assert report.exact and report.ops_after < report.ops_before, report.markdown()
    y = torch.randn(3, 3, 32, 32, generator=g)
    with torch.no_grad():
        assert_matches(folded(y), model(y), kind)


def test_mobilenetv2_layout() -> None:
    """Stride-1 stem and first stride-2 stage at stride 1: the last map is 4x4; 10 residuals."""
    model = build_model("mobilenetv2", width=0.125).eval()
    shapes = []
    model.last.register_forward_hook(lambda m, args, out: shapes.append(out.shape))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert tuple(shapes[0][2:]) == (4, 4)
    assert sum(block.residual for block in model.blocks) == 10
    assert sum(isinstance(block.expand, nn.Identity) for block in model.blocks) == 1


def test_swin_stage_layout() -> None:
    model = build_model("swin-t", width=0.125)
    blocks = [block for stage in model.stages for block in stage]
    assert [block.resolution for block in blocks] == [16] * 2 + [8] * 2 + [4] * 6 + [2] * 2
    assert [block.window for block in blocks] == [4] * 10 + [2] * 2
    assert [block.shift for block in blocks] == [0, 2, 0, 2] + [0] * 8
    assert [block.dim for block in blocks] == [12] * 2 + [24] * 2 + [48] * 6 + [96] * 2
    assert count_macs(model, torch.randn(1, 3, 32, 32)) > 0


def direct_window_attention(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Swin attention from its definition, token by token, for one image (1, L, C).

    Token (i, j) sits at ((i - s) mod r, (j - s) mod r) of the cyclically shifted map; it
    attends to tokens of the same window there that were also neighbours before the shift
    (same region), with the relative position bias of their offsets inside the window.
    """
    r, w, s = block.resolution, block.window, block.shift
    attn = block.attn
    heads = attn.heads

    def region(a: int) -> int:
        return 0 if not s or a < r - w else (1 if a < r - s else 2)

    cells = [((i - s) % r, (j - s) % r) for i in range(r) for j in range(r)]
    n = len(cells)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    bias = torch.zeros(heads, n, n)
    for p, (a, b) in enumerate(cells):
        for q, (c, d) in enumerate(cells):
            allowed[p, q] = ((a // w, b // w, region(a), region(b))
                             == (c // w, d // w, region(c), region(d)))
            index = ((a % w) - (c % w) + w - 1) * (2 * w - 1) + (b % w) - (d % w) + w - 1
            bias[:, p, q] = attn.bias_table[index]
    qkv = attn.qkv(block.norm1(x)[0]).view(n, 3, heads, -1).permute(1, 2, 0, 3)
    scores = (qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1) + bias
    scores = scores.masked_fill(~allowed, -math.inf)
    out = (scores.softmax(-1) @ qkv[2]).transpose(0, 1).reshape(1, n, -1)
    return attn.proj(out)


@pytest.mark.parametrize("shift", [0, 2])
def test_swin_block_matches_the_direct_definition(shift: int) -> None:
    torch.manual_seed(3)
    block = SwinBlock(dim=6, heads=3, resolution=8, window=4, shift=shift, activation="gelu")
    x = torch.randn(1, 64, 6)
    with torch.no_grad():
        expected = x + direct_window_attention(block, x)
        expected = expected + block.fc2(block.act(block.fc1(block.norm2(expected))))
        assert relative_error(block(x), expected) < 1e-5


@pytest.mark.parametrize("name, fc1", [("transformer", "blocks.0.fc1"),
                                       ("swin-t", "stages.1.0.fc1")])
def test_token_sites_count_each_hidden_feature_over_all_tokens(name: str, fc1: str) -> None:
    """(N, T, C) site inputs: the neuron is the last dim, counted over samples and tokens."""
    g = torch.Generator().manual_seed(4)
    model = build_model(name, width=ARCHITECTURES[name][0]).eval()
    seen: list[torch.Tensor] = []
    model.get_submodule(fc1).register_forward_hook(lambda m, args, out: seen.append(out))
    batches = [example(name, 3, g) for _ in range(2)]
    counts = count_states(model, batches)[fc1.replace("fc1", "act")]
    z = torch.cat(seen)
    assert z.dim() == 3 and counts.neurons == z.shape[-1]
    assert torch.equal(counts.n_on, (z > 0).sum((0, 1)))
    assert torch.equal(counts.n_off, (z < 0).sum((0, 1)))


def test_fold_with_integer_token_inputs_builds_float_ops() -> None:
    """Merged ops take the dtype of the activations they read, not of the int64 token ids."""
    g = torch.Generator().manual_seed(5)
    model = linearize(TransformerEncoder(width=0.125, depth=1), ["blocks.0.act"]).eval()
    x = example("transformer", 2, g)
    for policy in ("macs", "latency"):
        folded = fold(model, x, policy)
        merged = [m for name, m in folded.named_modules() if name.startswith("folded_")]
        assert merged and all(m.weight.dtype == torch.float32 for m in merged)
        assert folded.fold_report.exact, folded.fold_report.markdown()
        y = example("transformer", 3, g)
        with torch.no_grad():
            assert_matches(folded(y), model(y), policy)
