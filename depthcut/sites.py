"""Rectifier sites: finding them in forward order, and linearizing them.

A *site* is one rectifier activation module in the forward pass (METHODS section 1). Sites are
the layers depthcut counts and removes, so a site is a module: a module called at several places
in one forward (ALBERT shares a layer across its depth) is one *shared* site, counted over all
its calls and linearized at all of them (`entropy` pools its counts and warns). Where the
forward traces, `models.unshare_activations` gives each place its own module, which is finer:
the library adapters and the Python API do so; `find_sites` warns about the modules left shared.

Models that call activations as functions (`F.relu(x)`, `torch.relu(x)`, `x.relu()`, `F.gelu`,
`F.silu`, `F.leaky_relu`, `F.relu6`, `F.hardtanh(x, 0, 6)`) have no module to hook or replace.
`modularize(model)` traces such a model and returns a copy (a torch.fx GraphModule) in which
every such call is its own activation module; `find_sites` refuses the original with a message
naming the calls, so entropy, linearize and fold always agree on the same module names.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from depthcut.errors import DepthcutError
from depthcut.graph import TraceError, trace_graph
from depthcut.layers import ChannelScale, Zero
from depthcut.neuron_axis import neuron_axes

RECTIFIER_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.GELU,
    nn.SiLU,
)


class SiteError(DepthcutError, ValueError):
    """The model's rectifier sites cannot be used as asked (none found, shared, unknown name)."""


# Kinds whose output is exactly zero for every negative input: an always-OFF site of these kinds
# outputs zeros and its branch can be removed. LeakyReLU/PReLU leak linearly below zero.
ZERO_BELOW_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
# GELU and SiLU are curved on both sides and tend to 0 below zero (GELU >= -0.17, SiLU >= -0.28):
# like EASIER's identity for an always-ON GELU, zero for an always-OFF one is a linear surrogate,
# not what the site computes. depthcut accepts it because every removal is followed by an
# evaluation that the method's stop rule judges.
ZERO_SURROGATE_TYPES: tuple[type[nn.Module], ...] = (nn.GELU, nn.SiLU)


def is_rectifier(module: nn.Module) -> bool:
    return isinstance(module, RECTIFIER_TYPES)


def _trace(model: nn.Module) -> tuple[torch.fx.Graph | None, Exception | None]:
    """The graph, or None and what the tracer raised ("graph unknown" is not an error here)."""
    try:
        return trace_graph(model), None
    except TraceError as error:
        return None, error.cause


@dataclass(frozen=True)
class _Functional:
    """How to read one functional rectifier call: its extra parameters and its module."""

    kind: str  # stem of the module name modularize gives it
    params: tuple[tuple[str, object], ...]  # (name, default) after the input tensor
    build: Callable[..., nn.Module | None]  # None: this call is not a rectifier (hardtanh)


def _hardtanh(min_val: float, max_val: float, inplace: bool) -> nn.Module | None:
    return nn.ReLU6(inplace) if (min_val, max_val) == (0.0, 6.0) else None


_INPLACE = (("inplace", False),)
_FUNCTIONS: dict[Callable, _Functional] = {
    F.relu: _Functional("relu", _INPLACE, nn.ReLU),
    torch.relu: _Functional("relu", (), nn.ReLU),
    torch.relu_: _Functional("relu", (), lambda: nn.ReLU(inplace=True)),
    F.relu6: _Functional("relu6", _INPLACE, nn.ReLU6),
    F.leaky_relu: _Functional("leaky_relu", (("negative_slope", 0.01), *_INPLACE), nn.LeakyReLU),
    F.gelu: _Functional("gelu", (("approximate", "none"),), nn.GELU),
    F.silu: _Functional("silu", _INPLACE, nn.SiLU),
    F.hardtanh: _Functional(
        "relu6", (("min_val", -1.0), ("max_val", 1.0), *_INPLACE), _hardtanh
    ),
}
_METHODS: dict[str, _Functional] = {
    "relu": _Functional("relu", (), nn.ReLU),
    "relu_": _Functional("relu", (), lambda: nn.ReLU(inplace=True)),
}
FUNCTIONAL_RECTIFIERS = (
    "F.relu, torch.relu, x.relu(), F.relu6, F.leaky_relu, F.gelu, F.silu, F.hardtanh(x, 0, 6)"
)
# Nonlinearities that are not rectifier sites, named when a model has no site at all.
_OTHER_NONLINEAR = {"tanh", "sigmoid", "hardtanh", "elu", "selu", "celu", "mish", "softplus",
                    "hardswish", "hardsigmoid", "softsign", "logsigmoid", "tanhshrink"}


