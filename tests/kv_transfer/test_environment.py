"""The transfer code never changes the process environment once running.

Workers make process groups from many threads while NCCL reads its variables with ``getenv`` as each
communicator starts; a ``setenv`` / ``unsetenv`` racing with those reads can crash the process. So
the environment may only be set at module level (on import, before any thread exists).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
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


def _async_error_handling_after_import(**env: str) -> str:
    """TORCH_NCCL_ASYNC_ERROR_HANDLING as a fresh process sees it after importing kv_transfer.pair."""
    name = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
    clean = {k: v for k, v in os.environ.items() if k != name}
    root = Path(kv_transfer.__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", f"import os, kv_transfer.pair; print(os.environ.get({name!r}))"],
        env={**clean, "PYTHONPATH": str(root), **env}, capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    return result.stdout.strip()


def test_nccl_error_handling_is_set_on_import_and_a_users_choice_is_kept() -> None:
    assert _async_error_handling_after_import() == "0"
    assert _async_error_handling_after_import(TORCH_NCCL_ASYNC_ERROR_HANDLING="1") == "1"
