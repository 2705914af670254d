"""The paper's choice (EASIER, METHODS section 3): the lowest layer entropy first."""

from __future__ import annotations

from depthcut.scorers import Candidates, Scorer, Scores, register_scorer


@register_scorer
class EntropyScorer(Scorer):
    """Score = layer entropy in bits: the most nearly linear site goes first."""

    name = "entropy"

    def score(self, candidates: Candidates) -> Scores:
        return Scores(dict(candidates.entropies))
