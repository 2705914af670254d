"""NEPENTHE and EGP: entropy-guided unstructured pruning (METHODS section 4).

Both prune each site's feeding layers by `pruning_budget` (low entropy and small weights get
more of the round's budget), retrain, and remove the sites that reached zero entropy. NEPENTHE
stops when validation top-1 falls below theta x dense; EGP (its predecessor) runs a fixed number
of rounds, and its answer is the last round within delta.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from depthcut.data import DataSplits
from depthcut.entropy import SiteCounts, layer_entropies
from depthcut.masks import mean_abs_nonzero, nonzero_count, prune_group
from depthcut.methods import MethodSpec, register
from depthcut.methods.rounds import (
    DELTA,
    ENTROPY_VARIANT,
    PRUNING_PRESETS,
    PRUNING_RECORD_FIELDS,
    REALLOCATE_OPTION,
    ROUNDS,
    TEMPERATURE,
    THETA,
    ZETA,
    PruneStep,
    PruningConfig,
    describe_rounds,
    pruning_rounds,
)
from depthcut.pruning import prunable_layers
from depthcut.pruning import pruning_budget as allocate
from depthcut.stages import FINETUNE_OPTIONS, MethodResult


def entropy_guided_step(layers: dict[str, list[str]], zeta: float,
                        temperature: float, reallocate: str = "fixed") -> PruneStep:
    """A round's pruning: the budget per site (over its feeding layers), smallest |w| first."""

    def step(model: nn.Module, counts: dict[str, SiteCounts | None]) -> dict[str, int]:
        entropies = layer_entropies(counts)
        sites = [site for site in layers if site in entropies and layers[site]]
        groups = [[model.get_submodule(name) for name in layers[site]] for site in sites]
        nonzero = [sum(nonzero_count(m) for m in group) for group in groups]
        mean_abs = [
            sum(mean_abs_nonzero(m) * nonzero_count(m) for m in group) / n if n else 0.0
            for group, n in zip(groups, nonzero, strict=True)
        ]
        budget = allocate([entropies[s] for s in sites], mean_abs, nonzero, zeta, temperature,
                          reallocate)
        for group, n in zip(groups, budget, strict=True):
            prune_group(group, n)
        return dict(zip(sites, budget, strict=True))

    return step


def _run(method: str, rule: str, model: nn.Module, splits: DataSplits, config: PruningConfig,
         example: Tensor | None, **kwargs) -> MethodResult:
    layers = site_layers(model, kwargs["dense_record"], kwargs.get("history", ()), example)
    step = entropy_guided_step(layers, config.zeta, config.temperature, config.reallocate)
    return pruning_rounds(model, splits, config, method=method, prune_step=step, rule=rule,
                          prunable=layers, **kwargs)


def site_layers(model: nn.Module, dense_record: Mapping, history: Sequence[Mapping],
                example: Tensor | None = None) -> dict[str, list[str]]:
    """The site -> feeding layers grouping of the run: read from its first round when resuming
    (so a resumed run prunes exactly like an uninterrupted one), else found on the model with the
    sites already removed (linearized, silenced, scaled) as walls."""
    for record in history:
        if "prunable_layers" in record:
            return record["prunable_layers"]
    last = history[-1] if history else dense_record
    removed = [*last.get("linearized", []), *last.get("silenced", []), *last.get("scaled", [])]
    return prunable_layers(model, example, removed=removed)


def nepenthe(model: nn.Module, splits: DataSplits, config: PruningConfig, *,
             dense_record: Mapping, example: Tensor | None = None, **kwargs) -> MethodResult:
    """NEPENTHE: entropy-guided rounds until val top-1 < theta x dense (or `rounds`)."""
    return _run("nepenthe", "theta", model, splits, config, example,
                dense_record=dense_record, **kwargs)


def egp(model: nn.Module, splits: DataSplits, config: PruningConfig, *,
        dense_record: Mapping, example: Tensor | None = None, **kwargs) -> MethodResult:
    """EGP: entropy-guided rounds; the answer is the last round within delta."""
    return _run("egp", "delta", model, splits, config, example, dense_record=dense_record,
                **kwargs)


NEPENTHE = register(MethodSpec(
    name="nepenthe", config=PruningConfig, runner=nepenthe, label="NEPENTHE",
    help="NEPENTHE: entropy-guided pruning until theta",
    options=(ZETA, TEMPERATURE, THETA, REALLOCATE_OPTION, ROUNDS, ENTROPY_VARIANT),
    training_options=FINETUNE_OPTIONS, compare_title="NEPENTHE, EGP, IMP",
    presets=PRUNING_PRESETS, record_fields=PRUNING_RECORD_FIELDS, describe=describe_rounds,
    order=20))
EGP = register(MethodSpec(
    name="egp", config=PruningConfig, runner=egp, label="EGP",
    help="EGP: entropy-guided pruning, fixed rounds",
    options=(ZETA, TEMPERATURE, REALLOCATE_OPTION, ROUNDS, ENTROPY_VARIANT, DELTA),
    training_options=FINETUNE_OPTIONS, presets=PRUNING_PRESETS,
    record_fields=PRUNING_RECORD_FIELDS, describe=describe_rounds, order=30))
