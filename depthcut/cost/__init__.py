"""What a model costs: multiply-adds counted (`count_macs`) and latency measured by a timer.

Every timing in depthcut goes through a `Timer` (`timer.py`): fold's "latency" policy,
`measure.measure_stage`, the report's Table 3 timing and the payoff cost. A timer backend is one
file here that registers itself: `eager.py` (the module called as it is, on CPU or CUDA),
`onnx_runtime.py` ("onnxruntime": exported to ONNX once, ONNX Runtime's CPU execution provider,
the export checked against PyTorch), `compiled.py` ("compile": torch.compile with inductor),
`cuda_events.py` ("cuda": CUDA events as the clock). A backend that compiles or exports first
does so in `prepare`, which receives the module and an example input; one whose package or
device is missing is registered all the same and refuses when used. Pick one by name with
`get_timer`.
"""

# Imported for their registration, in the order `--latency-backend` lists them.
from depthcut.cost import eager  # noqa: F401, I001
from depthcut.cost import onnx_runtime  # noqa: F401
from depthcut.cost import compiled  # noqa: F401
from depthcut.cost import cuda_events  # noqa: F401
from depthcut.cost.macs import count_macs
from depthcut.cost.timer import (
    DEFAULT_TIMER,
    TIMERS,
    Timed,
    Timer,
    get_timer,
    median_seconds,
    medians,
    register_timer,
    round_robin,
)

__all__ = ["DEFAULT_TIMER", "TIMERS", "Timed", "Timer", "count_macs", "get_timer",
           "median_seconds", "medians", "register_timer", "round_robin"]
