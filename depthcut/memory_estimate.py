"""Will the training fit in memory? Estimated before anything is allocated.

A run too large for its machine (e.g. `--width 100`: 1.1e11 parameters) would otherwise
allocate until the operating system kills it, minutes later and without a word. The model is
built on the meta device (shapes without storage, in milliseconds at any width) and one batch
is pushed through it there, with hooks summing the sizes of every module's output. Training
then needs at least:

- the weights `MODEL_COPIES` times: the weights, their gradients, SGD's momentum buffers, and
  a second model (the teacher when distilling, the dense model kept beside the one finetuned,
  the copy a checkpoint is saved from);
- the activations of one batch `ACTIVATION_FACTOR` times: the outputs autograd keeps for the
  backward pass, and their gradients during it.

This is a floor, not a ceiling (allocator slack, workspaces and the decoded dataset come on
top), so a run is refused only when even the floor exceeds the memory available: a refusal
is certain, and a run that passes may still be tight. DEPTHCUT_NO_MEMORY_CHECK=1 skips it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from depthcut.errors import ConfigError
from depthcut.models import ModelSpec

MODEL_COPIES = 4
ACTIVATION_FACTOR = 2
SKIP_VARIABLE = "DEPTHCUT_NO_MEMORY_CHECK"


class InsufficientMemoryError(ConfigError):
    """The run cannot fit in the memory of its device."""


@dataclass(frozen=True)
class MemoryEstimate:
    """What training a model needs at least, in bytes (see the module docstring)."""

    parameters: int
    activation_values: int | None  # the module outputs of one batch; None: not measured
    batch_size: int
    activation_bytes_per_value: int = 4  # 2 under bf16 autocast

    @property
    def weights_bytes(self) -> int:
        return MODEL_COPIES * 4 * self.parameters

    @property
    def activations_bytes(self) -> int:
        values = self.activation_values or 0
        return ACTIVATION_FACTOR * self.activation_bytes_per_value * values

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activations_bytes

    def describe(self) -> str:
        parts = [f"{self.parameters:.3g} parameters: {human_bytes(self.weights_bytes)} for "
                 "weights, gradients, momentum and a second model"]
        if self.activation_values is not None:
            parts.append(f"activations of a batch of {self.batch_size}: "
                         f"{human_bytes(self.activations_bytes)}")
        return f"at least {human_bytes(self.total_bytes)} ({'; '.join(parts)})"


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def meta_model(spec: ModelSpec) -> nn.Module | None:
    """`spec`'s model on the meta device (no memory); None when the model cannot be built
    there (an external library that computes on its weights while building)."""
    try:
        with torch.device("meta"):
            return spec.build()
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - no estimate then; the real build reports real errors
        return None


def activation_values(model: nn.Module, input_shape: Sequence[int], batch_size: int,
                      tokens: bool) -> int | None:
    """The number of values the modules of `model` (on the meta device) output for one batch
    of inputs of `input_shape` (token ids when `tokens`); None when the forward fails there."""
    total = 0

    def count(module: nn.Module, inputs: object, output: object) -> None:
        nonlocal total
        if getattr(module, "inplace", False):
            return  # writes into its input, which is counted already
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel()

    leaves = [module for module in model.modules() if not any(True for _ in module.children())]
    hooks = [module.register_forward_hook(count) for module in leaves]
    dtype = torch.long if tokens else torch.float32
    try:
        model(torch.zeros((batch_size, *input_shape), dtype=dtype, device="meta"))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: parameters only
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return total


def estimate_training_memory(model: nn.Module, input_shape: Sequence[int] | None,
                             batch_size: int, *, tokens: bool = False, amp: bool = False
                             ) -> MemoryEstimate:
    """The memory training `model` (on the meta device) needs at least; activations are left
    out when `input_shape` is None (not known before the data is decoded)."""
    values = (None if input_shape is None
              else activation_values(model, input_shape, batch_size, tokens))
    return MemoryEstimate(parameters=sum(p.numel() for p in model.parameters()),
                          activation_values=values, batch_size=batch_size,
                          activation_bytes_per_value=2 if amp else 4)


def available_memory(device: torch.device) -> tuple[int, str] | None:
    """Bytes free for this process on `device`, and where the figure comes from; None when it
    cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {device}"
    if device.type != "cpu":
        return None
    figures = []
    meminfo = _meminfo_available()
    if meminfo is not None:
        figures.append((meminfo, "MemAvailable in /proc/meminfo"))
    cgroup = _cgroup_available()
    if cgroup is not None:
        figures.append((cgroup, "the memory limit of this container (cgroup)"))
    if not figures:
        try:
            pages = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
        figures.append((pages, "free physical memory"))
    return min(figures)


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """The cgroup's limit minus its usage (v2, then v1); None without a limit."""
    for limit_file, usage_file in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
             "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # v1 says "no limit" with a huge number
            return None
        return max(int(limit) - usage, 0)
    return None


def check_fits(estimate: MemoryEstimate, device: torch.device, what: str) -> None:
    """Refuse a run whose estimate exceeds the memory available on `device`; `what` names the
    model ("resnet18 x100")."""
    if os.environ.get(SKIP_VARIABLE):
        return
    available = available_memory(device)
    if available is None or estimate.total_bytes <= available[0]:
        return
    free, source = available
    change = ("--width" if estimate.weights_bytes > free
              else "--batch-size (or --width)")
    raise InsufficientMemoryError(
        f"training {what} needs {estimate.describe()}, but only {human_bytes(free)} is "
        f"available on {device} ({source}): lower {change}. (The estimate is a floor, from "
        f"the model built on the meta device; {SKIP_VARIABLE}=1 skips this check.)"
    )
