"""Which dimension of a site's pre-activation holds its neurons, read from the op that produced
it: the channels (dim 1) of Conv1d/Conv2d/Conv3d maps and BatchNorm/GroupNorm outputs, the last
dimension of Linear and LayerNorm outputs (tokens (N, T, D), a channels-last (N, H, W, C) map).

The rank alone cannot say: a 3-D tensor is a Conv1d map (N, C, L) or tokens (N, T, D), a 4-D one
a Conv2d map or a channels-last map after a Linear (ConvNeXt). Entropy counting
(`entropy.count_states`) and the ChannelScale of a frozen site (`sites.freeze`) take their axis
from here unless the caller names one; a site whose producer is not found (untraceable model,
pooling before the site) keeps the rank rule `layers.default_channel_dim`.
"""

from __future__ import annotations

import torch.fx
import torch.nn.functional as F
from torch import nn

from depthcut.graph import PASS_THROUGH, TraceError, is_add, trace_graph
from depthcut.layers import STAND_IN_TYPES

CHANNELS_FIRST: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
CHANNELS_LAST: tuple[type[nn.Module], ...] = (nn.Linear, nn.LayerNorm)
FUNCTIONS_FIRST = (F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm)
FUNCTIONS_LAST = (F.linear, F.layer_norm)
_MAX_STEPS = 64  # how far back through no-ops and adds a producer is looked for


def _producer_axis(model: nn.Module, node: torch.fx.Node) -> int | None:
    """1 or -1: the neuron axis of the value `node` computes, from the op that produced it
    (through no-ops, stand-ins and the first operand of residual adds); None if not found."""
    current: object = node
    for _ in range(_MAX_STEPS):
        if not isinstance(current, torch.fx.Node):
            return None
        if current.op == "call_module":
            module = model.get_submodule(str(current.target))
            if isinstance(module, CHANNELS_FIRST):
                return 1
            if isinstance(module, CHANNELS_LAST):
                return -1
            if not isinstance(module, PASS_THROUGH + STAND_IN_TYPES) or not current.args:
                return None
        elif current.op == "call_function" and current.target in FUNCTIONS_FIRST:
            return 1
        elif current.op == "call_function" and current.target in FUNCTIONS_LAST:
            return -1
        elif not is_add(current):
            return None
        current = current.args[0]
    return None


def neuron_axes(model: nn.Module, sites: list[str]) -> dict[str, int | None]:
    """For each site (a module name), the neuron axis of its input from its producer: 1
    (channels), -1 (last dim), or None (not found: the rank rule applies)."""
    try:
        graph = trace_graph(model)
    except TraceError:
        return dict.fromkeys(sites)
    wanted = set(sites)
    axes: dict[str, int | None] = dict.fromkeys(sites)
    for node in graph.nodes:
        if node.op == "call_module" and node.target in wanted and node.args:
            axes[str(node.target)] = _producer_axis(model, node.args[0])
    return axes
