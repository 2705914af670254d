"""torchvision and timm models as depthcut models: `--model torchvision:resnet18`, `timm:...`.

Optional: neither package is required (and torchvision 0.28 does not import beside the CPU
build of torch 2.13 on this project's machines). A model is built randomly initialised (nothing
is downloaded), its classifier sized for the dataset, its stem adapted to 32x32 inputs (the
first convolution becomes 3x3 stride 1, as in the papers' CIFAR models), and every activation
module called at several places (torchvision's ResNet blocks call one `relu` twice) is split
into one module per call, so each place is its own site. A local weights file can be loaded.
"""

from __future__ import annotations

import copy

import torch
import torch.fx
from torch import nn

from depthcut.errors import ConfigError
from depthcut.graph import TraceError, trace_graph
from depthcut.sites import SiteError, is_rectifier

LIBRARIES = ("torchvision", "timm")


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


def build_external(name: str, num_classes: int, in_channels: int,
                   weights: str | None = None) -> nn.Module:
    library, _, architecture = name.partition(":")
    try:
        if library == "torchvision":
            import torchvision.models

            model = torchvision.models.get_model(architecture, weights=None,
                                                 num_classes=num_classes)
        else:
            import timm

            model = timm.create_model(architecture, pretrained=False, num_classes=num_classes,
                                      in_chans=in_channels)
    except ImportError as error:
        raise ConfigError(
            f"--model {name} needs the optional package {library}, which cannot be imported "
            f"here ({type(error).__name__}: {error}). Install it pinned beside torch, e.g. "
            f"pip install -c constraints.txt {library} (on CPU-only machines torchvision 0.28 "
            "does not import beside torch 2.13; torch 2.14.1 + torchvision 0.29.1 does)."
        ) from error
    except (KeyError, ValueError, RuntimeError) as error:
        raise ConfigError(f"{library} has no model {architecture!r} ({error})") from error
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        own = model.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict(fitting, strict=False)
    return unshare_activations(adapt_stem(model, in_channels))
