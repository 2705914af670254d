"""Turning a library's model into a depthcut model: one module per activation site, a stem for
small images, and a build-time check that it takes the data's input.

Every activation module called at several places (torchvision's ResNet blocks call one `relu`
twice) is split into one module per call, and every functional activation call (timm's own
`GELU` module calls `F.gelu`: ConvNeXt; the `GELUActivation` of transformers) made a module
(`sites.modularize`), so each place is its own site.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.fx
from torch import Tensor, nn

from depthcut.errors import ConfigError
from depthcut.graph import TraceError, trace_graph
from depthcut.sites import SiteError, is_rectifier, modularize, modularize_leaves


class ModelInputError(ConfigError):
    """A model that cannot take the data's input (its shape) or give its classes: raised by the
    build-time check, so a build for a guessed input shape can tell this from other errors."""


def unshare_activations(model: nn.Module) -> nn.Module:
    """A copy where a rectifier module called at k places becomes k modules (`relu`, `relu_2`,
    ...); models without shared rectifiers, or that torch.fx cannot trace, are returned as
    they are. Traced by `graph`'s
    tracer, like every other graph read, so a stand-in site stays a module."""
    try:
        graph = trace_graph(model)
    except TraceError:
        # Control flow in forward (timm's VGG, MobileViT): kept as it is; `find_sites` lists its
        # sites in registration order with a warning, and `fold` folds it part by part.
        return model
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
    else the model as it is (nothing to convert). A model torch.fx cannot trace gets its
    activation modules that only call a functional rectifier (transformers' `GELUActivation`)
    replaced by rectifier modules in place (`sites.modularize_leaves`)."""
    try:
        converted = modularize(model)
    except SiteError:
        if trace_error(model) is not None:
            modularize_leaves(model)
        return model
    count = sum(1 for m in model.modules() if is_rectifier(m))
    return converted if sum(1 for m in converted.modules() if is_rectifier(m)) > count else model


def trace_error(model: nn.Module) -> TraceError | None:
    """What torch.fx raised tracing `model`, or None when it traces."""
    try:
        trace_graph(model)
    except TraceError as error:
        return error
    return None


def adapt_stem(model: nn.Module, in_channels: int, example: Tensor | None = None,
               name: str = "the model") -> nn.Module:
    """Make the first convolution 3x3 stride 1 on `in_channels` (32x32 inputs keep their
    resolution through the stem, as in the papers' CIFAR models).

    Not every first convolution is a stem on the image: tresnet's follows a space-to-depth
    step (48 channels in), fastvit's stem adds parallel branches whose strides must agree. So,
    given `example` (a batch of the data's shape), the adapted model is run on it, and where it
    fails while the library's own stem runs, that stem is kept, with a warning naming why (the
    same shapes give the same choice, so a checkpoint's model is rebuilt alike)."""
    found = next(((conv_name, module) for conv_name, module in model.named_modules()
                  if isinstance(module, nn.Conv2d)), None)
    if found is None:
        return model
    conv_name, original = found
    stem = nn.Conv2d(in_channels, original.out_channels, 3, 1, 1, bias=original.bias is not None)
    stem = stem.to(device=original.weight.device, dtype=original.weight.dtype)
    parent_name, _, attr = conv_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, stem)
    if example is None:
        return model
    adapted_error = forward_error(model, example)
    if adapted_error is None:
        return model
    setattr(parent, attr, original)
    if forward_error(model, example) is not None:
        setattr(parent, attr, stem)  # neither runs: the build-time check names the adapted one
        return model
    shape = "x".join(str(n) for n in example.shape[1:])
    warnings.warn(
        f"{name}: its first convolution {conv_name!r} cannot become a 3x3 stride-1 stem "
        f"({type(adapted_error).__name__}: {str(adapted_error)[:160]}); the library's own stem "
        f"is kept, so {shape} inputs are downsampled as the library does it.", stacklevel=2)
    return model


def forward_error(model: nn.Module, example: Tensor) -> Exception | None:
    """What running `model` once (eval mode, no grad) on `example` raises, or None."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    except Exception as error:  # noqa: BLE001 - whatever the library raises, it does not run
        return error
    finally:
        model.train(training)
    return None


def load_fitting_weights(model: nn.Module, weights: str) -> None:
    """Load the tensors of the local file `weights` whose names and shapes match `model`'s."""
    state = torch.load(weights, map_location="cpu", weights_only=True)
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)


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
            raise ModelInputError(
                f"--model {name}: patch size {patch[0]} does not divide the {size}x{size} "
                "images (the border would be dropped); choose one that does with a builder "
                "option after the name, e.g. timm:NAME:patch_size=4")
    if any(p.is_meta for p in model.parameters()):
        return  # built on the meta device (the memory estimate): nothing to run on
    error = forward_error(model, example)
    if error is not None:
        shape = "x".join(str(n) for n in example.shape[1:])
        raise ModelInputError(
            f"--model {name} cannot take {shape} inputs ({type(error).__name__}: {error}). "
            "Models that take an image size are built for the dataset's; others get a 3x3 "
            "stride-1 stem where it runs. Pass builder options after the name (e.g. "
            "timm:NAME:patch_size=4) or choose another model.") from error
