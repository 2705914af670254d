"""Fault injection for the resume tests: die with SIGKILL at a named point of a run.

Set DEPTHCUT_DIE_AT="point:N" to kill the process the N-th time `point` is reached (points:
train-step, entropy-batch, stage-end, and write:FILENAME half-way through writing that file).
Unset, this costs one dict lookup.
"""

from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def die_at(point: str) -> None:
    target = os.environ.get("DEPTHCUT_DIE_AT")
    if not target:
        return
    name, _, count = target.rpartition(":")
    if name != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
