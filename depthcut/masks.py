"""Pruning masks that survive training, on `torch.nn.utils.prune`.

A pruned module keeps `weight_orig` (a parameter) and `weight_mask` (a buffer), and a forward
pre-hook recomputes `weight` from them. Everything that reads, sets, copies or bakes in such
masks is here, so pruning methods, run checkpoints and `fold` share one idea of a pruned weight.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def is_pruned(module: nn.Module) -> bool:
    """Whether `module.weight` is masked (torch.nn.utils.prune's weight_orig and weight_mask)."""
    return hasattr(module, "weight_mask") and hasattr(module, "weight_orig")


def effective_weight(module: nn.Module) -> Tensor:
    """The weight the next forward uses (weight_orig * weight_mask when pruned), detached.

    Read this, not `module.weight`: the pruned module's `weight` attribute is recomputed only by
    the forward pre-hook, so it is stale right after an optimizer step.
    """
    if is_pruned(module):
        return (module.weight_orig * module.weight_mask).detach()
    return module.weight.detach()


def _current_mask(module: nn.Module) -> Tensor:
    if is_pruned(module):
        return module.weight_mask.detach() != 0
    return torch.ones_like(module.weight, dtype=torch.bool)


def prune_group(modules: Sequence[nn.Module], n: int) -> None:
    """Prune the n smallest-magnitude unpruned weights over the union of `modules`' weights.

    Candidates are the entries whose mask is still 1 (an unmasked exact zero counts as a
    candidate of magnitude 0 and goes first). Ties go to the earlier module, then the lower flat
    index, so the choice is deterministic. New masks are combined with existing ones.
    """
    modules = list(modules)
    if len({id(module) for module in modules}) != len(modules):
        raise ValueError("prune_group got the same module twice")
    n = int(n)
    if n < 0:
        raise ValueError(f"cannot prune a negative number of weights ({n})")
    if not modules or n == 0:
        return
    device = modules[0].weight.device
    masks = [_current_mask(module) for module in modules]
    magnitudes = [
        effective_weight(module).abs().flatten().to(device=device, dtype=torch.float64)
        for module in modules
    ]
    flat_masks = [mask.flatten().to(device) for mask in masks]
    offsets = [0]
    for fm in flat_masks:
        offsets.append(offsets[-1] + fm.numel())
    all_magnitudes = torch.cat(magnitudes)
    all_masks = torch.cat(flat_masks)
    candidates = torch.nonzero(all_masks).flatten()
    if n > candidates.numel():
        raise ValueError(
            f"cannot prune {n} weights: only {candidates.numel()} are still unpruned"
        )
    order = torch.sort(all_magnitudes[candidates], stable=True).indices
    chosen = candidates[order[:n]]
    new_all = all_masks.clone()
    new_all[chosen] = False
    for index, module in enumerate(modules):
        new = new_all[offsets[index]:offsets[index + 1]].view_as(masks[index])
        if torch.equal(new.to(masks[index].device), masks[index]):
            continue
        prune.custom_from_mask(module, "weight", new.to(module.weight.device))


def prune_smallest(module: nn.Module, n: int) -> None:
    """Prune the n smallest-magnitude still-unpruned weights of `module.weight`."""
    prune_group([module], n)


def nonzero_count(module: nn.Module) -> int:
    """Non-zero entries of the effective weight."""
    return int(torch.count_nonzero(effective_weight(module)))


def mean_abs_nonzero(module: nn.Module) -> float:
    """Mean |w| over the non-zero effective weights; 0.0 when all are zero."""
    weight = effective_weight(module)
    values = weight[weight != 0].abs()
    return float(values.to(torch.float64).mean()) if values.numel() else 0.0


def global_magnitude_prune(modules: Sequence[nn.Module], fraction: float) -> int:
    """IMP baseline: prune floor(fraction * non-zeros) weights over `modules` by global |w|.

    Returns how many weights were pruned.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    modules = list(modules)
    total = sum(nonzero_count(module) for module in modules)
    n = math.floor(fraction * total + 1e-12 * max(1.0, fraction * total))
    prune_group(modules, n)
    return n


def masks_of(model: nn.Module) -> dict[str, Tensor]:
    """Module name -> boolean keep-mask, for every module with a pruned weight."""
    return {
        name: module.weight_mask.detach().bool().clone()
        for name, module in model.named_modules()
        if is_pruned(module)
    }


def masks_from_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The masks stored in a pruned model's state_dict (keys '<module>.weight_mask')."""
    suffix = ".weight_mask"
    return {
        key[: -len(suffix)]: value.bool() for key, value in state_dict.items()
        if key.endswith(suffix)
    }


def apply_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> nn.Module:
    """Install keep-masks on `model` (combined with any it has), in place; returns the model.

    A pruned module's state_dict holds 'weight_orig' and 'weight_mask' instead of 'weight', so
    a fresh model must get its masks first, then `load_state_dict` fits (and loads the saved
    masks themselves).
    """
    for name, mask in masks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError as error:
            raise ValueError(f"apply_masks: the model has no module {name!r}") from error
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor) or weight.shape != mask.shape:
            shape = None if not isinstance(weight, Tensor) else tuple(weight.shape)
            raise ValueError(
                f"apply_masks: mask for {name!r} has shape {tuple(mask.shape)}, its weight {shape}"
            )
        prune.custom_from_mask(module, "weight", mask.to(weight.device))
    return model


def clone_model(model: nn.Module) -> nn.Module:
    """A deep copy that also works for pruned models.

    `copy.deepcopy` refuses a pruned module, whose `weight` attribute is a non-leaf tensor
    (weight_orig * weight_mask); the copy gets the current effective weight there instead, and
    its own forward pre-hook recomputes it from the copied weight_orig and weight_mask.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        if is_pruned(module) and isinstance(module.__dict__.get("weight"), Tensor):
            memo[id(module.__dict__["weight"])] = effective_weight(module).clone()
    return copy.deepcopy(model, memo)


def make_permanent(model: nn.Module) -> nn.Module:
    """Bake the masks in: every pruned module gets a plain `weight` with zeros; in place."""
    for module in model.modules():
        if is_pruned(module):
            prune.remove(module, "weight")
    return model


def sparsity(model: nn.Module) -> dict:
    """Fraction of zero effective weights per conv/linear module and over all of them.

    Returns {"modules": {name: fraction}, "overall": fraction, "zeros": int, "weights": int}.
    """
    per_module: dict[str, float] = {}
    zeros = weights = 0
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        weight = effective_weight(module)
        count = int(weight.numel())
        zero = count - int(torch.count_nonzero(weight))
        per_module[name] = zero / count if count else 0.0
        zeros += zero
        weights += count
    return {
        "modules": per_module,
        "overall": zeros / weights if weights else 0.0,
        "zeros": zeros,
        "weights": weights,
    }
