"""Per-channel sequential merge: a per-channel scale (BatchNorm, ChannelScale) into the op
before or after it. It never costs anything, so it runs first, in its own pass, and the other
merges' cost is then judged on the ops that remain."""

from __future__ import annotations

import torch.fx

from depthcut.fold.registry import PER_CHANNEL, register_rule
from depthcut.fold.rules.sequential import sequential
from depthcut.fold.state import FoldState


def per_channel_sequential(state: FoldState, node: torch.fx.Node) -> bool:
    """A sequential merge with a per-channel scale (BatchNorm, ChannelScale): never costs."""
    return sequential(state, node, diagonal_only=True)


register_rule(PER_CHANNEL, per_channel_sequential, order=20)
