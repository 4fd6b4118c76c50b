"""The package's modules import one another in one direction: no import cycle, anywhere.

The graph is read statically from every module's source (``ast``), so a cycle is found even where
it would only bite at run time. Every ``import`` statement counts: at module level, inside a
function (it runs when the function does, and a circle there is the same data flow turned back)
and under ``if TYPE_CHECKING:``. ``from a.b import c`` is an edge to ``a.b.c`` when that is a
module, else to ``a.b``. The implicit import of a module's parent packages is not an edge: a
package's ``__init__`` importing its own submodules is how registries fill, not a circle.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import semidiff

PACKAGE_DIR = Path(semidiff.__file__).resolve().parent


def package_modules(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (``__init__`` = the package)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's own package, one level up per extra dot
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                source = ".".join(anchor + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from a import b``: the module a.b when there is one, else a name defined in a.
            found.update(f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names)
    return (found & known) - {module}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    return {m: imported_modules(m, p, set(modules)) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_a_function_level_circle(tmp_path):
    """The checker itself: a circle closed by an import inside a function is found; a chain is not."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import b  # a registry filling itself\n")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("import os\n")
    graph = import_graph(package_modules(pkg))
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("def g():\n    import pkg.a\n")
    assert find_cycle(import_graph(package_modules(pkg))) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_package_import_graph_has_no_cycle():
    modules = package_modules()
    assert {"semidiff.cli", "semidiff.config", "semidiff.report.build", "semidiff.bench.runner"} <= set(modules)
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(m for m in package_modules() if not m.endswith("__main__")))
def test_every_module_imports(module):
    """Each module imports on its own (``__main__`` modules are entry points: importing one runs it)."""
    importlib.import_module(module)
