# SPDX-License-Identifier: Apache-2.0
"""The package's import rules (issue 10), read from the source with :mod:`ast`: no import
cycle among its modules, and no module imports another module's ``_private`` names."""

from __future__ import annotations

import ast
import pathlib

import pyro_elbo_lab

ROOT = pathlib.Path(pyro_elbo_lab.__file__).parent
PKG = ROOT.name


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict):
    """``(module imported, names)`` of each module-level import of the package (TYPE_CHECKING blocks skipped)."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    todo = list(ast.parse(path.read_text()).body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody + [n for h in node.handlers for n in h.body]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PKG:
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                module = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == PKG:
                yield module, [alias.name for alias in node.names]


def _graph() -> dict[str, set]:
    modules = _modules()
    graph: dict[str, set] = {m: set() for m in modules}
    for name, path in modules.items():
        for module, names in _imports(name, path, modules):
            for target in [module] + [f"{module}.{n}" for n in names]:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                graph[name].add(target)
                # importing a.b.c runs a.b's __init__ first (unless it is name's own package)
                parts = target.split(".")
                for k in range(2, len(parts)):
                    parent = ".".join(parts[:k])
                    if parent in modules and not (name + ".").startswith(parent + "."):
                        graph[name].add(parent)
    return graph


def test_no_import_cycle():
    graph = _graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the graph was read
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_no_private_name_imported_across_modules():
    modules = _modules()
    found = [
        f"{name} imports {module}.{n}"
        for name, path in modules.items()
        for module, names in _imports(name, path, modules)
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not found, found
