"""The "eager" timer: the module called as it is, in PyTorch, on the example's device (CPU, or
CUDA with a synchronize around each timed call)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from depthcut.cost.timer import Timer, register_timer


class EagerTimer(Timer):
    name = "eager"

    def prepare(self, model: nn.Module | Callable[[Tensor], Tensor],
                example: Tensor) -> Callable[[], object]:
        return lambda: model(example)


register_timer(EagerTimer())
