"""No module reaches into another's private names: a leading-underscore name the project defines is used only
through ``self``/``cls`` (``obj._name`` with any other ``obj`` is refused) and never imported from another
module (``from x import _name``). Siblings use each other's public surface (e.g. ``EditEngine.request_run``,
``check_prompt``, ``schedules``, ``decode``).

Read from the source (``ast``), nothing imported. Generated protobuf modules are left out. Names only a
library defines (``os._exit``, argparse's internals) are the library's business, not this rule's.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "server", "export", "eval", "benchmarks", "fpedit")
#: Known exceptions (none: server/ray's were made public names).
ALLOWED: set[tuple[str, str]] = set()


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def sources() -> list[Path]:
    return [
        path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    ]


def defined_private_names(trees: list[ast.AST]) -> set[str]:
    """Every private name the project defines: functions, classes, module and class variables, attributes."""
    names: set[str] = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {name for name in names if private(name)}


def project_module(node: ast.ImportFrom) -> bool:
    return node.level > 0 or (node.module or "").split(".")[0] in ("fpedit", *PACKAGES)


def reaches(tree: ast.AST, ours: set[str]) -> list[str]:
    """``obj._name`` (``obj`` not self/cls) of a name the project defines, and ``from x import _name`` from
    one of the project's modules, as source text."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and project_module(node):
            for alias in node.names:
                if private(alias.name):
                    found.append(f"from {'.' * node.level}{node.module or ''} import {alias.name}")
        elif isinstance(node, ast.Attribute) and private(node.attr) and node.attr in ours:
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(ast.unparse(node))
    return found


def test_no_module_reaches_a_private_name_of_another():
    paths = sources()
    trees = {path: ast.parse(path.read_text(), str(path)) for path in paths}
    ours = defined_private_names(list(trees.values()))
    hits = {
        (path.relative_to(ROOT).as_posix(), text)
        for path, tree in trees.items()
        for text in reaches(tree, ours)
    }
    assert hits - ALLOWED == set()
    assert hits >= ALLOWED, f"no longer needed: {sorted(ALLOWED - hits)}"


def test_the_check_sees_a_reach_and_an_import():
    tree = ast.parse("from .pipeline import _helper\nengine._run(1)\nself._run(2)\nos._exit(0)\n")
    assert reaches(tree, {"_run", "_helper"}) == ["from .pipeline import _helper", "engine._run"]
