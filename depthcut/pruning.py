"""Entropy-guided unstructured pruning: the pure, reusable parts (METHODS section 4).

EGP and NEPENTHE prune each site's feeding conv/linear layer in proportion to how irrelevant it
looks (low entropy, small weights), then retrain. This module holds what every method loop
needs and nothing of the loop itself:

- `pruning_budget`: how many weights to prune per layer in one round;
- `prunable_layers`: which conv/linear modules feed each rectifier site (from the graph);
- `zero_entropy_sites` and `causes_layer_collapse`: what to do with a site that reached H = 0.

The masks themselves (prune by magnitude, checkpoints, copies) are `depthcut.masks`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch.fx
from torch import Tensor, nn

from depthcut.entropy import SiteCounts
from depthcut.errors import ConfigError
from depthcut.graph import PASS_THROUGH, is_add, module_of, output_depends_on_input, trace
from depthcut.layers import Zero
from depthcut.masks import PRUNABLE_TYPES, clone_model
from depthcut.sites import SiteError, find_sites, silence

_NORM_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)
REALLOCATE = ("fixed", "recompute")  # pruning_budget: keep or recompute I after capping


# --------------------------------------------------------------------------------------------
# Per-layer budget


def _check_number(kind: str, index: int, value: float, allow_nan: bool = False) -> float:
    value = float(value)
    if math.isnan(value):
        if allow_nan:
            return value
        raise ConfigError(f"{kind}[{index}] is NaN")
    if math.isinf(value) or value < 0:
        raise ConfigError(f"{kind}[{index}] must be finite and >= 0, got {value}")
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
        raise ConfigError(
            "entropy, mean_abs_weight and nonzero must have one entry per layer; got lengths "
            f"{len(entropy)}, {len(mean_abs_weight)}, {len(nonzero)}"
        )
    zeta, temperature = float(zeta), float(temperature)
    if not 0 < zeta <= 1:
        raise ConfigError(f"zeta (fraction of the remaining weights to prune) must be in (0, 1], "
                         f"got {zeta}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature must be a positive finite number, got {temperature}")
    if reallocate not in REALLOCATE:
        raise ConfigError(f"reallocate must be one of {', '.join(REALLOCATE)}, got {reallocate!r}")
    h = [_check_number("entropy", i, v, allow_nan=True) for i, v in enumerate(entropy)]
    m = [_check_number("mean_abs_weight", i, v) for i, v in enumerate(mean_abs_weight)]
    counts: list[int] = []
    for i, value in enumerate(nonzero):
        as_float = _check_number("nonzero", i, value)
        if not as_float.is_integer():
            raise ConfigError(f"nonzero[{i}] must be a whole number, got {value}")
        counts.append(int(as_float))

    layers = range(len(counts))
    active = [i for i in layers if h[i] > 0 and counts[i] > 0]  # NaN > 0 is False
    zero_mean = [i for i in active if m[i] == 0]
    if zero_mean:
        raise ConfigError(f"layer(s) {zero_mean} have non-zero weights but mean |w| = 0")
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
        module = module_of(gm, node)
        if module is not None:
            if str(node.target) in stop_at:
                continue
            if isinstance(module, PRUNABLE_TYPES):
                found.append(node)
            elif isinstance(module, _NORM_TYPES + PASS_THROUGH) and node.args:
                if isinstance(node.args[0], torch.fx.Node):
                    stack.append(node.args[0])
        elif is_add(node):
            stack.extend(node.all_input_nodes)
    return found


def prunable_layers(model: nn.Module, example_input: Tensor | None = None,
                    removed: Iterable[str] = ()) -> dict[str, list[str]]:
    """For each rectifier site, the conv/linear modules whose output is its pre-activation.

    Found from the torch.fx graph (`graph.trace`, as `fold` reads it), not from module names:
    walking back from the site's input through BatchNorm, Identity/Dropout and residual adds
    (every argument of an add), collecting conv/linear modules and stopping at anything else
    (another site, pooling, the input) and at the `removed` sites (linearized ones are Identity
    modules: without the stop, a ResNet's layer1.1.act2 would claim layer1.0.conv2 once
    layer1.0.act2 is gone).
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

    Works on a copy (`clone_model`: the model is untouched, pruned or not): the named sites
    become `layers.Zero`, and the graph says whether the output still depends on the input (the
    same question `fold`'s dead-branch pass asks). The check is structural: `example_input` is
    kept for the callers' signature and not run. An untraceable model raises
    `graph.TraceError`.
    """
    names = list(site_names)
    if not names:
        return False
    copy = clone_model(model)
    # Sites an earlier round already silenced are Zero modules: only the others need silencing.
    live = [name for name in names if not isinstance(copy.get_submodule(name), Zero)]
    return not output_depends_on_input(trace(silence(copy, live)))
