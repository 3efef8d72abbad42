"""The import graph of `stackwise/`: no circles, and layers only point down.

The graph is read from the source with `ast`, not by importing anything: every `import` and
`from ... import` of a stackwise module anywhere in a file (module level and inside functions)
is an edge; imports under ``if TYPE_CHECKING:`` are left out (they never run). ``from
stackwise.x import y`` points at the module ``stackwise.x.y`` when that is a module, else at
``stackwise.x`` (the package whose ``__init__`` defines ``y``).

The layers, lowest first (design.md: "config → model, data → training → tracking → runner →
executors → cli"): a layer imports nothing from a layer above it.

The tests follow a rule of their own: no test module imports another or conftest.py; what they
share is a fixture of conftest.py.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "stackwise"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # file:line of the import statement


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every module under `root` by dotted name (a package by its own name, for `__init__.py`)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = [PACKAGE, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under `node`, skipping the body of ``if TYPE_CHECKING:`` (its
    ``else:`` branch runs, so it is kept)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                if isinstance(other, ast.Import | ast.ImportFrom):
                    yield other
                yield from _import_nodes(other)
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _import_nodes(child)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name a (possibly relative) ``from ... import`` names."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Edge]:
    """The stackwise modules `module` (at `path`) imports, one edge per name imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    shown = path.relative_to(path.parents[len(module.split(".")) - (0 if is_package else 1)])
    edges: list[Edge] = []

    def add(target: str, line: int) -> None:
        if target in modules and target != module:
            edges.append(Edge(module, target, f"{shown}:{line}"))

    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
            continue
        named = _absolute(node, module, is_package)
        if named != PACKAGE and not named.startswith(PACKAGE + "."):
            continue
        for alias in node.names:
            submodule = f"{named}.{alias.name}"
            add(submodule if submodule in modules else named, node.lineno)
    return edges


def import_graph(root: Path = ROOT) -> dict[str, list[Edge]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def strongly_connected_components(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative), components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work: list[tuple[str, int]] = [(start, 0)]
        while work:
            node, position = work.pop()
            if position == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            targets = [edge.target for edge in graph[node]]
            descended = False
            for i in range(position, len(targets)):
                target = targets[i]
                if target not in index:
                    work.append((node, i + 1))
                    work.append((target, 0))
                    descended = True
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            if descended:
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def a_cycle(graph: dict[str, list[Edge]], component: list[str]) -> list[Edge]:
    """One closed path through `component` (a strongly connected set), as edges: the shortest
    way from its first module back to itself."""
    members = set(component)
    start = component[0]
    came_by: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target not in members or edge.target in came_by:
                    continue
                came_by[edge.target] = edge
                if edge.target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_by[path[0].source])
                    return path
                following.append(edge.target)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")  # pragma: no cover


def describe_cycles(graph: dict[str, list[Edge]]) -> list[str]:
    lines = []
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        steps = [
            f"    {edge.source} -> {edge.target}  ({edge.where})"
            for edge in a_cycle(graph, component)
        ]
        lines.append(f"circle through {', '.join(component)}:\n" + "\n".join(steps))
    return lines


# -- layers -----------------------------------------------------------------------------------

LAYERS = ("config", "model", "data", "training", "tracking", "runner", "executors", "cli")

#: what each layer must not import (design.md; model and data sit side by side above config,
#: and analysis is statistics on plain tables, below everything that trains or tracks)
FORBIDDEN: dict[str, frozenset[str]] = {
    "config": frozenset(LAYERS) - {"config"},
    "model": frozenset({"data", "training", "tracking", "runner", "executors", "cli"}),
    "data": frozenset({"model", "training", "tracking", "runner", "executors", "cli"}),
    "analysis": frozenset(LAYERS) - {"config"},
    "training": frozenset({"tracking", "runner", "executors", "cli"}),
    "tracking": frozenset({"runner", "executors", "cli"}),
    "runner": frozenset({"executors", "cli"}),
    "executors": frozenset({"cli"}),
}

