"""No import cycle anywhere in the package, counting what the interpreter would follow at run time.

Every ``.py`` under the package's folders is parsed (not imported: no torch needed) and its imports are
collected wherever they are written: module level, inside functions, ``importlib.import_module("...")`` with
a literal name, and the names in a module-level tuple or list of dotted ``fpedit.`` strings (a registry such
as ``fpedit.cli.SUBSYSTEMS`` that is handed to ``import_module`` in a loop). The folders map to ``fpedit.*``
as pyproject's ``package-dir`` does. A cycle is reported with the modules on it, in order.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def package_dirs() -> dict[str, Path]:
    """``fpedit.engine`` -> ``ROOT/engine``, ... as pyproject's ``[tool.setuptools] package-dir`` says."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {package: ROOT / folder for package, folder in setuptools["package-dir"].items()}


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (packages by their ``__init__``)."""
    modules: dict[str, Path] = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if any(part.startswith(".") or part == "__pycache__" for part in parts):
                continue
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from {'.' * level}{name} import ...`` written in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _import_module_literal(node: ast.Call) -> str | None:
    """``import_module("fpedit.x")`` or ``importlib.import_module("fpedit.x")`` with a literal name."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called != "import_module" or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str) and not first.value.startswith("."):
        return first.value
    return None


def _registry_names(tree: ast.Module) -> list[str]:
    """Dotted ``fpedit.*`` names held in module-level tuples/lists (modules imported by name in a loop)."""
    names: list[str] = []
    for node in tree.body:
        value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
        if isinstance(value, (ast.Tuple, ast.List)):
            for item in value.elts:
                text = item.value if isinstance(item, ast.Constant) else None
                if isinstance(text, str) and text.startswith("fpedit.") and " " not in text:
                    names.append(text)
    return names


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports, anywhere in its file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        elif isinstance(node, ast.Call):
            literal = _import_module_literal(node)
            if literal:
                found.add(literal)
    found.update(_registry_names(tree))
    resolved: set[str] = set()
    for name in found:
        # `import fpedit.engine.options` runs fpedit.engine too, but that edge is package -> __init__, which
        # only matters if the __init__ imports back; the module itself is the edge that can close a cycle.
        while name and name not in known:
            name = name.rpartition(".")[0]
        # A module's own packages are imported before it by the import system itself: not an edge.
        if name and name != module and not module.startswith(name + "."):
            resolved.add(name)
    return resolved


def _runtime_nodes(tree: ast.Module) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as its modules in import order (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    known = set(files)
    return {name: imports_of(name, path, known) for name, path in files.items()}


def test_the_walk_sees_every_kind_of_import():
    """The walk itself: module-level, function-level, relative, import_module literals and registries."""
    graph = import_graph()
    assert "fpedit.engine.pipeline" in graph and "fpedit.server.cli" in graph  # package-dir mapping
    assert "fpedit.engine.options" in graph["fpedit.engine.pipeline"]  # `from .options import ...`
    # fpedit.cli registers the subsystem CLIs by name only (SUBSYSTEMS + import_module).
    assert {"fpedit.server.cli", "fpedit.export.cli"} <= graph["fpedit.cli"]
    # A function-level import: the serve command loads the server app only when it runs.
    assert "fpedit.server.app" in graph["fpedit.server.cli"]


def test_find_cycle_reports_the_modules_in_order():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