@dataclass
class _Call:
    """One functional rectifier call in a traced graph, read and named."""

    node: torch.fx.Node
    name: str  # the qualified module name modularize gives it
    module: nn.Module | None  # None: its arguments are computed in forward, cannot be a module
    problem: str = ""


def _spec_of(node: torch.fx.Node) -> _Functional | None:
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(str(node.target))
    return None


def _call_input(node: torch.fx.Node) -> object:
    """The tensor a functional call acts on (first argument, or `input=` / `self=`)."""
    return node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))


def _read_call(node: torch.fx.Node, spec: _Functional) -> tuple[nn.Module | None, str]:
    """(module or None, problem) for one call, its arguments bound to the signature."""
    args, kwargs = list(node.args[1:]), dict(node.kwargs)
    source = _call_input(node)
    if not node.args:
        kwargs.pop("input", None)
        kwargs.pop("self", None)
    names = [name for name, _ in spec.params]
    if len(args) > len(names) or set(kwargs) - set(names):
        return None, "unexpected arguments"
    values = dict(zip(names, args, strict=False))
    for name, default in spec.params:
        values.setdefault(name, kwargs.get(name, default))
    computed = [name for name, value in values.items() if isinstance(value, torch.fx.Node)]
    if computed or not isinstance(source, torch.fx.Node):
        return None, f"arguments computed in forward ({', '.join(computed) or 'input'})"
    return spec.build(**values), ""


