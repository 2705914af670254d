"""docs/architecture.md stays true: every module of depthcut is in its table, imports point down
the table only (a module imports modules of its own row or of rows above it in the file, which
are the layers below it), and no import cycle exists, function-level imports included."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "depthcut"
DOC = ROOT / "docs" / "architecture.md"


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The depthcut modules `name` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([module] if module else [])])
            for alias in node.names:  # `from depthcut import fold` imports depthcut.fold
                full = f"{module}.{alias.name}"
                found.add(full if full in known else module)
    return {module for module in found if module in known and module != name}


def layers() -> list[list[str]]:
    """The module table of docs/architecture.md, bottom row first: each row's module prefixes
    (`fold.py` -> depthcut.fold, `data/` -> depthcut.data and every module inside it)."""
    rows, in_table = [], False
    for line in DOC.read_text().splitlines():
        if line.startswith("| module"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        if in_table and not line.startswith("| ---"):
            first = line.split("|")[1]
            rows.append(["depthcut." + re.sub(r"(\.py|/)$", "", item).replace("/", ".")
                         for item in re.findall(r"`([^`]+)`", first)])
    return rows


def layer_of(module: str, table: list[list[str]]) -> int | None:
    """The row of the longest prefix naming `module`."""
    best = None
    for index, row in enumerate(table):
        for prefix in row:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = module_names()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_every_module_is_in_the_architecture_table(graph):
    table = layers()
    assert table, "docs/architecture.md has no module table"
    missing = sorted(m for m in graph if m != "depthcut" and layer_of(m, table) is None)
    assert not missing, f"modules missing from docs/architecture.md: {missing}"


def test_imports_point_down_the_table(graph):
    table = layers()
    upward = [f"{module} (row {layer_of(module, table)}) imports {target} "
              f"(row {layer_of(target, table)})"
              for module, targets in graph.items() if module != "depthcut"
              for target in targets
              if None not in (layer_of(target, table), layer_of(module, table))
              and layer_of(target, table) > layer_of(module, table)]
    assert not upward, "imports pointing up docs/architecture.md:\n" + "\n".join(upward)


def test_no_import_cycle(graph):
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return [*path[path.index(target):], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)
