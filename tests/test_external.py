"""Models depthcut did not define: shared activation modules split, stem adapted to 32x32,
transformers built for the image size, builder options in the name, library attention traced
as one call. The library tests skip where torchvision, timm or transformers do not import."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthcut.cost import count_macs
from depthcut.entropy import measure_entropy
from depthcut.errors import ConfigError
from depthcut.fold import fold
from depthcut.graph import trace_graph
from depthcut.models import (
    Library,
    adapt_stem,
    build_external,
    parse_name,
    register_library,
    unregister_family,
    unshare_activations,
)
from depthcut.models.library import LIBRARIES
from depthcut.sites import find_sites, linearize


def _library(name: str):
    try:
        return __import__(name)
    except Exception:  # noqa: BLE001 - absent, or present but broken beside this torch
        pytest.skip(f"{name} cannot be imported here")


class TorchvisionLikeBlock(nn.Module):
    """Like torchvision's BasicBlock: one `relu` module called twice."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + x)


class TorchvisionLikeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(TorchvisionLikeBlock(8), TorchvisionLikeBlock(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_shared_activations_are_split_and_the_function_kept():
    model = TorchvisionLikeNet().eval()
    with pytest.warns(UserWarning, match="one shared site"):
        assert find_sites(model) == ["relu", "layer1.0.relu", "layer1.1.relu"]
    split = unshare_activations(model).eval()
    sites = find_sites(split)
    assert len(sites) == 5 and "layer1.0.relu_2" in sites
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(split(x), model(x))
    linearize(split, ["layer1.0.relu_2"])
    folded = fold(split, x)
    assert folded.fold_report.relative_error < 1e-5


def test_stem_adapted_to_small_images():
    model = adapt_stem(TorchvisionLikeNet(), in_channels=1)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.in_channels == 1
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)


class SpaceToDepthNet(nn.Module):
    """Like timm's tresnet: the first convolution reads a space-to-depth map (4x4 blocks of the
    image: 48 channels), not the image."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(48, 8, 3, 1, 1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.pixel_unshuffle(x, 4)
        return self.fc(self.act(self.conv1(x)).mean((2, 3)))


class StridedBranchesNet(nn.Module):
    """Like timm's fastvit: the stem adds a strided 3x3 and a strided 1x1 branch, so a stride-1
    first convolution no longer matches its neighbour."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv_kxk = nn.Conv2d(3, 8, 3, 2, 1)
        self.conv_scale = nn.Conv2d(3, 8, 1, 2, 0)
        self.act = nn.ReLU()
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv_kxk(x) + self.conv_scale(x))
        return self.fc(x.mean((2, 3)))


def test_stem_kept_where_the_adapted_one_cannot_run():
    example = torch.zeros(2, 3, 32, 32)
    for net in (SpaceToDepthNet, StridedBranchesNet):
        model = net(10)
        first = model.get_submodule(next(n for n, m in model.named_modules()
                                         if isinstance(m, nn.Conv2d)))
        with pytest.warns(UserWarning, match="cannot become a 3x3 stride-1 stem"):
            kept = adapt_stem(model, 3, example, net.__name__)
        assert first in list(kept.modules())  # the library's own stem, unchanged
        assert kept(example).shape == (2, 10)
    adapted = adapt_stem(TorchvisionLikeNet(), 3, example)  # runs adapted: adapted
    assert adapted.conv1.kernel_size == (3, 3) and adapted.conv1.stride == (1, 1)


class Conv3x3Bad(nn.Module):
    """Runs with neither stem (a linear layer sized for another input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 7, 2, 3)
        self.fc = nn.Linear(4 * 5 * 5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def test_stem_adapted_when_neither_runs_so_the_build_check_names_it():
    model = adapt_stem(Conv3x3Bad(), 3, torch.zeros(1, 3, 32, 32))
    assert model.conv.kernel_size == (3, 3)


def _fixed_patch_create(architecture: str, num_classes: int, in_channels: int,
                        options: dict) -> nn.Module:
    """Builders like timm's: `fixed` sets patch_size itself (`mixer_s16_224`), `free` lets an
    option override it (`dict(model_args, **kwargs)`, timm's ViTs)."""

    def model(patch_size: int, img_size: int = 224) -> nn.Module:
        del img_size
        return nn.Sequential(nn.Conv2d(in_channels, 4, patch_size, patch_size), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))

    if architecture == "fixed":
        return model(**dict(patch_size=16, **options))
    return model(**dict({"patch_size": 16}, **options))


@pytest.fixture
def patch_library():
    register_library(Library(name="patchlib", package="patchlib", create=_fixed_patch_create,
                             image_size_argument="img_size"))
    try:
        yield
    finally:
        LIBRARIES.pop("patchlib")
        unregister_family("patchlib")


def test_an_option_the_builder_sets_itself_is_refused_by_name(patch_library):
    assert build_external("patchlib:fixed", 10, 3)[0].kernel_size == (16, 16)
    assert build_external("patchlib:free:patch_size=8", 10, 3)[0].kernel_size == (8, 8)
    with pytest.raises(ConfigError, match="sets patch_size itself, so the option patch_size=8"):
        build_external("patchlib:fixed:patch_size=8", 10, 3)


