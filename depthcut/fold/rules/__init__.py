"""Fold rules, one file each; importing this package imports every file in it once.

A rule is a function `(state, node) -> bool` that looks at one node of the graph and proposes at
most one rewrite: it reads the ops around the node as `Affine`s (`state.affine`), builds a
`depthcut.fold.rewrite.Candidate` (the nodes replaced, the node they read, the merged op) and
returns `propose(state, candidate)`, which records the `Merge`, asks the policy and rewrites the
graph if the merge is taken. The file ends by registering the rule into its pass with its place
in that pass (`depthcut.fold.registry.register_rule`). To add a rule, copy `sequential.py` (the
plainest: two ops in a row as one) and add a property test of its equivalence (folded against
unfolded) like tests/test_fold.py; tests/test_fold_rules.py registers rules from a test.
"""

from __future__ import annotations

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
