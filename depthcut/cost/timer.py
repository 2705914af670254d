"""The timer interface: how long a module takes on an input, as one runtime runs it.

A `Timer` turns (module, example input) into a call ready to time (`prepare`: the place to
compile or export, once), `measure` gives a prepared call's median time (the place for another
clock, such as CUDA events), and `seconds` is both in one. Timers register by name
(`register_timer`, in their own file) and are looked up with `get_timer`. Figures meant to be
compared are timed side by side: `round_robin` over prepared calls, `medians` of its rounds.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Mapping
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from depthcut.errors import ConfigError

DEFAULT_TIMER = "eager"


def median_seconds(fn: Callable[[], object], repeats: int = 15, warmup: int = 3, *,
                   device: torch.device | str | None = None) -> float:
    """Median wall time of `fn()` under no_grad, after `warmup` calls. CUDA is synchronized
    before and after each timed call when `device` is a CUDA device (None: whenever CUDA is
    available, since a bare closure does not say where it runs)."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class Timer(ABC):
    """A latency backend. Subclasses set `name` and implement `prepare`; they may override
    `measure` (by default the median wall time over `repeats` calls after `warmup`)."""

    name: str

    @abstractmethod
    def prepare(self, model: nn.Module | Callable[[Tensor], Tensor],
                example: Tensor) -> Callable[[], object]:
        """A call running `model` on `example` in this backend (compiled or exported here, once;
        a backend that needs an `nn.Module` may refuse a bare callable)."""

    def measure(self, call: Callable[[], object], device: torch.device, repeats: int = 15,
                warmup: int = 3) -> float:
        """Median seconds of a prepared `call()` whose inputs live on `device`."""
        return median_seconds(call, repeats, warmup, device=device)

    def describe(self) -> str:
        """The backend as a table or summary names it: its name, what runs it and the thread
        count, since a latency means little without them."""
        return f"{self.name} (PyTorch {torch.__version__}), {torch.get_num_threads()} threads"

    def seconds(self, model: nn.Module | Callable[[Tensor], Tensor], example: Tensor,
                repeats: int = 15, warmup: int = 3) -> float:
        """Median seconds of one forward of `model` on `example` (prepared, then measured; to
        time one model many times, prepare it once and `measure` the call)."""
        return self.measure(self.prepare(model, example), example.device, repeats, warmup)


class Timed(NamedTuple):
    """One prepared call to time round-robin: its timer, the call, where its inputs live and
    how many calls make one round's median."""

    timer: Timer
    call: Callable[[], object]
    device: torch.device
    repeats: int = 1


Key = TypeVar("Key", bound=Hashable)


def round_robin(calls: Mapping[Key, Timed], rounds: int, *, deadline: float | None = None,
                on_round: Callable[[int], None] | None = None) -> dict[Key, list[float]]:
    """Seconds of every prepared call, per round: each round times every call once in turn
    (after one warm-up call), so that a burst of load from another process, or a machine's
    drift, falls on all of them alike instead of on whichever was timed then. Stops after the
    round that ends past `deadline` (a perf_counter time; at least one round); `on_round(done)`
    after each. A figure is then the median over its rounds."""
    times: dict[Key, list[float]] = {key: [] for key in calls}
    for done in range(1, rounds + 1):
        for key, timed in calls.items():
            times[key].append(timed.timer.measure(timed.call, timed.device, timed.repeats,
                                                  warmup=1))
        if on_round is not None:
            on_round(done)
        if deadline is not None and time.perf_counter() > deadline:
            break
    return times


def medians(times: Mapping[Key, list[float]]) -> dict[Key, float]:
    """The median of each call's rounds (`round_robin`'s answer)."""
    return {key: statistics.median(values) for key, values in times.items()}


TIMERS: dict[str, Timer] = {}


def register_timer(timer: Timer) -> Timer:
    """Make `timer` available by its name (a backend's file calls this once)."""
    if timer.name in TIMERS and TIMERS[timer.name] is not timer:
        raise ConfigError(f"a timer named {timer.name!r} is already registered")
    TIMERS[timer.name] = timer
    return timer


def get_timer(timer: str | Timer = DEFAULT_TIMER) -> Timer:
    """The registered timer of that name (a Timer is returned as it is)."""
    if isinstance(timer, Timer):
        return timer
    if timer not in TIMERS:
        raise ConfigError(f"unknown timer {timer!r}; choose one of {', '.join(TIMERS)}")
    return TIMERS[timer]
