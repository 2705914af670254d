"""Models from libraries as depthcut models: `--model torchvision:resnet18`, `timm:...`, and
(Python API) Hugging Face encoders, `hf:bert`.

Optional: no library is required (and torchvision 0.28 does not import beside the CPU build of
torch 2.13 on this project's machines). A model is built randomly initialised (nothing is
downloaded), its classifier sized for the dataset, every activation module called at several
places (torchvision's ResNet blocks call one `relu` twice) split into one module per call, and
every functional activation call (timm's own `GELU` module calls `F.gelu`: ConvNeXt; the
`GELUActivation` of transformers) made a module (`sites.modularize`), so each place is its own
site. A local weights file can be loaded.

Image size. A model whose builder takes the image size (timm's `img_size`: ViT, DeiT, Swin,
MLP-Mixer, ...; torchvision's `image_size`: its ViTs) is built for the dataset's size (32 unless
told otherwise), keeping its own stem and patch size. Any other model (the CNNs) is built as the
library defines it and its stem adapted to small inputs: the first convolution becomes 3x3
stride 1, as in the papers' CIFAR models. The model is then run once on a batch of zeros of
that size, so a model that cannot take it is refused with a `ConfigError` at build time, not
with a library's traceback during training.

Builder options follow the name after a second colon, as Python keyword arguments:
`timm:vit_tiny_patch16_224:patch_size=4` (a CIFAR-style ViT: a 32x32 image is 8x8 patches of
4x4 pixels, not 2x2 patches of 16x16), `timm:resnet18:drop_rate=0.1`. They are part of the
model's name, so a checkpoint rebuilds the same model.

Hugging Face: `hf:MODEL_TYPE[:config options]` builds `AutoModelForSequenceClassification` from
`AutoConfig.for_model(MODEL_TYPE, **options)` (random init, no download), wrapped to read token
ids (N, T) and return logits; positions 0..T-1, no padding mask (every token is attended to).
Plain torch.fx cannot trace transformers' self-attention (it star-unpacks a traced shape), so
each innermost attention module is marked `depthcut_leaf` and traced as one call (`graph`): it
holds no rectifier site, and the MLPs around the sites (dense -> GELU -> dense) stay visible to
`find_sites`, entropy counting, `linearize` and `fold`. E.g. `hf:bert:hidden_size=64,
num_hidden_layers=2,num_attention_heads=2,intermediate_size=256,vocab_size=1000,
max_position_embeddings=64`.
"""

from __future__ import annotations

import ast
import copy

import torch
import torch.fx
from torch import Tensor, nn

from depthcut.errors import ConfigError
from depthcut.graph import TraceError, trace_graph
from depthcut.sites import SiteError, is_rectifier, modularize

