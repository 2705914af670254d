"""Entropy-guided unstructured pruning: the pure, reusable parts (METHODS section 4).

EGP and NEPENTHE prune each site's feeding conv/linear layer in proportion to how irrelevant it
looks (low entropy, small weights), then retrain. This module holds what every method loop
needs and nothing of the loop itself:

- `pruning_budget`: how many weights to prune per layer in one round;
- `prunable_layers`: which conv/linear modules feed each rectifier site (from the graph);
- masks that survive training, built on `torch.nn.utils.prune`, with checkpoint helpers;
- `zero_entropy_sites` and `causes_layer_collapse`: what to do with a site that reached H = 0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.fx
from torch import Tensor, nn
from torch.nn.utils import prune

from depthcut.entropy import SiteCounts
from depthcut.fold import ADDS, PASS_THROUGH, FoldError, fold, trace
from depthcut.sites import SiteError, find_sites, silence

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
_ADD_METHODS = ("add", "add_")
REALLOCATE = ("fixed", "recompute")  # pruning_budget: keep or recompute I after capping


# --------------------------------------------------------------------------------------------
# Per-layer budget


def _check_number(kind: str, index: int, value: float, allow_nan: bool = False) -> float:
    value = float(value)
    if math.isnan(value):
        if allow_nan:
            return value
        raise ValueError(f"{kind}[{index}] is NaN")
    if math.isinf(value) or value < 0:
        raise ValueError(f"{kind}[{index}] must be finite and >= 0, got {value}")
    return value


def pruning_budget(
    entropy: Sequence[float],
    mean_abs_weight: Sequence[float],
    nonzero: Sequence[int],
    zeta: float = 0.5,
    temperature: float = 1.0,
    reallocate: str = "fixed",
) -> list[int]:
    """How many weights to prune in each layer this round (METHODS section 4).

    Per layer l: `entropy[l]` is the layer entropy H_l in bits of the site it feeds,
    `mean_abs_weight[l]` the mean |w| over its non-zero weights (m_l), `nonzero[l]` its non-zero
    count. Only layers with H_l > 0 and nnz_l > 0 are pruned (set P); a NaN entropy (a site the
    forward never reached, see `entropy.layer_entropies`) gives no evidence, so that layer is
    left out of P like an H = 0 layer. Layers outside P get 0.

    I_l = sum_P(H_k m_k) / (H_l m_l); B = zeta * sum_P nnz_k; n_l = B softmax(I / T)_l. A layer
    whose share exceeds nnz_l is pruned entirely and the rest of B is re-allocated over the
    others. `reallocate="fixed"` (default) keeps the *same* irrelevance values: recomputing
    would rescale every I by a common factor and so silently change the softmax's temperature;
    with fixed scores the shares stay proportional to exp(I_l / T), re-allocation only raises
    the others' shares, and capping all over-cap layers at once gives the same result as capping
    them one by one. `reallocate="recompute"` is the EGP authors' code: I is recomputed over the
    layers still uncapped (sum over them only) before each re-allocation.

    Rounding: each share is floored, then the missing units (so that the total is floor(B), or
    every layer's nnz when all are capped) go one each to the largest fractional parts, ties to
    the earlier layer, never above a layer's nnz.
    """
    sizes = {len(entropy), len(mean_abs_weight), len(nonzero)}
    if len(sizes) != 1:
        raise ValueError(
            "entropy, mean_abs_weight and nonzero must have one entry per layer; got lengths "
            f"{len(entropy)}, {len(mean_abs_weight)}, {len(nonzero)}"
        )
    zeta, temperature = float(zeta), float(temperature)
    if not 0 < zeta <= 1:
        raise ValueError(f"zeta (fraction of the remaining weights to prune) must be in (0, 1], "
                         f"got {zeta}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if reallocate not in REALLOCATE:
        raise ValueError(f"reallocate must be one of {', '.join(REALLOCATE)}, got {reallocate!r}")
    h = [_check_number("entropy", i, v, allow_nan=True) for i, v in enumerate(entropy)]
    m = [_check_number("mean_abs_weight", i, v) for i, v in enumerate(mean_abs_weight)]
    counts: list[int] = []
    for i, value in enumerate(nonzero):
        as_float = _check_number("nonzero", i, value)
        if not as_float.is_integer():
            raise ValueError(f"nonzero[{i}] must be a whole number, got {value}")
        counts.append(int(as_float))

    layers = range(len(counts))
    active = [i for i in layers if h[i] > 0 and counts[i] > 0]  # NaN > 0 is False
    zero_mean = [i for i in active if m[i] == 0]
    if zero_mean:
        raise ValueError(f"layer(s) {zero_mean} have non-zero weights but mean |w| = 0")
    result = [0] * len(counts)
    if not active:
        return result

    def irrelevance_over(layers: list[int]) -> dict[int, float]:
        weight_sum = sum(h[i] * m[i] for i in layers)
        # H m can underflow to 0 for tiny (positive) inputs: that layer is infinitely irrelevant.
        return {i: weight_sum / (h[i] * m[i]) if h[i] * m[i] > 0 else math.inf for i in layers}

    irrelevance = irrelevance_over(active)
    total = sum(counts[i] for i in active)
    budget = zeta * total
    target = min(math.floor(budget + 1e-12 * max(1.0, budget)), total)

    shares: dict[int, float] = {}
    capped: set[int] = set()
    remaining = budget
    while active:
        top = max(irrelevance[i] for i in active)
        if math.isinf(top):  # I overflowed: those layers dominate any finite score
            weights = {i: float(math.isinf(irrelevance[i])) for i in active}
        else:
            weights = {i: math.exp((irrelevance[i] - top) / temperature) for i in active}
        norm = sum(weights.values())
        proposed = {i: remaining * weights[i] / norm for i in active}
        over = [i for i in active if proposed[i] > counts[i]]
        if not over:
            shares.update(proposed)
            break
        for i in over:
            capped.add(i)
            result[i] = counts[i]
            remaining = max(0.0, remaining - counts[i])
        active = [i for i in active if i not in capped]
        if reallocate == "recompute" and active:
            irrelevance = irrelevance_over(active)

    for i, share in shares.items():
        result[i] = min(math.floor(share), counts[i])
    leftover = target - sum(result)
    fraction = {i: share - math.floor(share) for i, share in shares.items()}
    if leftover > 0:
        order = sorted(shares, key=lambda i: (-fraction[i], i))
        while leftover > 0:
            takers = [i for i in order if result[i] < counts[i]]
            if not takers:
                break
            for i in takers[:leftover]:
                result[i] += 1
            leftover -= len(takers[:leftover])
    elif leftover < 0:  # float rounding pushed the floors above floor(B): undo the smallest
        order = sorted(shares, key=lambda i: (fraction[i], i))
        for i in order:
            if leftover == 0:
                break
            if result[i] > 0:
                result[i] -= 1
                leftover += 1
    return result


# --------------------------------------------------------------------------------------------
# Which layers feed which site


def _feeding_ops(gm: torch.fx.GraphModule, site: torch.fx.Node,
                 stop_at: set[str]) -> list[torch.fx.Node]:
    """Conv/linear nodes reaching the site's input through BN, identity and residual adds (but
    not through a removed site in `stop_at`, whose Identity belongs to no one's pre-activation)."""
    found: list[torch.fx.Node] = []
    seen: set[torch.fx.Node] = set()
    stack = [arg for arg in site.args[:1] if isinstance(arg, torch.fx.Node)]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "call_module":
            if str(node.target) in stop_at:
                continue
            module = gm.get_submodule(str(node.target))
            if isinstance(module, PRUNABLE_TYPES):
                found.append(node)
            elif isinstance(module, _NORM_TYPES + PASS_THROUGH) and node.args:
                if isinstance(node.args[0], torch.fx.Node):
                    stack.append(node.args[0])
        elif (node.op == "call_function" and node.target in ADDS) or (
            node.op == "call_method" and node.target in _ADD_METHODS
        ):
            stack.extend(node.all_input_nodes)
    return found


def prunable_layers(model: nn.Module, example_input: Tensor | None = None,
                    removed: Iterable[str] = ()) -> dict[str, list[str]]:
    """For each rectifier site, the conv/linear modules whose output is its pre-activation.

    Found from the torch.fx graph (the tracing `fold` uses), not from module names: walking back
    from the site's input through BatchNorm, Identity/Dropout and residual adds (every argument
    of an add), collecting conv/linear modules and stopping at anything else (another site,
    pooling, the input) and at the `removed` sites (linearized ones are Identity modules: without
    the stop, a ResNet's layer1.1.act2 would claim layer1.0.conv2 once layer1.0.act2 is gone).
    Names come in graph order; a site the trace never reaches, or one fed by no linear op, maps
    to []. A conv/linear feeding two sites has no single entropy to be judged by, so it is
    refused with `SiteError`. `example_input` is accepted for symmetry with
    `causes_layer_collapse`; the walk is structural and does not run the model.
    """
    sites = find_sites(model)
    stop_at = set(removed)
    gm = trace(model)
    position = {node: index for index, node in enumerate(gm.graph.nodes)}
    site_nodes = {str(n.target): n for n in gm.graph.nodes if n.op == "call_module"}
    layers: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for site in sites:
        node = site_nodes.get(site)
        if node is None:
            layers[site] = []
            continue
        names: list[str] = []
        for op in sorted(_feeding_ops(gm, node, stop_at), key=position.__getitem__):
            name = str(op.target)
            if name in names:
                continue
            if name in owner:
                raise SiteError(
                    f"{name} feeds both site {owner[name]} and site {site}: a layer pruned by "
                    "entropy must feed one site only. Give each site its own conv/linear."
                )
            owner[name] = site
            names.append(name)
        layers[site] = names
    return layers


# --------------------------------------------------------------------------------------------
# Masks (torch.nn.utils.prune: weight_orig parameter, weight_mask buffer, forward pre-hook)


def is_pruned(module: nn.Module) -> bool:
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


# --------------------------------------------------------------------------------------------
# Sites that reached zero entropy


def zero_entropy_sites(counts: Mapping[str, SiteCounts | None]) -> dict[str, str]:
    """Sites whose every neuron is constant: "on" (linearize), "off" (remove), or "mixed".

    Checked on the integer counts (each neuron never ON or never OFF), not on the float entropy.
    None (site never reached) and empty counts are skipped.
    """
    result: dict[str, str] = {}
    for name, c in counts.items():
        if c is None or c.neurons == 0:
            continue
        if not bool(((c.n_on == 0) | (c.n_off == 0)).all()):
            continue
        if bool(c.always_on().all()):
            result[name] = "on"
        elif bool(c.always_off().all()):
            result[name] = "off"
        else:
            result[name] = "mixed"
    return result


def causes_layer_collapse(
    model: nn.Module, site_names: Iterable[str], example_input: Tensor
) -> bool:
    """True if making those sites output zeros leaves no path from the input to the output.

    Works on a copy (`clone_model`: the model is untouched, pruned or not), using
    `sites.silence` and `fold.fold`'s dead-branch analysis. Other fold failures (an untraceable
    model) are raised, not read as collapse.
    """
    names = list(site_names)
    if not names:
        return False
    silenced = silence(clone_model(model), names)
    try:
        fold(silenced, example_input)
    except FoldError as error:
        if "layer collapse" in str(error):
            return True
        raise
    return False
