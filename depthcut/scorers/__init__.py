"""Site choice: which of the remaining sites a method linearizes first.

A scorer ranks the sites a stage may linearize (`Candidates`): lower score, linearize first;
`choose_sites` then takes the k lowest. Methods are handed a scorer (or build the one their
config's `choose` names, `scorer_for`) and never ask which one they got, so tests inject their
own, and a new way to choose is one file in this package: a `Scorer` subclass decorated with
`@register_scorer`, imported (hence registered) with the package.
"""

from __future__ import annotations

import copy
import importlib
import math
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from depthcut.entropy import SiteCounts, layer_entropies
from depthcut.errors import ConfigError


@dataclass
class Candidates:
    """What a stage knows of the sites it may linearize, all a scorer reads."""

    model: nn.Module  # the current model: a scorer leaves it, and the RNGs, as they were
    # Layer entropy in bits per remaining site, in forward order (NaN: never reached).
    entropies: dict[str, float]
    counts: Mapping[str, SiteCounts | None] = field(default_factory=dict)  # their sign counts
    examples: Iterable = ()  # batches of the unaugmented training split (`example_batch`)
    stage: int = 0  # the stage the choice is for (a seed, a schedule)
    # The run so far, for scorers whose choice is relative to the dense model (a latency
    # budget): the dense model where the run holds it, and the stage records (dense first).
    dense: nn.Module | None = None
    records: Sequence[Mapping] = ()

    @classmethod
    def from_counts(cls, model: nn.Module, counts: Mapping[str, SiteCounts | None],
                    examples: Iterable = (), stage: int = 0, dense: nn.Module | None = None,
                    records: Sequence[Mapping] = ()) -> Candidates:
        """Candidates from a stage's sign counts (`StageRun.count`), entropies derived."""
        return cls(model, layer_entropies(dict(counts)), counts, examples, stage, dense,
                   records)


@dataclass
class Scores:
    """A scorer's answer: a score per site (lower: linearize first; NaN: never chosen) and the
    fields it adds to the stage record (in their order; none for a plain ranking)."""

    scores: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)
    # Why no site is chosen when the scorer leaves every one NaN on purpose (a plan that is
    # already met), for the method's stop reason.
    nothing_chosen: str | None = None


class Scorer(ABC):
    """Ranks candidate sites. Subclasses set `name` (what `choose` says) and implement `score`;
    `from_config` reads their settings from a method's config."""

    name: ClassVar[str]
    # Record fields that say what choosing cost (seconds, cache hits), not what was chosen:
    # they may differ between two identical calls.
    volatile_fields: ClassVar[tuple[str, ...]] = ()
    # Whether it reads `Candidates.dense` (a run then loads its dense model for it).
    needs_dense: ClassVar[bool] = False

    @classmethod
    def from_config(cls, config: Any) -> Scorer:
        """The scorer a method's config asks for (default: one without settings)."""
        return cls()

    @abstractmethod
    def score(self, candidates: Candidates) -> Scores:
        """Scores for the candidates' sites (and the record fields that explain them)."""


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make `cls` choosable by its `name` (a config's `choose`, `--choose`)."""
    if SCORERS.get(cls.name, cls) is not cls:
        raise ValueError(f"a scorer named {cls.name!r} is already registered: "
                         f"{SCORERS[cls.name].__qualname__}")
    SCORERS[cls.name] = cls
    return cls


def check_choice(name: str) -> str:
    """`name` if a scorer is registered under it, else a ConfigError naming the choices."""
    if name not in SCORERS:
        raise ConfigError(
            f"choose must be one of {', '.join(map(repr, SCORERS))}, got {name!r}")
    return name


def scorer_for(config: Any) -> Scorer:
    """The scorer a method's config names in `choose`, built from that config's settings."""
    return SCORERS[check_choice(config.choose)].from_config(config)


def choose_sites(scores: Mapping[str, float], k: int) -> list[str]:
    """The k sites of lowest score; ties keep forward order; NaN (unreached) sites are skipped."""
    measured = [(s, i, name) for i, (name, s) in enumerate(scores.items()) if not math.isnan(s)]
    return [name for _, _, name in sorted(measured)[:k]]


def example_batch(batches: Iterable, size: int) -> Tensor:
    """The first `size` inputs of `batches`, read from a shallow copy so that a BatchLoader's
    epoch counter is not advanced."""
    inputs = next(iter(copy.copy(batches)))
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    return inputs[:size]


# Every module of this package registers its scorers; they are listed in name order.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
for _name in sorted(SCORERS):
    SCORERS[_name] = SCORERS.pop(_name)

CHOICES = tuple(SCORERS)  # the scorers shipped (the CLI's --choose)
