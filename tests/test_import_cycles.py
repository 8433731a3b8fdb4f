"""No import cycle between our modules and no import of a higher floor, counting every import:
those inside functions and under TYPE_CHECKING too (a cycle hidden by a local import is still a
cycle: the two modules cannot be read, tested or moved apart). Read from the source, nothing is
imported."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("protos", "stage_service", "orchestrator", "client")
# The floors, lowest first (README, Architecture): a module imports from its own floor or below.
FLOORS = ("protos", "protos.shared", "stage_service", "orchestrator", "client")


def module_files() -> dict[str, Path]:
    """Our modules by dotted name (generated protobuf code left out: it imports nothing of ours)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    """Each module -> the modules of ours it imports, wherever in the file the import is."""
    modules = module_files()
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from package import module` imports the module
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            else:
                continue
            imported |= {t for t in targets if t in modules and t != name}
        graph[name] = imported
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_sees_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_module_of_ours_imports_itself_through_others():
    graph = import_graph()
    assert "orchestrator.generation" in graph and "client.cli" in graph  # the walk found them
    assert cycles(graph) == []


def floor_of(module: str) -> int:
    """The index in FLOORS of the longest floor that is `module` or holds it."""
    return max(i for i, f in enumerate(FLOORS) if module == f or module.startswith(f + "."))


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs if floor_of(b) > floor_of(a))


def test_the_floor_check_sees_an_upward_import():
    graph = {"protos.shared.knobs": {"client.default_model"}, "client.cli": {"protos.codec"}}
    assert upward_imports(graph) == ["protos.shared.knobs -> client.default_model"]


def test_no_module_of_ours_imports_a_higher_floor():
    graph = import_graph()
    assert "protos.shared.knobs" in graph and "protos.codec" in graph
    assert upward_imports(graph) == []
