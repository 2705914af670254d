"""The "cuda" timer: the module in PyTorch on the GPU, timed by CUDA events, the GPU's own clock
(the host's clock around a synchronize also counts the launch and the wait). A model or input
still on the CPU (`measure_stage` folds on the CPU) is copied to the GPU once in `prepare`.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable

import torch
from torch import Tensor, nn

from depthcut.cost.timer import Timer, register_timer
from depthcut.errors import ConfigError


def require_cuda() -> None:
    """ConfigError unless PyTorch sees a CUDA GPU."""
    if not torch.cuda.is_available():
        raise ConfigError("the cuda latency backend times on a CUDA GPU and PyTorch sees none "
                          f"here (torch {torch.__version__}); choose another --latency-backend")


def on_gpu(model: nn.Module | Callable[[Tensor], Tensor], example: Tensor
           ) -> tuple[nn.Module | Callable[[Tensor], Tensor], Tensor]:
    """`model` and `example` on the GPU: a module with tensors elsewhere is copied there (the
    caller's stays where it is), a bare callable is taken as it is."""
    device = example.device if example.device.type == "cuda" else torch.device("cuda")
    if isinstance(model, nn.Module):
        tensors = [*model.parameters(), *model.buffers()]
        if any(tensor.device != device for tensor in tensors):
            model = copy.deepcopy(model).to(device)
    return model, example.to(device)


class CudaEventTimer(Timer):
    name = "cuda"

    def prepare(self, model: nn.Module | Callable[[Tensor], Tensor],
                example: Tensor) -> Callable[[], object]:
        require_cuda()
        model, example = on_gpu(model, example)
        return lambda: model(example)

    def measure(self, call: Callable[[], object], device: torch.device, repeats: int = 15,
                warmup: int = 3) -> float:
        """Median seconds between CUDA events recorded around each call, after `warmup`."""
        require_cuda()
        with torch.no_grad():
            for _ in range(warmup):
                call()
            torch.cuda.synchronize()
            milliseconds = []
            for _ in range(repeats):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                call()
                end.record()
                end.synchronize()
                milliseconds.append(start.elapsed_time(end))
        return statistics.median(milliseconds) / 1e3

    def describe(self) -> str:
        card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        return f"cuda (CUDA events, PyTorch {torch.__version__}, {card})"


register_timer(CudaEventTimer())
