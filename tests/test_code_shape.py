"""The library's shape: functions short enough to read at once."""

from __future__ import annotations

import ast
import glob
import os

LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipeline")
MAX_LINES = 60


def test_no_function_in_the_library_is_longer_than_60_lines():
    found = []
    for path in sorted(glob.glob(os.path.join(LIBRARY, "*.py"))):
        with open(path) as f:
            tree = ast.parse(f.read())
        found += [f"{os.path.basename(path)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                  for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert len(glob.glob(os.path.join(LIBRARY, "*.py"))) > 10, "the library was not found"
    assert not found, found
