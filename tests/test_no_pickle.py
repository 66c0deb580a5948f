"""No pickle-family deserialization in the serving packages: every network path speaks protobuf or raw bytes."""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("kv_transfer", "prefill_worker", "decode_worker", "router", "baton")
FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"}
# torch.distributed's *_object collectives pickle their payload; torch.load unpickles.
FORBIDDEN_ATTRIBUTES = {
    ("torch", "load"),
    ("dist", "send_object_list"),
    ("dist", "recv_object_list"),
    ("dist", "broadcast_object_list"),
    ("dist", "all_gather_object"),
    ("dist", "gather_object"),
    ("dist", "scatter_object_list"),
    ("multiprocessing", "connection"),
}
FORBIDDEN_NAMES = {name for _, name in FORBIDDEN_ATTRIBUTES if name != "connection"}


def find_violations(source: str, filename: str = "<string>") -> list[str]:
    """Every use of a pickle-family module or unpickling call in ``source``, as "line: what"."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [
                f"{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.split(".")[0] in FORBIDDEN_MODULES
            ]
            found += [
                f"{node.lineno}: import {a.name}"
                for a in node.names
                if a.name == "multiprocessing.connection"
            ]
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in FORBIDDEN_MODULES or node.module == "multiprocessing.connection":
                found.append(f"{node.lineno}: from {node.module} import ...")
            found += [
                f"{node.lineno}: from {node.module} import {a.name}"
                for a in node.names
                if a.name in FORBIDDEN_NAMES
            ]
            if node.module == "multiprocessing" and any(a.name == "connection" for a in node.names):
                found.append(f"{node.lineno}: from multiprocessing import connection")
        elif isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and (node.value.id, node.attr) in FORBIDDEN_ATTRIBUTES:
                found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
            elif (
                isinstance(node.value, ast.Attribute)
                and node.attr in FORBIDDEN_NAMES
                and node.value.attr == "distributed"
            ):
                found.append(f"{node.lineno}: torch.distributed.{node.attr}")
            elif isinstance(node.value, ast.Name) and node.value.id in FORBIDDEN_MODULES:
                found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "allow_pickle" and not (
                    isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                ):
                    found.append(f"{node.lineno}: allow_pickle=...")
    return found


def test_scanner_catches_each_form() -> None:
    samples = {
        "import pickle": 1,
        "import cloudpickle as cp": 1,
        "from dill import loads": 1,
        "import marshal, shelve": 2,
        "import torch\ntorch.load('x')": 1,
        "import torch.distributed as dist\ndist.recv_object_list([None])": 1,
        "import torch\ntorch.distributed.broadcast_object_list([1])": 1,
        "from multiprocessing.connection import Listener": 1,
        "import numpy as np\nnp.load('x', allow_pickle=True)": 1,
        "import json\njson.loads('{}')": 0,
        "import torch\ntorch.save": 0,
    }
    for source, expected in samples.items():
        assert len(find_violations(source)) == expected, (source, find_violations(source))


def test_serving_packages_never_unpickle() -> None:
    violations = []
    for package in SCANNED:
        for path in sorted((REPO_ROOT / package).rglob("*.py")):
            for hit in find_violations(path.read_text(), str(path)):
                violations.append(f"{path.relative_to(REPO_ROOT)}:{hit}")
    assert not violations, "pickle-family use on a serving path:\n" + "\n".join(violations)