LIBRARIES = ("torchvision", "timm", "hf")
DEFAULT_IMAGE_SIZE = 32  # what the papers' CIFAR models and the adapted stems are built for
# Each library's name for the image-size argument of the builders that take one.
IMAGE_SIZE_ARGUMENT = {"torchvision": "image_size", "timm": "img_size"}
# Builder arguments depthcut sets itself (classifier size, input channels, no download).
RESERVED_OPTIONS = frozenset({"num_classes", "in_chans", "pretrained", "weights",
                              "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                              "num_labels"})
CHECK_TOKENS = 8  # sequence length of the build-time check of an hf: model


def is_external(name: str) -> bool:
    return name.partition(":")[0] in LIBRARIES and ":" in name


def unshare_activations(model: nn.Module) -> nn.Module:
    """A copy where a rectifier module called at k places becomes k modules (`relu`, `relu_2`,
    ...); models without shared rectifiers are returned as they are. Traced by `graph`'s
    tracer, like every other graph read, so a stand-in site stays a module."""
    try:
        graph = trace_graph(model)
    except TraceError as error:
        cause = error.cause
        raise SiteError(f"cannot trace {type(model).__name__} to split its shared activation "
                        f"modules ({type(cause).__name__}: {cause})") from cause
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and is_rectifier(model.get_submodule(node.target)):
            calls.setdefault(str(node.target), []).append(node)
    if all(len(nodes) == 1 for nodes in calls.values()):
        return model
    model = copy.deepcopy(model)
    gm = torch.fx.GraphModule(model, graph, type(model).__name__)
    for target, nodes in calls.items():
        for index, node in enumerate(nodes[1:], start=2):
            name = f"{target}_{index}"
            gm.add_submodule(name, copy.deepcopy(gm.get_submodule(target)))
            node.target = name
    gm.recompile()
    return gm


def modularize_functional(model: nn.Module) -> nn.Module:
    """`sites.modularize(model)` where it gives the model more rectifier modules (functional
    calls such as timm's own `GELU` module, whose forward calls `F.gelu`, become modules),
    else the model as it is (nothing to convert, or not traceable: `find_sites` says why)."""
    try:
        converted = modularize(model)
    except SiteError:
        return model
    count = sum(1 for m in model.modules() if is_rectifier(m))
    return converted if sum(1 for m in converted.modules() if is_rectifier(m)) > count else model


def adapt_stem(model: nn.Module, in_channels: int) -> nn.Module:
    """Make the first convolution 3x3 stride 1 on `in_channels` (32x32 inputs keep their
    resolution through the stem, as in the papers' CIFAR models)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            stem = nn.Conv2d(in_channels, module.out_channels, 3, 1, 1,
                             bias=module.bias is not None)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, stem)
            return model
    return model


def parse_name(name: str) -> tuple[str, str, dict]:
    """`library:architecture[:key=value, ...]` -> (library, architecture, builder options).

    Values are Python literals (`4`, `0.1`, `True`, `(32, 32)`); a bare word is a string."""
    library, _, rest = name.partition(":")
    architecture, _, text = rest.partition(":")
    if library not in LIBRARIES or not architecture:
        raise ConfigError(f"--model {name}: expected torchvision:NAME, timm:NAME or hf:TYPE "
                          "(optionally followed by :key=value,...)")
    options: dict = {}
    if text:
        try:
            call = ast.parse(f"f({text})", mode="eval").body
            if not isinstance(call, ast.Call) or call.args or any(
                    k.arg is None for k in call.keywords):
                raise SyntaxError("only key=value pairs")
            for keyword in call.keywords:
                value = keyword.value
                options[keyword.arg] = (value.id if isinstance(value, ast.Name)
                                        else ast.literal_eval(value))
        except (SyntaxError, ValueError) as error:
            raise ConfigError(f"--model {name}: cannot read the options {text!r} as "
                              f"key=value,... of Python literals ({error})") from error
    reserved = sorted(RESERVED_OPTIONS & set(options))
    if reserved:
        raise ConfigError(f"--model {name}: depthcut sets {', '.join(reserved)} itself (the "
                          "classifier and input channels from the dataset, random init; a local "
                          "weights file loads through build_external(..., weights=PATH))")
    return library, architecture, options


def _missing(name: str, library: str, error: ImportError) -> ConfigError:
    package = "transformers" if library == "hf" else library
    return ConfigError(
        f"--model {name} needs the optional package {package}, which cannot be imported "
        f"here ({type(error).__name__}: {error}). Install it pinned beside torch, e.g. "
        f"pip install -c constraints.txt {package} (on CPU-only machines torchvision 0.28 "
        "does not import beside torch 2.13; torch 2.14.1 + torchvision 0.29.1 does)."
    )


def _create(library: str, architecture: str, num_classes: int, in_channels: int,
            options: dict) -> nn.Module:
    if library == "torchvision":
        import torchvision.models

        return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes,
                                            **options)
    import timm

    return timm.create_model(architecture, pretrained=False, num_classes=num_classes,
                             in_chans=in_channels, **options)


def _create_sized(name: str, library: str, architecture: str, num_classes: int,
                  in_channels: int, image_size: int, options: dict) -> tuple[nn.Module, bool]:
    """(model, whether its builder took the image size). A builder that does not know the
    image-size argument raises TypeError naming it: such a model is built without it."""
    argument = IMAGE_SIZE_ARGUMENT[library]
    tried = {argument: image_size, **options}
    rng = torch.get_rng_state()
    try:
        try:
            return _create(library, architecture, num_classes, in_channels, tried), True
        except TypeError as error:
            if argument not in str(error) or argument in options:
                raise
        torch.set_rng_state(rng)  # the same random init as a model built without the try
        tried = options
        return _create(library, architecture, num_classes, in_channels, options), False
    except ImportError as error:
        raise _missing(name, library, error) from error
    except (KeyError, ValueError, RuntimeError) as error:
        raise ConfigError(f"{library} has no model {architecture!r} ({error})") from error
    except (TypeError, AssertionError) as error:
        raise ConfigError(f"{library} cannot build {architecture!r} with "
                          f"{_describe(tried) or 'no options'} ({type(error).__name__}: "
                          f"{error})") from error


def _describe(options: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in options.items())


class HFSequenceClassifier(nn.Module):
    """A transformers sequence classifier read as depthcut reads models: token ids (N, T) in,
    logits out. Position ids 0..T-1 and token types 0 (where the model has token types) are
    made here: transformers would slice and expand its buffers by traced sizes, which does not
    trace. No attention mask, so every token is attended to."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.token_types = bool(getattr(model.config, "type_vocab_size", 0))

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0)
        types = {"token_type_ids": torch.zeros_like(tokens)} if self.token_types else {}
        return self.model(input_ids=tokens, position_ids=positions, **types).logits


def mark_attention_leaves(model: nn.Module) -> list[str]:
    """Mark each innermost transformers attention module (class name with "Attention", no such
    module inside, no rectifier inside) `depthcut_leaf`: traced as one call. Returns names."""
    def attention(module: nn.Module) -> bool:
        return ("Attention" in type(module).__name__
                and type(module).__module__.startswith("transformers."))

    marked = []
    for name, module in model.named_modules():
        inner = list(module.modules())[1:]
        if (attention(module) and not any(attention(m) for m in inner)
                and not any(is_rectifier(m) for m in inner)):
            module.depthcut_leaf = True
            marked.append(name)
    return marked


def _create_hf(name: str, architecture: str, num_classes: int, options: dict) -> nn.Module:
    try:
        from transformers import AutoConfig, AutoModelForSequenceClassification
    except ImportError as error:
        raise _missing(name, "hf", error) from error
    try:
        config = AutoConfig.for_model(architecture, num_labels=num_classes, **options)
        model = AutoModelForSequenceClassification.from_config(config)
    except (KeyError, ValueError, TypeError, AttributeError) as error:
        raise ConfigError(f"transformers cannot build a sequence classifier {architecture!r} "
                          f"with {_describe(options) or 'no options'} "
                          f"({type(error).__name__}: {error})") from error
    mark_attention_leaves(model)
    return HFSequenceClassifier(model)


def check_runs(model: nn.Module, name: str, example: Tensor) -> None:
    """Run `model` once (eval mode, no grad) on `example`, zeros of the data's shape;
    ConfigError if it cannot take that input (e.g. a patch size that does not divide the
    image)."""
    size = example.shape[-1]
    patches = [module.patch_size for module in model.modules()
               if isinstance(getattr(module, "patch_size", None), tuple)
               and isinstance(getattr(module, "img_size", None), tuple)]
    for patch in patches[:1]:
        if example.dim() == 4 and any(size % p for p in patch):
            raise ConfigError(
                f"--model {name}: patch size {patch[0]} does not divide the {size}x{size} "
                "images (the border would be dropped); choose one that does with a builder "
                "option after the name, e.g. timm:NAME:patch_size=4")
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    except Exception as error:  # noqa: BLE001 - whatever the library raises, the input is bad
        shape = "x".join(str(n) for n in example.shape[1:])
        raise ConfigError(
            f"--model {name} cannot take {shape} inputs ({type(error).__name__}: {error}). "
            "Models that take an image size are built for the dataset's; others get a 3x3 "
            "stride-1 stem. Pass builder options after the name (e.g. timm:NAME:patch_size=4) "
            "or choose another model.") from error
    finally:
        model.train(training)


def build_external(name: str, num_classes: int, in_channels: int,
                   weights: str | None = None, image_size: int | None = None) -> nn.Module:
    """`name` (library:architecture[:options]) built for `num_classes` classes of
    `in_channels` x `image_size` x `image_size` images (default 32x32; an hf: model reads
    token ids: it ignores in_channels and refuses an image size), random init (or the
    shape-matching tensors of a local `weights` file), shared activations split, functional
    ones made modules, checked to run."""
    library, architecture, options = parse_name(name)
    size = DEFAULT_IMAGE_SIZE if image_size is None else int(image_size)
    if library == "hf":
        if image_size is not None:
            raise ConfigError(f"--model {name} reads token ids, not {image_size}x{image_size} "
                              "images: use it on a text dataset")
        model, sized = _create_hf(name, architecture, num_classes, options), True
        example = torch.zeros(2, CHECK_TOKENS, dtype=torch.long)
    else:
        model, sized = _create_sized(name, library, architecture, num_classes, in_channels,
                                     size, options)
        example = torch.zeros(2, in_channels, size, size)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        own = model.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(fitting, strict=False)
    if not sized:
        model = adapt_stem(model, in_channels)
    model = modularize_functional(unshare_activations(model))
    check_runs(model, name, example)
    return model
