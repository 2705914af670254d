"""Multiply-adds of a forward pass, by torch's own flop counter."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch's flop counter has formulas for the CUDA attention kernels, not for the CPU one that
# F.scaled_dot_product_attention runs here (timm's and torchvision's ViTs): without this its
# two matrix products would count as nothing.
_EXTRA_FLOPS = {op: _cpu_attention_flops for op in (
    getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None),) if op}


def count_macs(model: nn.Module, example_input: Tensor) -> int:
    """Forward multiply-adds by torch's flop counter (FLOPs / 2), CPU attention included."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    with torch.no_grad(), counter:
        model(example_input)
    return counter.get_total_flops() // 2
