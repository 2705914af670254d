"""The graph core: one tracer (stand-ins kept as leaves), node kinds, and the queries fold and
pruning ask (input of a node, what depends on the input, layer collapse, op counts, depth)."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from depthcut.graph import (
    TraceError,
    count_ops,
    depends_on_input,
    input_of,
    is_add,
    longest_linear_path,
    module_of,
    output_depends_on_input,
    trace,
    trace_graph,
)
from depthcut.layers import ChannelScale, Zero
from depthcut.sites import silence


class Block(nn.Module):
    """conv -> act -> conv, with the input added back when `residual`."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.act(self.conv1(x)))
        return y + self.skip(x) if self.residual else y


def node_of(gm: torch.fx.GraphModule, target: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == target)


def test_input_of_and_module_of() -> None:
    gm = trace(Block(residual=True))
    act, conv1 = node_of(gm, "act"), node_of(gm, "conv1")
    assert input_of(act) is conv1
    assert isinstance(module_of(gm, act), nn.ReLU)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    assert input_of(conv1) is placeholder
    add = next(n for n in gm.graph.nodes if is_add(n))
    assert input_of(placeholder) is None and input_of(add) is None  # not module calls
    assert module_of(gm, add) is None


def test_is_add_kinds() -> None:
    class Adds(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.add(x + x, x).add(x) * 2

    nodes = list(trace(Adds()).graph.nodes)
    assert sum(is_add(n) for n in nodes) == 3
    assert sum(is_add(n, methods=False) for n in nodes) == 2  # x.add(y) is a method call


def test_depends_on_input_with_a_zero_site() -> None:
    gm = trace(silence(Block(residual=True), ["act"]))
    depends = depends_on_input(gm)
    assert depends[node_of(gm, "conv1")]
    assert not depends[node_of(gm, "act")]  # Zero: constant
    assert not depends[node_of(gm, "conv2")]  # computed from the Zero only
    assert depends[next(n for n in gm.graph.nodes if is_add(n))]  # the shortcut
    assert output_depends_on_input(gm)


@pytest.mark.parametrize(("residual", "collapse"), [(False, True), (True, False)])
def test_collapse_is_a_graph_query(residual: bool, collapse: bool) -> None:
    model = Block(residual)
    assert output_depends_on_input(trace(model))  # nothing silenced
    assert output_depends_on_input(trace(silence(model, ["act"]))) is not collapse


def test_get_attr_constants_do_not_depend_on_the_input() -> None:
    class Biased(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("offset", torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.offset

    gm = trace(Biased())
    depends = depends_on_input(gm)
    offset = next(n for n in gm.graph.nodes if n.op == "get_attr")
    assert not depends[offset] and output_depends_on_input(gm)


def test_the_one_tracer_keeps_stand_ins_as_leaves() -> None:
    model = nn.Sequential(nn.Linear(3, 3), Zero(), nn.Linear(3, 3), ChannelScale(torch.ones(3)))
    gm = trace(model)
    called = {type(module_of(gm, n)) for n in gm.graph.nodes if n.op == "call_module"}
    assert {Zero, ChannelScale} <= called
    assert not any(n.op in ("call_function", "call_method") for n in gm.graph.nodes)
    # torch.fx's own tracer inlines a Zero (fold could not see it), and cannot trace a
    # ChannelScale at all (its channel axis depends on the input's rank).
    plain = torch.fx.Tracer().trace(nn.Sequential(nn.Linear(3, 3), Zero()))
    assert [n.target for n in plain.nodes if n.op == "call_function"] == [torch.zeros_like]
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.Tracer().trace(model)
    x = torch.randn(2, 3)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    assert all(n.type is None for n in trace_graph(model).nodes)  # picklable GraphModules


def test_trace_error_keeps_the_cause() -> None:
    class Branchy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x if x.sum() > 0 else -x

    with pytest.raises(TraceError, match="torch.fx cannot trace Branchy") as caught:
        trace(Branchy())
    assert caught.value.cause is caught.value.__cause__
    assert isinstance(caught.value, ValueError)


def test_op_count_and_longest_linear_path() -> None:
    gm = trace(Block(residual=True))
    assert count_ops(gm) == 4  # conv1, act, conv2, add; the Identity skip is no op
    assert longest_linear_path(gm) == 2
    stack = trace(nn.Sequential(nn.Linear(3, 3), nn.Identity(), nn.Linear(3, 3), nn.Linear(3, 2)))
    assert count_ops(stack) == 3 and longest_linear_path(stack) == 3