#: modules at the top of the package that belong to a layer: the library entry point trains
#: (and knows nothing of MLflow), a run's identity is read from its config and data, the
#: pre-run checks sit beside the runner, ``python -m stackwise`` is the command line
TOP_LEVEL_LAYERS = {
    "api": "training",
    "identity": "data",
    "preflight": "runner",
    "runner": "runner",
    "cli": "cli",
    "__main__": "cli",
}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself: a lazy doorway to everything
    if parts[1] in TOP_LEVEL_LAYERS:
        return TOP_LEVEL_LAYERS[parts[1]]
    return parts[1] if parts[1] in FORBIDDEN else None


def layer_violations(graph: dict[str, list[Edge]]) -> list[str]:
    found = []
    for edges in graph.values():
        for edge in edges:
            source, target = layer_of(edge.source), layer_of(edge.target)
            if source is not None and target in FORBIDDEN.get(source, ()):
                found.append(
                    f"{edge.source} ({source}) imports {edge.target} ({target})  {edge.where}"
                )
    return found


# -- the checks --------------------------------------------------------------------------------


def test_the_import_graph_of_stackwise_has_no_circles() -> None:
    cycles = describe_cycles(import_graph())
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_layers_only_import_downwards() -> None:
    violations = layer_violations(import_graph())
    assert not violations, "imports up the layers:\n" + "\n".join(violations)


# -- the checker itself, on a package written here --------------------------------------------


def _write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / PACKAGE
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package


def _targets(graph: dict[str, list[Edge]], module: str) -> set[str]:
    return {edge.target for edge in graph[module]}


def test_the_graph_reads_every_kind_of_import(tmp_path: Path) -> None:
    package = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "a/__init__.py": "from stackwise.a.b import thing\n",
            "a/b.py": "thing = 1\n",
            "a/c.py": (
                "from typing import TYPE_CHECKING\n"
                "import os\n"
                "from . import b\n"
                "from .. import d\n"
                "from stackwise.a import thing\n"
                "if TYPE_CHECKING:\n"
                "    from stackwise import e\n"
                "else:\n"
                "    import stackwise.f\n"
                "def late():\n"
                "    from stackwise.g import name\n"
            ),
            "d.py": "",
            "e.py": "",
            "f.py": "",
            "g.py": "name = 1\n",
        },
    )
    modules = module_files(package)
    assert set(modules) == {
        "stackwise",
        "stackwise.a",
        "stackwise.a.b",
        "stackwise.a.c",
        "stackwise.d",
        "stackwise.e",
        "stackwise.f",
        "stackwise.g",
    }
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    assert _targets(graph, "stackwise.a") == {"stackwise.a.b"}
    # relative imports resolve to submodules; a name from a package points at the package;
    # TYPE_CHECKING is left out, its else branch and function-level imports are kept
    assert _targets(graph, "stackwise.a.c") == {
        "stackwise.a.b",
        "stackwise.d",
        "stackwise.a",
        "stackwise.f",
        "stackwise.g",
    }


def test_circles_are_found_and_shown_as_a_path(tmp_path: Path) -> None:
    package = _write_package(
        tmp_path,
        {
            "__init__.py": "",
            "x.py": "from stackwise import y\n",
            "y.py": "def f():\n    import stackwise.z\n",
            "z.py": "from stackwise.x import something\n",
            "w.py": "import stackwise.x\n",
            "v.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import stackwise.w\n",
        },
    )
    modules = module_files(package)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    components = [c for c in strongly_connected_components(graph) if len(c) > 1]
    assert components == [["stackwise.x", "stackwise.y", "stackwise.z"]]
    path = a_cycle(graph, components[0])
    assert [(edge.source, edge.target) for edge in path] == [
        ("stackwise.x", "stackwise.y"),
        ("stackwise.y", "stackwise.z"),
        ("stackwise.z", "stackwise.x"),
    ]
    # every module is in exactly one component
    everything = sorted(m for c in strongly_connected_components(graph) for m in c)
    assert everything == sorted(modules)


