"""The timer interface: how long a module takes on an input, as one runtime runs it.

A `Timer` turns (module, example input) into a call ready to time (`prepare`: the place to
compile or export, once), `measure` gives a prepared call's median time (the place for another
clock, such as CUDA events), and `seconds` is both in one. Timers register by name
(`register_timer`, in their own file) and are looked up with `get_timer`.
"""

from __future__ import annotations

import statistics
import time
from abc import ABC, abstractmethod
from collections.abc import Callable

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
