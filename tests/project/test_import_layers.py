"""The command line sits on top: no module below it imports ``fpedit.args`` or ``fpedit.cli``.

Below the command line: engine/, server/, export/, eval/ and benchmarks/, except each subsystem's own
``cli.py`` (the commands it registers with ``fpedit``). A library module that needs a flag's parser or a
config's mapping takes it from the subsystem that owns the config (``fpedit.engine.flags``,
``fpedit.server.config``), so the engine, the server and Ray run without the CLI.

Read from the source (``ast``), nothing imported; imports inside functions count as well.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BELOW_CLI = ("engine", "server", "export", "eval", "benchmarks")
CLI_MODULES = {"server/cli.py", "export/cli.py", "eval/cli.py", "benchmarks/cli.py"}
FORBIDDEN = ("fpedit.args", "fpedit.cli")


def imported_modules(tree: ast.AST) -> list[str]:
    """Every module an ``import`` or ``from ... import`` names (``from fpedit import args`` as
    ``fpedit.args``); relative imports are the package's own and are left out."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "fpedit":  # `from fpedit import args`: the names may be modules
                found += [f"fpedit.{alias.name}" for alias in node.names]
            else:
                found.append(node.module)
    return found


def forbidden(tree: ast.AST) -> list[str]:
    return [
        name
        for name in imported_modules(tree)
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    ]


def test_no_module_below_the_command_line_imports_it():
    hits = []
    for package in BELOW_CLI:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative in CLI_MODULES:
                continue
            tree = ast.parse(path.read_text(), relative)
            hits += [f"{relative}: {name}" for name in forbidden(tree)]
    assert hits == []


def test_the_check_sees_each_spelling():
    source = (
        "import fpedit.args\n"
        "from fpedit import cli\n"
        "def f():\n"
        "    from fpedit.args import engine_config_from_args\n"
        "from fpedit.engine.config import EngineConfig\n"
        "from fpedit import EditEngine\n"
        "from .args import x\n"
    )
    assert forbidden(ast.parse(source)) == ["fpedit.args", "fpedit.cli", "fpedit.args"]