def test_layers_are_named_by_the_first_package_level() -> None:
    assert layer_of("stackwise.config.base") == "config"
    assert layer_of("stackwise.runner") == "runner"
    assert layer_of("stackwise.cli") == "cli"
    assert layer_of("stackwise.__main__") == "cli"
    assert layer_of("stackwise.api") == "training"
    assert layer_of("stackwise.preflight") == "runner"
    assert layer_of("stackwise.analysis.report") == "analysis"
    assert layer_of("stackwise._version") is None
    assert layer_of("stackwise") is None
    graph = {
        "stackwise.config.base": [Edge("stackwise.config.base", "stackwise.model.norm", "b:3")],
        "stackwise.runner": [Edge("stackwise.runner", "stackwise.training.plan", "r:4")],
        "stackwise.model.norm": [Edge("stackwise.model.norm", "stackwise.config.base", "n:1")],
        "stackwise.training.plan": [],
    }
    # only the upward import is reported; runner -> training and model -> config point down
    assert layer_violations(graph) == [
        "stackwise.config.base (config) imports stackwise.model.norm (model)  b:3"
    ]


# -- the tests themselves: no test module imports another ------------------------------------

TESTS = Path(__file__).resolve().parent


def _imported_names(node: ast.Import | ast.ImportFrom | ast.Call) -> list[str]:
    """What `node` imports, as dotted names: ``import a.b`` gives a.b; ``from a import b`` gives
    a and a.b; a relative ``from . import b`` gives .b; ``importlib.import_module("a")`` and
    ``__import__("a")`` with a literal name give a; any other call nothing."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = "." * node.level + (node.module or "")
        if not node.module:
            return [base + alias.name for alias in node.names]
        return [base, *(f"{base}.{alias.name}" for alias in node.names)]
    if node.args and isinstance(node.args[0], ast.Constant):
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", "")
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def imports_between_tests(folder: Path = TESTS) -> list[str]:
    """Every import, anywhere in a test module or the conftest.py of `folder` (inside functions
    and under ``if TYPE_CHECKING:`` too), of a module of that folder, as ``file:line imports
    name``. What tests share belongs in conftest.py as fixtures, which they get as arguments."""
    local = {path.stem for path in folder.glob("*.py")}

    def is_local(name: str) -> bool:
        parts = name.lstrip(".").split(".")
        if parts[0] == folder.name and not name.startswith("."):
            parts = parts[1:]  # tests.test_x: the folder as a package
        return bool(parts) and parts[0] in local

    found: list[tuple[str, int, str]] = []
    for path in [*folder.glob("test_*.py"), folder / "conftest.py"]:
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom | ast.Call):
                continue
            name = next((n for n in _imported_names(node) if is_local(n)), None)
            if name is not None:
                found.append((path.name, node.lineno, name))
    return [f"{file}:{line} imports {name}" for file, line, name in sorted(found)]


def test_no_test_module_imports_another_or_conftest() -> None:
    found = imports_between_tests()
    assert not found, (
        "test modules import each other (share it as a fixture in conftest.py instead):\n"
        + "\n".join(found)
    )


def test_every_way_of_importing_a_test_module_is_found(tmp_path: Path) -> None:
    folder = tmp_path / "tests"
    folder.mkdir()
    files = {
        "conftest.py": "import os\nimport test_b\n",
        "test_a.py": (
            "from typing import TYPE_CHECKING\n"
            "import pytest\n"
            "import testing_tools\n"
            "from stackwise.test_b import x\n"
            "from test_b import helper\n"
            "if TYPE_CHECKING:\n"
            "    from conftest import Alias\n"
            "def late():\n"
            "    import tests.test_c\n"
            "    from tests import test_b\n"
            "    from . import conftest\n"
            "    importlib.import_module('test_c')\n"
            "    from tests import fixtures_elsewhere\n"
        ),
        "test_b.py": "helper = 1\n",
        "test_c.py": "from .test_b import helper\n",
        "notes.txt": "import test_b\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    assert imports_between_tests(folder) == [
        "conftest.py:2 imports test_b",
        "test_a.py:5 imports test_b",
        "test_a.py:7 imports conftest",
        "test_a.py:9 imports tests.test_c",
        "test_a.py:10 imports tests.test_b",
        "test_a.py:11 imports .conftest",
        "test_a.py:12 imports test_c",
        "test_c.py:1 imports .test_b",
    ]
