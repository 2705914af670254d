"""What a model costs: multiply-adds counted (`count_macs`) and latency measured by a timer.

Every timing in depthcut goes through a `Timer` (`timer.py`): fold's "latency" policy,
`measure.measure_stage`, the report's Table 3 timing and the payoff cost. A timer backend is one
file here that registers itself (`eager.py`: the module called as it is, on CPU or CUDA); a
backend that compiles or exports first (ONNX Runtime, torch.compile) does so in `prepare`,
which receives the module and an example input. Pick one by name with `get_timer`.
"""

from depthcut.cost import eager  # noqa: F401 (registers the "eager" timer)
from depthcut.cost.macs import count_macs
from depthcut.cost.timer import (
    DEFAULT_TIMER,
    TIMERS,
    Timer,
    get_timer,
    median_seconds,
    register_timer,
)

__all__ = ["DEFAULT_TIMER", "TIMERS", "Timer", "count_macs", "get_timer", "median_seconds",
           "register_timer"]