def _owner(model: nn.Module, node: torch.fx.Node) -> str:
    """Qualified name of the module whose forward made the call ("" for the model itself)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    return ""


def _functional_calls(model: nn.Module, graph: torch.fx.Graph) -> list[_Call]:
    """Every functional rectifier call in `graph`, named `<owner>.<kind>[_<n>]` uniquely."""
    calls: list[_Call] = []
    used: set[str] = set()
    for node in graph.nodes:
        spec = _spec_of(node)
        if spec is None:
            continue
        module, problem = _read_call(node, spec)
        if module is None and not problem:
            continue  # e.g. hardtanh(x, -1, 1): not a rectifier
        owner = _owner(model, node)
        owner_module = model.get_submodule(owner)
        stem, index = spec.kind, 0
        while True:
            attr = stem if index == 0 else f"{stem}_{index}"
            name = f"{owner}.{attr}" if owner else attr
            if name not in used and not hasattr(owner_module, attr):
                break
            index += 1
        used.add(name)
        calls.append(_Call(node, name, module, problem))
    return calls


def _other_nonlinearities(model: nn.Module, graph: torch.fx.Graph | None) -> list[str]:
    found = {type(m).__name__ for m in model.modules()
             if type(m).__module__ == nn.modules.activation.__name__
             and not isinstance(m, nn.MultiheadAttention)}
    for node in graph.nodes if graph is not None else ():
        name = getattr(node.target, "__name__", str(node.target))
        if node.op in ("call_function", "call_method") and name.rstrip("_") in _OTHER_NONLINEAR:
            found.add(f"{name}()")
    return sorted(found)


def _no_sites_error(model: nn.Module, graph: torch.fx.Graph | None,
                    error: Exception | None) -> SiteError:
    kinds = ", ".join(t.__name__ for t in RECTIFIER_TYPES)
    if graph is None:
        return SiteError(
            f"{type(model).__name__} has no rectifier modules ({kinds}), and torch.fx could not "
            f"trace it ({type(error).__name__}: {error}) to look for functional activations "
            f"({FUNCTIONAL_RECTIFIERS}). Give each activation its own module (self.act1 = "
            "nn.ReLU(), ...), or make forward() traceable and call "
            "depthcut.sites.modularize(model)."
        )
    others = _other_nonlinearities(model, graph)
    seen = (f" It uses other nonlinearities ({', '.join(others)}), which are not rectifier "
            "sites." if others else "")
    return SiteError(
        f"{type(model).__name__} has no rectifier sites: no modules of type {kinds} and no "
        f"functional calls ({FUNCTIONAL_RECTIFIERS}) in its traced forward.{seen} depthcut "
        "measures and removes rectifier activations only."
    )


def find_sites(model: nn.Module) -> list[str]:
    """Qualified names of the model's rectifier modules, in forward order.

    Forward order comes from a torch.fx trace; rectifier modules the trace never reaches (dead
    branches) follow in registration order. A rectifier module called at several places in one
    forward is one shared site, at its first call's place, with a warning: its places cannot be
    measured or linearized separately (`models.unshare_activations` splits it where the forward
    traces).
    Functional rectifier calls (F.relu, x.relu(), ...) are refused too, naming each call: run
    `modularize(model)` first, so every site is a module that hooks and `linearize` can reach.
    An untraceable model falls back to registration order with a warning (functional calls
    cannot be seen then).
    """
    registered = [name for name, module in model.named_modules() if is_rectifier(module)]
    graph, error = _trace(model)
    if graph is not None:
        functional = _functional_calls(model, graph)
        if functional:
            names = ", ".join(call.name for call in functional)
            raise SiteError(
                f"{len(functional)} functional activation(s) found ({names}); call "
                "depthcut.sites.modularize(model) first: it returns a traced copy in which each "
                "is its own activation module under that name, so it can be measured, "
                "linearized and folded."
            )
    if not registered:
        raise _no_sites_error(model, graph, error)
    if graph is None:
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error}); "
            "rectifier sites are listed in registration order instead of forward order.",
            stacklevel=2,
        )
        return registered
    order = [str(node.target) for node in graph.nodes if node.op == "call_module"]
    rectifiers = set(registered)
    traced = [name for name in order if name in rectifiers]
    shared = sorted({name for name in traced if traced.count(name) > 1})
    if shared:
        warnings.warn(
            f"rectifier module(s) {', '.join(shared)} are called at several places per forward: "
            "each is one shared site (its counts pool every call; linearizing it linearizes "
            "every place). depthcut.models.unshare_activations(model) gives each place its own "
            "module, so each can be measured and linearized on its own.",
            stacklevel=2,
        )
    traced = list(dict.fromkeys(traced))  # a shared module at its first call's place
    return traced + [name for name in registered if name not in set(traced)]


def modularize(model: nn.Module) -> torch.fx.GraphModule:
    """A traced copy of `model` in which every functional rectifier call is its own module.

    Each call of F.relu, torch.relu, x.relu(), F.relu6, F.leaky_relu, F.gelu, F.silu or
    F.hardtanh(x, 0, 6) becomes a fresh nn.ReLU / ReLU6 / LeakyReLU / GELU / SiLU (keeping
    negative_slope, approximate and inplace), registered next to the module whose forward made
    the call: `F.relu` in `layer1.0`'s forward becomes site `layer1.0.relu` (then `relu_1`,
    ...). The rest of the graph and all weights are kept (copied: `model` is not modified); the
    result has only `forward`. Activation modules already present stay as they are. This lets
    find_sites, measure_entropy, linearize, silence and fold, which name sites by module, work
    on such models. Raises SiteError if the model cannot be traced or has no rectifier at all.
    """
    model = copy.deepcopy(model)
    graph, error = _trace(model)
    if graph is None:
        raise SiteError(
            f"modularize needs a torch.fx trace of {type(model).__name__} to find its functional "
            f"activations, and tracing failed ({type(error).__name__}: {error}). Move "
            "data-dependent Python control flow out of forward(), or replace the functional "
            "calls by activation modules by hand (self.act1 = nn.ReLU(), ...)."
        )
    calls = _functional_calls(model, graph)
    stuck = [f"{c.name} ({c.problem})" for c in calls if c.module is None]
    if stuck:
        raise SiteError(
            f"cannot turn {', '.join(stuck)} into modules: pass constant arguments (e.g. "
            "F.leaky_relu(x, 0.1)) or use an activation module for these calls."
        )
    gm = torch.fx.GraphModule(model, graph, type(model).__name__)
    for call in calls:
        gm.add_submodule(call.name, call.module)
        # Read the input now: an earlier replacement may have rewired it.
        with graph.inserting_before(call.node):
            replacement = graph.call_module(call.name, (_call_input(call.node),))
        replacement.meta = dict(call.node.meta)
        call.node.replace_all_uses_with(replacement)
        graph.erase_node(call.node)
    for node in graph.nodes:
        node.type = None  # string annotations (PEP 563) would make the module unpicklable
    graph.lint()
    gm.recompile()
    if not any(is_rectifier(m) for m in gm.modules()):
        raise _no_sites_error(model, graph, None)
    return gm


def modularize_leaves(model: nn.Module) -> list[str]:
    """Replace, in place, each childless module of a library (not `torch.nn`'s own) whose
    whole forward is one functional rectifier call on its input by that rectifier's module:
    transformers' `GELUActivation` calls F.gelu, `GELUTanh` F.gelu(approximate="tanh").
    Each such module traces alone even where the model does not (transformers' forwards
    compare traced shapes), so this is `modularize` for a model torch.fx cannot trace: the
    places stay the modules they were (one per place, as libraries build them), now sites.
    Returns the names replaced."""
    replaced = []
    for name, module in list(model.named_modules()):
        if (not name or list(module.children()) or is_rectifier(module)
                or type(module).__module__.startswith("torch.nn")):
            continue
        graph, _ = _trace(module)
        if graph is None:
            continue
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        ops = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
        spec = _spec_of(ops[0]) if len(ops) == 1 and len(inputs) == 1 else None
        if spec is None or _call_input(ops[0]) is not inputs[0]:
            continue
        rectifier, _ = _read_call(ops[0], spec)
        if rectifier is not None:
            replace_module(model, name, rectifier)
            replaced.append(name)
    return replaced


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of the submodule called `name`."""
    parent, attr = _parent_and_attr(model, name)
    setattr(parent, attr, new)


def _check_sites(model: nn.Module, names: list[str], verb: str) -> None:
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    not_sites = [name for name in names if name in modules and not is_rectifier(modules[name])]
    if unknown or not_sites:
        problems = []
        if unknown:
            problems.append(f"no such module: {', '.join(unknown)}")
        if not_sites:
            problems.append(f"not a rectifier site: {', '.join(not_sites)}")
        remaining = [n for n, m in modules.items() if is_rectifier(m)]
        raise SiteError(
            f"cannot {verb} ({'; '.join(problems)}). Sites left in the model: "
            f"{', '.join(remaining) or 'none'}."
        )


def linearize(model: nn.Module, site_names: Iterable[str]) -> nn.Module:
    """Replace the activations of the named sites by Identity, in place; returns the model."""
    names = list(site_names)
    _check_sites(model, names, "linearize")
    for name in names:
        replace_module(model, name, nn.Identity())
    return model


def silence(model: nn.Module, site_names: Iterable[str]) -> nn.Module:
    """Replace always-OFF sites by `Zero`, in place, so `fold` can remove their branches.

    ReLU and ReLU6 output exactly zero when OFF; GELU and SiLU get zero as their linear
    surrogate (see ZERO_SURROGATE_TYPES). LeakyReLU/PReLU are refused: when OFF they are linear
    with their negative slope, not zero (`freeze` gives them a `ChannelScale`).
    """
    names = list(site_names)
    _check_sites(model, names, "silence")
    zero_kinds = ZERO_BELOW_TYPES + ZERO_SURROGATE_TYPES
    leaky = [n for n in names if not isinstance(model.get_submodule(n), zero_kinds)]
    if leaky:
        raise SiteError(
            f"cannot silence {', '.join(leaky)}: only ReLU/ReLU6 (exactly) and GELU/SiLU (as a "
            "surrogate) output zero when OFF; an always-OFF LeakyReLU/PReLU is linear with its "
            "negative slope (use `freeze`, which keeps that slope)."
        )
    for name in names:
        replace_module(model, name, Zero())
    return model


def off_slope(module: nn.Module, channels: int) -> torch.Tensor:
    """Per-channel slope a rectifier applies to negative inputs, as a linear map: 0 for
    ReLU/ReLU6 (and the GELU/SiLU surrogate), negative_slope for LeakyReLU, PReLU's weight."""
    if isinstance(module, nn.LeakyReLU):
        return torch.full((channels,), float(module.negative_slope))
    if isinstance(module, nn.PReLU):
        weight = module.weight.detach().float().cpu()
        return weight.expand(channels).clone() if weight.numel() == 1 else weight.clone()
    return torch.zeros(channels)


def frozen_form(module: nn.Module, always_on: torch.Tensor) -> tuple[str, torch.Tensor]:
    """What a zero-entropy site becomes, given which neurons are always ON (the others always
    OFF): ("on", ...) Identity, ("off", ...) Zero, or ("scale", s) a ChannelScale by s."""
    always_on = always_on.bool().cpu()
    scale = torch.where(always_on, 1.0, off_slope(module, always_on.numel()))
    if bool(always_on.all()):
        return "on", scale
    if not bool(scale.any()):
        return "off", scale
    return "scale", scale


def freeze(model: nn.Module, always_on: dict[str, torch.Tensor],
           dims: dict[str, int | None] | None = None) -> dict[str, str]:
    """Replace each zero-entropy site by the linear map it computes on the measured data, in
    place: Identity (every neuron ON), Zero (every neuron's output 0), else a ChannelScale.
    `always_on[site]` holds one bool per neuron; `dims[site]` the channel axis of a ChannelScale
    (absent: the axis of the op that produced the site's input, `depthcut.neuron_axis`, as
    entropy counting takes it; None: the rank rule). Returns each site's form: "on", "off" or
    "scale"."""
    names = list(always_on)
    _check_sites(model, names, "freeze")
    dims = {**neuron_axes(model, names), **(dims or {})}
    device = next(iter(model.parameters()), torch.empty(0)).device
    forms: dict[str, str] = {}
    for name in names:
        form, scale = frozen_form(model.get_submodule(name), always_on[name])
        stand_in = {"on": nn.Identity, "off": Zero}.get(form)
        replace_module(model, name, stand_in() if stand_in else
                       ChannelScale(scale, dims.get(name)).to(device))
        forms[name] = form
    return forms


def scale_sites(model: nn.Module, scales: dict[str, torch.Tensor],
                dims: dict[str, int | None] | None = None) -> nn.Module:
    """Put ChannelScale modules with these scales at these sites (rebuilding a checkpoint)."""
    names = list(scales)
    _check_sites(model, names, "scale")
    for name in names:
        replace_module(model, name, ChannelScale(scales[name], (dims or {}).get(name)))
    return model
