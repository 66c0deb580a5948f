"""The transfer code never changes the process environment once running.

Workers make process groups from many threads while NCCL reads its variables with ``getenv`` as each
communicator starts; a ``setenv`` / ``unsetenv`` racing with those reads can crash the process. So
the environment may only be set at module level (on import, before any thread exists).
"""

from __future__ import annotations

import ast
from pathlib import Path

import kv_transfer

MUTATORS = {"pop", "update", "setdefault", "clear", "popitem", "putenv", "unsetenv", "__setitem__"}


def _environment_changes_inside_functions(tree: ast.AST) -> list[int]:
    lines = []
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for node in ast.walk(function):
            text = ast.unparse(node)
            if isinstance(node, ast.Assign | ast.AugAssign | ast.Delete) and "environ[" in text:
                lines.append(node.lineno)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if node.func.attr in MUTATORS and (owner.endswith("environ") or owner == "os"):
                    lines.append(node.lineno)
    return lines


def test_no_environment_changes_at_run_time() -> None:
    package = Path(kv_transfer.__file__).parent
    found = {
        path.name: lines
        for path in sorted(package.glob("*.py"))
        if (lines := _environment_changes_inside_functions(ast.parse(path.read_text())))
    }
    assert found == {}, f"the environment is changed inside functions: {found}"


def test_the_scan_sees_a_change_inside_a_function() -> None:
    tree = ast.parse("import os\ndef f():\n    os.environ['X'] = '1'\n    os.environ.pop('X')\n")
    assert _environment_changes_inside_functions(tree) == [3, 4]
