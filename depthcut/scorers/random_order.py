"""A baseline for choice: a seeded random order, the control that shows what entropy earns."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from depthcut.scorers import Candidates, Scorer, Scores, register_scorer


@register_scorer
@dataclass
class RandomScorer(Scorer):
    """Score = a uniform random number per reached site, drawn from its own generator seeded by
    (seed, stage): the same run chooses alike, and training's random state is not touched."""

    name = "random"
    seed: int = 0

    @classmethod
    def from_config(cls, config: Any) -> RandomScorer:
        return cls(seed=getattr(config, "choice_seed", 0))

    def score(self, candidates: Candidates) -> Scores:
        draw = random.Random(f"depthcut-random-choice:{self.seed}:{candidates.stage}")
        return Scores({site: math.nan if math.isnan(h) else draw.random()
                       for site, h in candidates.entropies.items()})
