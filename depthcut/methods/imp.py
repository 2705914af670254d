"""Iterative magnitude pruning (IMP), the baseline of METHODS section 4.

Same rounds as EGP, but each round prunes zeta of all remaining conv/linear weights by global
magnitude, with no entropy. Sites that happen to reach zero entropy are still removed, so the
comparison is fair; IMP is expected to remove none.
"""

from __future__ import annotations

from torch import nn

from depthcut.data import DataSplits
from depthcut.entropy import SiteCounts
from depthcut.masks import PRUNABLE_TYPES, global_magnitude_prune
from depthcut.methods import MethodSpec, register
from depthcut.methods.rounds import (
    DELTA,
    ENTROPY_VARIANT,
    PRUNING_PRESETS,
    PRUNING_RECORD_FIELDS,
    ROUNDS,
    ZETA,
    PruneStep,
    PruningConfig,
    describe_rounds,
    pruning_rounds,
)
from depthcut.stages import FINETUNE_OPTIONS, MethodResult


def magnitude_step(zeta: float) -> PruneStep:
    def step(model: nn.Module, counts: dict[str, SiteCounts | None]) -> dict[str, int]:
        modules = [m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)]
        return {"all conv/linear": global_magnitude_prune(modules, zeta)}

    return step


def imp(model: nn.Module, splits: DataSplits, config: PruningConfig, **kwargs) -> MethodResult:
    """IMP: global magnitude rounds; the answer is the last round within delta."""
    return pruning_rounds(model, splits, config, method="imp",
                          prune_step=magnitude_step(config.zeta), rule="delta", **kwargs)


SPEC = register(MethodSpec(
    name="imp", config=PruningConfig, runner=imp, label="IMP",
    help="iterative magnitude pruning baseline",
    options=(ZETA, ROUNDS, ENTROPY_VARIANT, DELTA), training_options=FINETUNE_OPTIONS,
    presets=PRUNING_PRESETS, record_fields=PRUNING_RECORD_FIELDS, describe=describe_rounds,
    order=40))
