"""The "compile" timer: the module compiled by torch.compile (inductor) for the example's device
and shape, once in `prepare`, whose first call does the compiling, so that no timed call (nor
the warm-up, which then only warms caches) pays for it.

Each prepared module gets a function of its own to compile (a fresh code object): torch.compile
keeps its compiled graphs per code object, so modules of one class prepared side by side (the
stages of a run) would otherwise share one list of graphs, be checked against each other's
guards on every call and, past torch's recompile limit, silently run uncompiled.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable

import torch
from torch import Tensor, nn

from depthcut.cost.timer import Timer, register_timer
from depthcut.errors import ConfigError

_numbers = itertools.count()


def _forward(model: nn.Module | Callable[[Tensor], Tensor], x: Tensor) -> object:
    return model(x)


def fresh_forward() -> Callable[[nn.Module | Callable[[Tensor], Tensor], Tensor], object]:
    """`_forward` with a code object of its own (see the module docstring)."""
    code = _forward.__code__.replace(co_name=f"timed_forward_{next(_numbers)}")
    return types.FunctionType(code, _forward.__globals__, code.co_name)


class CompileTimer(Timer):
    name = "compile"
    backend = "inductor"

    def prepare(self, model: nn.Module | Callable[[Tensor], Tensor],
                example: Tensor) -> Callable[[], object]:
        compiled = torch.compile(fresh_forward(), backend=self.backend, dynamic=False)
        try:
            with torch.no_grad():
                compiled(model, example)
        except Exception as error:  # noqa: BLE001 - inductor and its compiler raise many kinds
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise ConfigError(
                f"torch.compile ({self.backend}) could not compile {type(model).__name__} here: "
                f"{type(error).__name__}: {first_line}; choose another --latency-backend"
            ) from error
        return lambda: compiled(model, example)

    def describe(self) -> str:
        return (f"compile (torch.compile {self.backend}, PyTorch {torch.__version__}), "
                f"{torch.get_num_threads()} threads")


register_timer(CompileTimer())
