"""No import cycles in kms and qkd_adapters: between modules, and between the packages and modules that
sit side by side in one package (kms.storage and kms.audit, say). grimp is import-linter's graph library;
the layering rules themselves are import-linter contracts in pyproject.toml (`lint-imports`).

Every import counts, including those inside functions and under ``TYPE_CHECKING``: a lazy import only
hides a cycle from the interpreter, not from the design.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from itertools import pairwise

import grimp

ROOTS = ("kms", "qkd_adapters")


@cache
def _graph() -> grimp.ImportGraph:
    return grimp.build_graph(*ROOTS, cache_dir=None)  # no cache: a stale one hides or invents imports


def _components(edges: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan, iterative), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(edges[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return sorted(found)


def _example_cycle(component: list[str], edges: Mapping[str, Iterable[str]]) -> list[str]:
    """One concrete cycle through the component's first member (shortest, by breadth-first search)."""
    start, members = component[0], set(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(edges[node]):
                if nxt not in members:
                    continue
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in parent:
                    parent[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    raise AssertionError(f"no cycle through {start}")  # pragma: no cover - a component always has one


def module_cycles() -> list[str]:
    """Each set of modules that import each other in a circle, with one cycle through them."""
    graph = _graph()
    modules = {m for m in graph.modules if m.split(".")[0] in ROOTS}
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i in modules} for m in modules}
    return [f"{', '.join(c)}: e.g. {' -> '.join(_example_cycle(c, edges))}" for c in _components(edges)]


def sibling_cycles() -> list[str]:
    """Each set of children of one package that import each other in a circle (a child stands for itself
    and its descendants), with one cycle through them and the imports that make it."""
    graph = _graph()
    found = []
    packages = sorted(m for m in graph.modules if m.split(".")[0] in ROOTS and graph.find_children(m))
    for package in packages:
        owner = {}
        for child in graph.find_children(package):
            for member in {child, *graph.find_descendants(child)}:
                owner[member] = child
        edges: dict[str, set[str]] = {child: set() for child in graph.find_children(package)}
        witness: dict[tuple[str, str], tuple[str, str]] = {}
        for member, child in sorted(owner.items()):
            for imported in sorted(graph.find_modules_directly_imported_by(member)):
                target = owner.get(imported)
                if target is not None and target != child:
                    edges[child].add(target)
                    witness.setdefault((child, target), (member, imported))
        for component in _components(edges):
            cycle = _example_cycle(component, edges)
            steps = ", ".join("{} imports {}".format(*witness[(a, b)]) for a, b in pairwise(cycle))
            found.append(f"in {package}: {', '.join(component)}: e.g. {' -> '.join(cycle)} ({steps})")
    return found


def test_no_import_cycles_between_modules() -> None:
    cycles = module_cycles()
    assert not cycles, "import cycles between modules:\n" + "\n".join(cycles)


def test_no_import_cycles_between_sibling_packages() -> None:
    cycles = sibling_cycles()
    assert not cycles, "import cycles between the members of a package:\n" + "\n".join(cycles)


def test_the_cycle_finder_names_a_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e2"}, "e2": {"e"}}
    components = _components(edges)
    assert components == [["a", "b", "c"], ["e", "e2"]]
    assert _example_cycle(components[0], edges) == ["a", "b", "c", "a"]
    assert _components({"x": {"y"}, "y": set()}) == []