def test_torchvision_resnet18_when_installed():
    _library("torchvision")
    model = build_external("torchvision:resnet18", num_classes=10, in_channels=3).eval()
    assert len(find_sites(model)) == 17
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_builder_options_follow_the_name():
    assert parse_name("timm:vit_tiny_patch16_224") == ("timm", "vit_tiny_patch16_224", {})
    assert parse_name("timm:vit_tiny_patch16_224:patch_size=4, qkv_bias=False, act=gelu") == (
        "timm", "vit_tiny_patch16_224", {"patch_size": 4, "qkv_bias": False, "act": "gelu"})
    assert parse_name("hf:bert:hidden_size=64")[2] == {"hidden_size": 64}
    for bad in ("timm:", "keras:resnet", "timm:vit:4", "timm:vit:patch_size=(4 4)",
                "timm:vit:num_classes=3", "torchvision:resnet18:weights=DEFAULT"):
        with pytest.raises(ConfigError):
            parse_name(bad)


class Offset(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.randn(1, channels, 1, 1))


class ConstantInSubmodule(nn.Module):
    """Like torchvision's ViT (`encoder.pos_embedding`): a constant added to an op's output
    lives in a submodule, so its graph node reads a dotted attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.sub = Offset(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.sub.offset


def test_fold_reads_a_constant_held_by_a_submodule():
    model = ConstantInSubmodule().eval()
    x = torch.randn(2, 3, 8, 8)
    folded = fold(model, x)
    assert folded.fold_report.relative_error < 1e-6
    assert any(m.rule == "bias" and m.taken for m in folded.fold_report.merges)


class ShapeUnpacking(nn.Module):
    """Like transformers' self-attention: star-unpacks a traced shape, which torch.fx cannot."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], 3, -1)
        q, k, v = self.qkv(x).view(*shape).unbind(-2)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


class TinyEncoder(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.attn = ShapeUnpacking(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        x = x + self.fc2(self.act(self.fc1(x)))
        return self.head(x.mean(1))


def test_a_module_marked_depthcut_leaf_is_traced_as_one_call():
    model = TinyEncoder().eval()
    with pytest.warns(UserWarning, match="registration order"):
        find_sites(model)  # untraceable: falls back, with a warning
    model.attn.depthcut_leaf = True
    assert any(n.target == "attn" for n in trace_graph(model).nodes)
    assert find_sites(model) == ["act"]
    x = torch.randn(2, 5, 8)
    folded = fold(linearize(model, ["act"]), x)
    report = folded.fold_report
    assert report.relative_error < 1e-5 and report.macs_after < report.macs_before


def test_timm_vit_built_for_small_images_and_its_mlps_fold():
    _library("timm")
    name = "timm:vit_tiny_patch16_224:patch_size=4,depth=2"
    model = build_external(name, num_classes=10, in_channels=3).eval()
    proj = model.patch_embed.proj  # the patch embedding is kept, not made a 3x3 stem
    assert proj.kernel_size == (4, 4) and model.pos_embed.shape[1] == 1 + 8 * 8
    sites = find_sites(model)
    assert sites == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    x = torch.randn(2, 3, 32, 32)
    dense = count_macs(model, x)
    folded = fold(linearize(model, sites[:1]), x)
    report = folded.fold_report
    assert report.relative_error < 1e-5 and report.exact
    merged = [m.replaces for m in report.merges if m.taken and m.rule == "chain"]
    assert ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"] in merged
    assert report.macs_after < dense
    with pytest.raises(ConfigError, match="patch size 16 does not divide"):
        build_external("timm:vit_tiny_patch16_224:depth=1", 10, in_channels=1, image_size=28)
    with pytest.raises(ConfigError, match="cannot take 3x32x32"):
        build_external("timm:vit_tiny_patch16_224:depth=1,img_size=224", 10, in_channels=3)


def test_timm_cnn_stem_adapted_and_functional_gelus_made_sites():
    _library("timm")
    model = build_external("timm:convnext_atto", num_classes=10, in_channels=1).eval()
    stem = model.get_submodule("stem.0")
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.in_channels == 1
    sites = find_sites(model)  # timm's GELU module calls F.gelu: each call made a module
    assert len(sites) == 12 and sites[0] == "stages.0.blocks.0.mlp.act.gelu"
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_hf_bert_through_entropy_linearize_and_fold():
    _library("transformers")
    name = ("hf:bert:hidden_size=64,num_hidden_layers=2,num_attention_heads=2,"
            "intermediate_size=256,vocab_size=1000,max_position_embeddings=64")
    torch.manual_seed(0)
    model = build_external(name, num_classes=4, in_channels=1).eval()
    sites = find_sites(model)
    assert sites == [f"model.bert.encoder.layer.{i}.intermediate.intermediate_act_fn"
                     for i in range(2)]
    tokens = torch.randint(0, 1000, (8, 16))
    entropy = measure_entropy(model, [tokens[:4], tokens[4:]])
    assert set(entropy) == set(sites) and all(0 < e <= 1 for e in entropy.values())
    folded = fold(linearize(model, sites[:1]), tokens)
    report = folded.fold_report
    assert report.relative_error < 1e-5 and report.macs_after < report.macs_before
    assert folded(tokens).shape == (8, 4)
    with pytest.raises(ConfigError, match="reads token ids"):
        build_external(name, num_classes=4, in_channels=3, image_size=32)
