"""Rectifier sites: finding them in forward order, and linearizing them.

A *site* is one rectifier activation module in the forward pass (METHODS section 1). Sites are
the layers depthcut counts and removes, so every site must be its own module: a module shared by
several places in the forward would mix their statistics and cannot be linearized at one place.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.fx
from torch import nn

RECTIFIER_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.GELU,
    nn.SiLU,
)


class SiteError(ValueError):
    """The model's rectifier sites cannot be used as asked (none found, shared, unknown name)."""


# Kinds whose output is exactly zero for every negative input: an always-OFF site of these kinds
# outputs zeros and its branch can be removed. LeakyReLU/PReLU/GELU/SiLU leak below zero.
ZERO_BELOW_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)


class Zero(nn.Module):
    """Stands in for an always-OFF rectifier: outputs zeros shaped like its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def is_rectifier(module: nn.Module) -> bool:
    return isinstance(module, RECTIFIER_TYPES)


def _forward_order(model: nn.Module) -> list[str] | None:
    """Module names in the order torch.fx traces their calls; None if the model is not traceable."""
    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means "order unknown"
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({type(error).__name__}: {error}); "
            "rectifier sites are listed in registration order instead of forward order.",
            stacklevel=3,
        )
        return None
    return [str(node.target) for node in graph.nodes if node.op == "call_module"]


def find_sites(model: nn.Module) -> list[str]:
    """Qualified names of the model's rectifier modules, in forward order.

    Forward order comes from a torch.fx trace; rectifier modules the trace never reaches (dead
    branches) follow in registration order. A rectifier module called at two places in one
    forward is refused, because its two places cannot be measured or linearized separately.
    """
    registered = [name for name, module in model.named_modules() if is_rectifier(module)]
    if not registered:
        raise SiteError(
            f"{type(model).__name__} has no rectifier sites: depthcut looks for modules of type "
            f"{', '.join(t.__name__ for t in RECTIFIER_TYPES)}. Models that call activations as "
            "functions (F.relu, torch.relu) need them as nn.Module instances."
        )
    order = _forward_order(model)
    if order is None:
        return registered
    rectifiers = set(registered)
    traced = [name for name in order if name in rectifiers]
    shared = sorted({name for name in traced if traced.count(name) > 1})
    if shared:
        raise SiteError(
            f"rectifier module(s) {', '.join(shared)} are called more than once per forward. "
            "Give each place its own activation module (e.g. self.act1 = nn.ReLU(), "
            "self.act2 = nn.ReLU()) so each site can be measured and linearized on its own."
        )
    return traced + [name for name in registered if name not in set(traced)]


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

    Only ReLU and ReLU6 output exactly zero when OFF; other kinds are refused (an always-OFF
    LeakyReLU is linear with its negative slope, not zero).
    """
    names = list(site_names)
    _check_sites(model, names, "silence")
    leaky = [n for n in names if not isinstance(model.get_submodule(n), ZERO_BELOW_TYPES)]
    if leaky:
        raise SiteError(
            f"cannot silence {', '.join(leaky)}: only ReLU/ReLU6 output exactly zero when OFF; "
            "an always-OFF site of another kind is not zero (linearize it or leave it)."
        )
    for name in names:
        replace_module(model, name, Zero())
    return model
