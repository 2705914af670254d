"""Folding: merge the linear operators around linearized and dead sites (METHODS section 6).

A linearized site (Identity) only makes a network faster once the convolutions on each side are
merged into one. `fold` (`api.py`) traces the model (`graph.trace`) and runs a short sequence of
passes over one `FoldState` (`state.py`; the passes are `passes.PASSES`, in order):

- `drop_no_ops`: Identity and eval-mode Dropout calls are dropped;
- `remove_dead_branches`: everything computed only from an always-OFF site (`layers.Zero`) is
  a constant; it is evaluated once and kept as a buffer (a residual block reduces to its
  shortcut plus a per-channel bias). If the output no longer depends on the input, that is layer
  collapse and `FoldError` says so;
- `merge_per_channel`, then `merge_linear_ops`: the rules of `rules/`, one file each, registered
  into their pass in a fixed order (`registry.register_rule`), rewrite one node at a time, first
  rule at the first node in graph order, until none applies. *into_bias*: a per-channel
  constant added to an op's output goes into its bias; *per_channel_sequential* and
  *sequential*: op B reading only op A's output becomes one op; *chain*: a maximal run of
  linear ops becomes the partition into merged segments of least total cost; *parallel*: op
  A(x) + op B(x) or A(x) + x becomes one op (RepVGG-style kernel embedding). The first pass
  allows only per-channel merges. The second decides every chain, then every parallel merge,
  and again until nothing changes: a residual block whose branch is linear becomes one op, then
  one op with its shortcut (centre tap), and the chains that makes longer are decided again.
  A policy without a segment cost (a plain callable, for one) decides merge by merge
  (sequential, then parallel) instead of chains.

Every linear op is first read as an `Affine` (`depthcut.affine`); merges are computed in
float64. A merged chain is exact when no op after its first spatial op (kernel > 1) zero-pads:
the linear parts then agree everywhere, and what the border still needs is a fixed per-position
bias map, original(0) - merged(0), for the input size the model is folded at
(`layers.BiasMapConv2d`, which refuses any other size with `InputSizeError`; the report gives
`input_size` and `bias_maps`). Otherwise the merge is border-approximate, and the report gives
the measured deviation. Each proposed merge is a `Merge` record (`rewrite.propose`); the policy
(`policy.py`: a `FoldPolicy`, "macs", "shallow", "all" and "latency" being presets in
`POLICIES`, `FormsPolicy` one preset per part of the model, or a plain callable
`(Merge) -> bool`) decides whether it is taken, with both sides at hand to run (`MergeSides`);
"macs", "shallow" and "latency" take exact merges only. Folding a bias never costs: it is
always taken. The report (`report.py`) lists every merge, taken or declined, and why.
"""

from depthcut.affine import add_parallel, affine_of, compose
from depthcut.fold import rules  # noqa: F401 (imports every rule: each registers itself)
from depthcut.fold.api import fold
from depthcut.fold.passes import PASSES
from depthcut.fold.policy import (
    APPROXIMATE,
    POLICIES,
    AllPolicy,
    CallablePolicy,
    FoldPolicy,
    FormsPolicy,
    LatencyPolicy,
    MacsPolicy,
    Merge,
    MergeSides,
    ShallowPolicy,
)
from depthcut.fold.registry import LINEAR, PER_CHANNEL, register_rule, unregister_rule
from depthcut.fold.report import FoldReport, compare_outputs
from depthcut.fold.rewrite import Candidate, propose
from depthcut.fold.state import FoldError, FoldState
from depthcut.layers import BiasMapConv2d, InputSizeError, Zero

__all__ = [
    "APPROXIMATE",
    "LINEAR",
    "PASSES",
    "PER_CHANNEL",
    "POLICIES",
    "AllPolicy",
    "BiasMapConv2d",
    "CallablePolicy",
    "Candidate",
    "FoldError",
    "FoldPolicy",
    "FoldReport",
    "FoldState",
    "FormsPolicy",
    "InputSizeError",
    "LatencyPolicy",
    "MacsPolicy",
    "Merge",
    "MergeSides",
    "ShallowPolicy",
    "Zero",
    "add_parallel",
    "affine_of",
    "compare_outputs",
    "compose",
    "fold",
    "propose",
    "register_rule",
    "unregister_rule",
]
