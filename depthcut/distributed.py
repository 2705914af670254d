"""Several processes, one run: torch.distributed set-up and the few collective steps depthcut
needs. Launch with `torchrun --nproc_per_node N -m depthcut ...` (NCCL on GPUs, gloo on CPU).

Each rank trains on its shard of the training split inside DistributedDataParallel; entropy
counts are summed over ranks before entropies are computed, so every rank chooses the same
site as one process would on the same data; evaluation runs on the full split; only rank 0
writes records, checkpoints and summaries.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# How long the other ranks wait in `broadcast_object` while one works (e.g. times a latency
# table on a large model): longer than NCCL's default, still not forever.
OBJECT_TIMEOUT = timedelta(hours=3)
_objects_group: Any = None  # the gloo group `broadcast_object` uses, made on first use


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when running alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def shutdown() -> None:
    global _objects_group
    _objects_group = None
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Only this process writes files."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place (a no-op alone); float64 stays float64 (exact counts)."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a checkpoint)."""
    if world_size() > 1:
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` (pickled) on every rank; `obj` itself alone. Sent over a gloo group
    with a long timeout: waiting ranks then sleep on CPU (an NCCL wait may spin a core while
    rank 0 times on CPU) and outlast NCCL's shorter timeout. Every rank must call it."""
    global _objects_group
    if world_size() <= 1:
        return obj
    if _objects_group is None:  # collective: every rank gets here at the same call
        _objects_group = (dist.new_group(backend="gloo", timeout=OBJECT_TIMEOUT)
                          if dist.is_gloo_available() else dist.group.WORLD)
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_objects_group)
    return box[0]
