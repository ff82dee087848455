"""The shape of the package: pure modules stay pure, package faces import nothing, and the
import graph has no cycle (STYLE.md, "A layout that shows the architecture")."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import gateway

PACKAGE = Path(gateway.__file__).parent

# Modules that decide or build values and nothing else: no Redis client, no HTTP framework.
# With them the bottom layer every other imports (model, config, errors) and the counters.
PURE_MODULES = [
    "gateway.model",
    "gateway.config",
    "gateway.errors",
    "gateway.typedefs",
    "gateway.metrics",
    "gateway.identity",
    "gateway.redis_topology",
    "gateway.ratelimit",
    "gateway.envelope",
    "gateway.dataplane.wire",
    "gateway.store.keys",
    "gateway.store.cursor",
    "gateway.store.listing_types",
    "gateway.store.records",
    "gateway.store.breaker",
    "gateway.store.epoch",
    "gateway.loadtest.spec",
    "gateway.loadtest.fleet",
    "gateway.loadtest.schedule",
    "gateway.loadtest.histogram",
    "gateway.loadtest.results",
    "gateway.loadtest.enforcement",
    "gateway.loadtest.report",
]
# aiohttp brings yarl and multidict; either one alone would mean an HTTP client or server.
FORBIDDEN = ("redis", "aiohttp", "yarl", "multidict")


@pytest.mark.parametrize("module", PURE_MODULES)
def test_a_pure_module_imports_neither_redis_nor_aiohttp(module: str) -> None:
    # A fresh interpreter: this one has imported everything already.
    probe = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert proc.stdout.split() == [], f"importing {module} loads {proc.stdout.strip()}"


def _modules() -> dict[str, Path]:
    """Every module of the gateway package by its dotted name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(node: ast.AST, *, depth: int = 0) -> Iterator[tuple[ast.stmt, int]]:
    """Every import statement run at some point (module level or in a function), with its
    depth (0: at import time); the body of `if TYPE_CHECKING:` never runs."""
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for stmt in node.orelse:
            yield from _runtime_imports(stmt, depth=depth)
        return
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node, depth
        return
    inner = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
    for child in ast.iter_child_nodes(node):
        yield from _runtime_imports(child, depth=depth + inner)


def _targets(stmt: ast.stmt, name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The gateway modules an import statement of module `name` imports."""
    if isinstance(stmt, ast.Import):
        return {alias.name for alias in stmt.names if alias.name in modules}
    assert isinstance(stmt, ast.ImportFrom)
    if stmt.level:
        # A package's own __init__ is its name; a module's package is its name's parent.
        base = name.split(".")
        base = base if path.name == "__init__.py" else base[:-1]
        base = base[: len(base) - (stmt.level - 1)]
        if stmt.module:
            base.append(stmt.module)
        origin = ".".join(base)
    else:
        origin = stmt.module or ""
    out = set()
    for alias in stmt.names:
        submodule = f"{origin}.{alias.name}"
        if submodule in modules:  # `from pkg import module`
            out.add(submodule)
        elif origin in modules:  # `from module import name`
            out.add(origin)
    return out


def _graph() -> dict[str, set[str]]:
    """The gateway modules each module imports, at import time or in its functions."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = {
            target
            for stmt, _ in _runtime_imports(tree)
            for target in _targets(stmt, name, path, modules)
            if target != name
        }
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


STORE = PACKAGE / "store" / "store.py"
FACE = PACKAGE / "store" / "__init__.py"


@pytest.mark.parametrize(
    ("source", "name", "path", "expected"),
    [
        pytest.param("import gateway.store.keys", "gateway.store.store", STORE,
                     {"gateway.store.keys"}, id="import-dotted"),
        pytest.param("import orjson", "gateway.store.store", STORE, set(), id="third-party"),
        pytest.param("from gateway.store import keys as K", "gateway.store.store", STORE,
                     {"gateway.store.keys"}, id="from-package-import-module"),
        pytest.param("from gateway.store import Store", "gateway.cli", PACKAGE / "cli.py",
                     {"gateway.store"}, id="from-package-import-name"),
        pytest.param("from gateway.model import Device", "gateway.store.store", STORE,
                     {"gateway.model"}, id="from-module-import-name"),
        pytest.param("from .keys import SHARDS", "gateway.store.store", STORE,
                     {"gateway.store.keys"}, id="relative-in-module"),
        pytest.param("from . import keys", "gateway.store", FACE,
                     {"gateway.store.keys"}, id="relative-in-package-face"),
        pytest.param("from ..model import Device", "gateway.store.store", STORE,
                     {"gateway.model"}, id="relative-two-levels"),
    ],
)  # fmt: skip
def test_an_import_resolves_to_the_modules_it_runs(
    source: str, name: str, path: Path, expected: set[str]
) -> None:
    stmt = ast.parse(source).body[0]
    assert _targets(stmt, name, path, _modules()) == expected


def test_imports_under_type_checking_are_left_out_and_those_in_functions_kept() -> None:
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
        "def f():\n    import c\n"
        "class K:\n    import d\n"
    )
    found = [
        (stmt.names[0].name, depth)
        for stmt, depth in _runtime_imports(tree)
        if isinstance(stmt, ast.Import)
    ]
    assert found == [("b", 0), ("c", 1), ("d", 0)]


def test_the_import_graph_has_no_cycle() -> None:
    # Imports inside functions count: they run, later. A package's __init__ is not added as
    # a dependency of its modules; the next test keeps that honest.
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_and_names_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"b", "d"}, "d": set()}
    assert _cycle(graph) == ["b", "c", "b"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    "name",
    sorted(name for name, path in _modules().items() if path.name == "__init__.py"),
)
def test_a_package_face_imports_nothing_of_the_gateway_when_imported(name: str) -> None:
    # Importing any module of a package runs its __init__ first: one that imported its
    # modules eagerly would make every module of the package depend on all the others (and
    # a pure one import what they import). Faces re-export lazily (PEP 562 __getattr__).
    modules = _modules()
    path = modules[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    eager = sorted(
        target
        for stmt, depth in _runtime_imports(tree)
        if depth == 0
        for target in _targets(stmt, name, path, modules)
    )
    assert eager == [], f"{name} imports {eager} when imported"
