"""The library's shape: functions short enough to read at once."""

from __future__ import annotations

import ast
import glob
import os

LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipeline")
MAX_LINES = 60


def test_no_function_in_the_library_is_longer_than_60_lines():
    found = []
    for path in sorted(glob.glob(os.path.join(LIBRARY, "**", "*.py"), recursive=True)):
        with open(path) as f:
            tree = ast.parse(f.read())
        found += [f"{os.path.basename(path)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                  for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert len(glob.glob(os.path.join(LIBRARY, "**", "*.py"), recursive=True)) > 10, "the library was not found"
    assert not found, found


# The stages from the bottom up: a module may import from its own layer or those below, never above,
# so a stage's code can be read without the stages that use it.
LAYERS = {"errors": 0, "names": 0, "redact": 0, "logs": 0, "versions": 0, "faults": 0, "data": 1, "images": 2,
          "nets": 3, "options": 4, "compose": 4, "config": 4, "batch": 5, "training": 6, "audit": 6, "serving": 7, "prechecks": 8, "runall": 8}


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 and parts[0] == "pipeline" else None


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
        if node.module == "pipeline":
            return [f"pipeline.{alias.name}" for alias in node.names]
        return [node.module]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.startswith("pipeline")]
    return []


def test_the_library_imports_only_downward_through_its_stages():
    modules = sorted(glob.glob(os.path.join(LIBRARY, "**", "*.py"), recursive=True))
    upward, unplaced = [], []
    for path in modules:
        module = "pipeline." + os.path.relpath(path, LIBRARY)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        if module == "pipeline.__init__":
            continue
        mine = _layer(module)
        if mine is None:
            unplaced.append(module)
            continue
        with open(path) as f:
            tree = ast.parse(f.read())
        upward += [f"{module}:{node.lineno} imports {target}" for node in ast.walk(tree) for target in _imported(node)
                   if (_layer(target) or 0) > mine]
    assert len(modules) > 30, "the library was not found"
    assert not unplaced, f"modules in no layer of LAYERS: {unplaced}"
    assert not upward, upward
