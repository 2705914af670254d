"""What every pass and rule of a fold shares: the graph being rewritten and what it records.

`FoldState` carries the traced model, the example it is folded at, the policy and the record of
merges; rules read ops through it (`affine`, read once per module) and ask it for node shapes
(`shape_of`, `spatial_size`), which `annotate_shapes` wrote before the first merge pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp

from depthcut.affine import Affine, affine_of
from depthcut.errors import DepthcutError
from depthcut.fold.policy import FoldPolicy, Merge
from depthcut.graph import module_of


class FoldError(DepthcutError, ValueError):
    """The model cannot be folded as asked (untraceable, layer collapse, bad policy)."""


def shape_of(node: torch.fx.Node) -> torch.Size:
    return node.meta["tensor_meta"].shape


def spatial_size(node: torch.fx.Node) -> tuple[int, int] | None:
    """(H, W) of a (N, C, H, W) tensor, else None."""
    shape = shape_of(node)
    return (int(shape[2]), int(shape[3])) if len(shape) == 4 else None


@dataclass
class FoldState:
    """What the passes share: the graph being rewritten, the example, the policy, the record."""

    gm: torch.fx.GraphModule
    example: Tensor
    policy: FoldPolicy
    merges: list[Merge] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    declined: set[tuple] = field(default_factory=set)  # never proposed twice
    made: int = 0
    origin: dict[str, list[str]] = field(default_factory=dict)  # folded module -> originals
    affines: dict[tuple[str, int], Affine | None] = field(default_factory=dict)  # read once
    ops_before: int = 0  # of the traced model, before any pass
    depth_before: int = 0

    @property
    def folded_at(self) -> tuple[int, ...]:
        """The per-sample input shape the model is folded at."""
        return tuple(self.example.shape[1:])

    def propagate(self) -> None:
        """Recompile and refresh every node's shape (the rules read them)."""
        self.gm.graph.lint()
        self.gm.recompile()
        ShapeProp(self.gm).propagate(self.example[:1])

    def module(self, node: torch.fx.Node) -> nn.Module | None:
        return module_of(self.gm, node)

    def affine(self, node: torch.fx.Node, source: torch.fx.Node) -> Affine | None:
        """The op `node` calls as an Affine, reading `source` (a copy: rules may change it)."""
        if node.op != "call_module":
            return None
        key = (str(node.target), len(shape_of(source)))
        if key not in self.affines:  # a module name is never reused for another module
            self.affines[key] = affine_of(self.module(node), key[1])
        op = self.affines[key]
        return None if op is None else dataclasses.replace(op)

    def names(self, node: torch.fx.Node) -> list[str]:
        """The original modules a node's module stands for (several once it is a merge)."""
        return self.origin.get(str(node.target), [str(node.target)])

    def like(self, source: torch.fx.Node) -> Tensor:
        """An empty tensor with the dtype and device a merged op reading `source` takes: the
        source's dtype, not the model input's (token ids are int64, the activations the op
        sees are floating point)."""
        return self.example.new_empty(0, dtype=source.meta["tensor_meta"].dtype)
