# SPDX-License-Identifier: Apache-2.0
"""
The public API is fully annotated (issue 17): every parameter and every return of every public
callable, found by walking the package with :mod:`inspect`, not by a hand-kept list.

Public means: a name exported by the package's lazy exports or a subpackage's ``__all__``, a
public function or class defined in any module under ``pyro_elbo_lab`` (no module or name with
a leading underscore), and every public method, property, ``__init__`` and ``__call__`` defined
by such a class or by any of our own base classes in its MRO. Methods inherited from Pyro or
PyTorch are theirs to annotate. ``*args``/``**kwargs`` count as parameters: the model's
positional data is annotated ``Any``, which is fine, but it must be annotated.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import types
from collections.abc import Callable, Iterator
from typing import Any

import pyro_elbo_lab

PACKAGE = "pyro_elbo_lab"
# Run as a script, not a library module: importing it would start the command line.
SKIP_MODULES = {f"{PACKAGE}.__main__"}
# Dunders that are part of a class's public API (the rest are protocol plumbing).
PUBLIC_DUNDERS = {"__init__", "__call__"}


def _is_public(name: str) -> bool:
    return not name.startswith("_") or name in PUBLIC_DUNDERS


def _ours(obj: object) -> bool:
    return (getattr(obj, "__module__", None) or "").split(".")[0] == PACKAGE


def _modules() -> list[types.ModuleType]:
    modules = [pyro_elbo_lab]
    for info in pkgutil.walk_packages(pyro_elbo_lab.__path__, f"{PACKAGE}."):
        if info.name in SKIP_MODULES:
            continue
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        modules.append(importlib.import_module(info.name))
    return modules


def _exported(module: types.ModuleType) -> Iterator[tuple[str, object]]:
    """Every name in ``__all__`` (the package's lazy exports resolve through ``__getattr__``)."""
    for name in getattr(module, "__all__", ()):
        obj = getattr(module, name)
        if not isinstance(obj, types.ModuleType):
            yield f"{module.__name__}.{name}", obj


def _defined(module: types.ModuleType) -> Iterator[tuple[str, object]]:
    """Every public function and class the module itself defines."""
    for name, obj in vars(module).items():
        if name.startswith("_"):
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == module.__name__:
            yield f"{module.__name__}.{name}", obj


def _methods(cls: type) -> Iterator[tuple[str, Callable[..., Any], bool]]:
    """(name, function, is_method) for the class's public callables, ours in its MRO."""
    seen: set[str] = set()
    for klass in cls.__mro__:
        if not _ours(klass):
            continue
        for name, attr in vars(klass).items():
            if name in seen or not _is_public(name):
                continue
            seen.add(name)
            where = f"{klass.__module__}.{klass.__qualname__}.{name}"
            if isinstance(attr, property):
                for accessor in (attr.fget, attr.fset):
                    if accessor is not None:
                        yield where, accessor, True
            elif isinstance(attr, staticmethod):
                yield where, attr.__func__, False
            elif isinstance(attr, classmethod):
                yield where, attr.__func__, True
            elif inspect.isfunction(attr) and _ours(attr):  # not typing.Protocol's generated __init__
                yield where, attr, True


def _missing(func: Callable[..., Any], is_method: bool) -> list[str]:
    """The parameters (and ``return``) of ``func`` that lack an annotation."""
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin without a signature: nothing of ours
        return []
    params = list(signature.parameters.values())
    if is_method and params and params[0].kind is not inspect.Parameter.KEYWORD_ONLY:
        params = params[1:]  # self / cls
    missing = [p.name for p in params if p.annotation is inspect.Parameter.empty]
    # ``__init__`` returns None by definition; mypy checks it once any parameter is annotated.
    if signature.return_annotation is inspect.Signature.empty and func.__name__ != "__init__":
        missing.append("return")
    return missing


def _public_callables() -> dict[str, tuple[Callable[..., Any], bool]]:
    found: dict[str, tuple[Callable[..., Any], bool]] = {}
    classes: dict[str, type] = {}
    for module in _modules():
        for _where, obj in [*_exported(module), *_defined(module)]:
            if inspect.isclass(obj):
                if _ours(obj):
                    classes[f"{obj.__module__}.{obj.__qualname__}"] = obj
            elif inspect.isfunction(obj) and _ours(obj):
                found[f"{obj.__module__}.{obj.__qualname__}"] = (obj, False)
    for cls in classes.values():
        for where, func, is_method in _methods(cls):
            found[where] = (func, is_method)
    return found


def test_walk_finds_the_public_api() -> None:
    # Guards the walker itself: a walk that finds nothing would pass the test below vacuously.
    found = _public_callables()
    expected = {
        "pyro_elbo_lab.diagnostics.collapse.posterior_collapse",
        "pyro_elbo_lab.schedules.as_schedule",
        "pyro_elbo_lab.schedules.LinearWarmup.__call__",
        "pyro_elbo_lab.cli.main",
        "pyro_elbo_lab.checks.check_model_kwargs",
    }
    assert expected <= set(found), sorted(expected - set(found))
    assert any(name.endswith(".BetaELBO.__init__") or ".WeightedObjective." in name for name in found)
    assert len(found) > 200, len(found)


def test_public_api_is_annotated() -> None:
    problems = []
    for where, (func, is_method) in sorted(_public_callables().items()):
        missing = _missing(func, is_method)
        if missing:
            problems.append(f"{where}: {', '.join(missing)}")
    assert not problems, f"{len(problems)} public callables lack annotations:\n" + "\n".join(problems)


def test_lazy_exports_are_visible_to_type_checkers() -> None:
    # The package resolves its exports in ``__getattr__`` (typed ``Any``), so a type checker
    # sees them only through the ``if TYPE_CHECKING:`` imports: each export must be there, and
    # must be the very object ``__getattr__`` returns at run time.
    tree = ast.parse(inspect.getsource(pyro_elbo_lab))
    blocks = [node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    assert len(blocks) == 1
    static = {}
    for node in blocks[0].body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.unparse(node)
        module = importlib.import_module(".".join(filter(None, [PACKAGE, node.module])))
        for alias in node.names:
            assert alias.asname == alias.name, f"{ast.unparse(node)}: re-export as `{alias.name} as {alias.name}`"
            static[alias.name] = getattr(module, alias.name)
    assert set(static) == set(pyro_elbo_lab.__all__), sorted(set(static) ^ set(pyro_elbo_lab.__all__))
    wrong = [name for name, obj in static.items() if getattr(pyro_elbo_lab, name) is not obj]
    assert not wrong, wrong
