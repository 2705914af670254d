"""A baseline for choice: the deepest site first ("Reassessing Layer Pruning", ICLR 2026, found
removing the last layers hard to beat on language models)."""

from __future__ import annotations

import math

from depthcut.scorers import Candidates, Scorer, Scores, register_scorer


@register_scorer
class LastScorer(Scorer):
    """Score = minus the site's forward position: the last reached site goes first."""

    name = "last"

    def score(self, candidates: Candidates) -> Scores:
        return Scores({site: math.nan if math.isnan(h) else -float(position)
                       for position, (site, h) in enumerate(candidates.entropies.items())})
