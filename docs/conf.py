# SPDX-License-Identifier: Apache-2.0
"""
Sphinx configuration of the pyro-elbo-lab documentation.

Build (warnings are errors, every cross-reference checked)::

    python3 -m sphinx -W --keep-going -n -b html docs docs/_build/html

Cross-references to other projects (Python, PyTorch, Pyro, ArviZ, xarray, NumPy, pandas) go
through intersphinx, but the build must not need the network: an inventory is used when
``docs/_inventories/<name>.inv`` exists, or from its website when ``ELBO_LAB_DOCS_ONLINE=1``
is set. A project whose inventory is not loaded has its references listed in
``nitpick_ignore_regex`` instead (rendered as plain text, not as a warning); references to
our own package are always checked.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import pkgutil
import re
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sphinx.util import logging  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402

logger = logging.getLogger(__name__)

import pyro_elbo_lab  # noqa: E402

project = "pyro-elbo-lab"
author = "pyro-elbo-lab developers"
copyright = "2026, pyro-elbo-lab developers"
release = pyro_elbo_lab.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_inventories", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []
html_static_path = ["_static"]
html_theme = "alabaster"
html_theme_options = {
    "description": "β-ELBOs for Pyro, with their decompositions and VI diagnostics",
    "fixed_sidebar": True,
}
html_title = f"pyro-elbo-lab {release}"
myst_heading_anchors = 3

# -- autodoc -----------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autoclass_content = "both"


# the ``lightning`` extra is optional: document it without installing it
def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


autodoc_mock_imports = [name for name in ("pytorch_lightning", "lightning") if not _installed(name)]

# -- cross-references to other projects -------------------------------------------------
# name: (website, module patterns whose references this inventory resolves)
_PROJECTS = {
    "python": ("https://docs.python.org/3", ()),
    "torch": ("https://pytorch.org/docs/stable", ("torch",)),
    "pyro": ("https://docs.pyro.ai/en/stable", ("pyro",)),
    "arviz": ("https://python.arviz.org/en/stable", ("arviz", "arviz_base", "arviz_stats", "arviz_plots")),
    "xarray": ("https://docs.xarray.dev/en/stable", ("xarray",)),
    "numpy": ("https://numpy.org/doc/stable", ("numpy",)),
    "pandas": ("https://pandas.pydata.org/docs", ("pandas",)),
    "matplotlib": ("https://matplotlib.org/stable", ("matplotlib",)),
    "lightning": ("https://lightning.ai/docs/pytorch/stable", ("pytorch_lightning", "lightning")),
}
# import aliases that type hints in signatures carry (``pd.DataFrame``): no inventory has them
_ALIASES = ("nn", "poutine", "dist", "az", "xr", "np", "pd", "plt", "mpl", "pl")
_ONLINE = os.environ.get("ELBO_LAB_DOCS_ONLINE") == "1"
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
nitpick_ignore_regex: list[tuple[str, str]] = [(r"py:.*", rf"({'|'.join(_ALIASES)})\..*")]
for _name, (_url, _modules) in _PROJECTS.items():
    _local = HERE / "_inventories" / f"{_name}.inv"
    if _local.exists():
        intersphinx_mapping[_name] = (_url, str(_local))
    elif _ONLINE:
        intersphinx_mapping[_name] = (_url, None)
    else:
        nitpick_ignore_regex += [(r"py:.*", rf"{module}(\..*)?") for module in _modules]
intersphinx_timeout = 10
nitpicky = True
# The Python standard library: ignored only when its inventory is not loaded.
_STDLIB = "|".join(
    ("abc", "argparse", "collections", "contextlib", "dataclasses", "enum", "fnmatch", "functools", "io")
    + ("itertools", "math", "numbers", "os", "pathlib", "signal", "threading", "time", "types", "typing", "warnings")
)
if "python" not in intersphinx_mapping:
    nitpick_ignore_regex += [
        (r"py:.*", rf"({_STDLIB})(\..*)?"),
        (r"py:.*", r"(Path|PathLike|Callable|Iterable|Iterator|Mapping|Sequence|Any|ABC)"),
    ]
# words our docstrings use as types that are not classes
nitpick_ignore_regex += [(r"py:class", r"(callable|scalar|optional|array-like|tensor|Tensor)")]
# type variables (``T`` in ``fresh_copy(x: T) -> T``): autodoc renders them as classes
nitpick_ignore_regex += [(r"py:class", r"(pyro_elbo_lab(\.\w+)*\.)?[A-Z]")]


# -- our own names: the flat API and short names --------------------------------------
def _class_in_context(node):
    """The class a docstring belongs to, imported, or None."""
    module, cls = node.get("py:module"), node.get("py:class")
    if not module or not cls:
        return None
    try:
        obj = importlib.import_module(module)
        for part in cls.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def _resolve_own_reference(app, env, node, contnode):
    """
    Resolve a reference to one of our objects written the way users import it
    (``pyro_elbo_lab.BetaELBO``, ``pyro_elbo_lab.losses.BetaELBO``), or a member named without
    its class inside a class's docstring (``last_terms``, found along the class's MRO), to the
    one place where it is documented (``pyro_elbo_lab.losses.beta_elbo.BetaELBO``). Only a
    unique match resolves; anything else stays a warning.
    """
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    for strategy in (_by_import, _by_class_member, _by_suffix):
        name, as_class = strategy(domain, node)
        if name:
            if as_class:
                node = node.deepcopy()
                node["reftype"] = "class"
            found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], name, node, contnode)
            if found is not None:
                return found
    if "pyro" not in intersphinx_mapping and _pyro_elbo_member(node["reftarget"]):
        return contnode  # Pyro's ELBO API (loss_and_grads, ...) as plain text, like pyro.* names
    return None


def _canonical(domain, obj) -> str:
    """The name under which one of our classes or functions is documented, or ""."""
    module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not module or not qualname or not module.startswith("pyro_elbo_lab"):
        return ""
    name = f"{module}.{qualname}"
    if name in domain.objects:
        return name
    found = [n for n, e in domain.objects.items() if n.endswith("." + qualname) and n.startswith("pyro_elbo_lab.")]
    found = [n for n in found if not domain.objects[n].aliased] or found
    return found[0] if len(found) == 1 else ""


def _by_import(domain, node):
    """``pyro_elbo_lab.X[.Y...]``: import it and find where the object is documented."""
    target = node["reftarget"]
    if not target.startswith("pyro_elbo_lab."):
        return "", False
    obj = parent = pyro_elbo_lab
    parts = target.split(".")[1:]
    for i, part in enumerate(parts):
        try:
            obj, parent = getattr(obj, part), obj
        except AttributeError:
            try:
                obj = importlib.import_module(".".join(["pyro_elbo_lab", *parts[: i + 1]]))
            except ImportError:
                if isinstance(obj, type) and i == len(parts) - 1:  # an undocumented member
                    return _member_of(domain, obj, part)
                return "", False
    if isinstance(obj, types.ModuleType):
        return (obj.__name__ if obj.__name__ in domain.modules else ""), False
    if isinstance(parent, type):  # a method, property or attribute of one of our classes
        return _member_of(domain, parent, parts[-1])
    if isinstance(obj, type) or callable(obj):
        return _canonical(domain, obj), False
    return "", False


def _member_of(domain, cls, member):
    """A member along the MRO of ``cls``; without an entry of its own (an instance attribute,
    a dataclass field, a private hook), the documentation of its class."""
    for base in cls.__mro__:
        name = f"{base.__module__}.{base.__qualname__}.{member}"
        if name in domain.objects:
            return name, False
    if member in getattr(cls, "__dataclass_fields__", {}) or hasattr(cls, member) or _sets_attribute(cls, member):
        for base in cls.__mro__:
            name = _canonical(domain, base)
            if name:
                return name, True
    return "", False


def _by_class_member(domain, node):
    """``member`` or ``Owner.member`` written inside one of our modules or classes."""
    target = node["reftarget"]
    parts = target.split(".")
    if len(parts) == 1:
        cls = _class_in_context(node)
        return _member_of(domain, cls, target) if cls is not None else ("", False)
    if len(parts) == 2 and parts[0][:1].isupper() and node.get("py:module"):
        owner = getattr(importlib.import_module(node["py:module"]), parts[0], None)
        if isinstance(owner, type):
            return _member_of(domain, owner, parts[1])
    return "", False


def _by_suffix(domain, node):
    """A short name (``estimate_evidence``) that ends exactly one documented name of ours."""
    target = node["reftarget"]
    if "." in target and not target.split(".")[0][:1].isupper():
        return "", False  # another project's dotted name
    objects = domain.objects
    objtypes = set(domain.objtypes_for_role(node["reftype"]) or ())
    candidates = [
        n
        for n, e in objects.items()
        if n.startswith("pyro_elbo_lab.") and n.endswith("." + target) and (e.objtype in objtypes or not objtypes)
    ]
    if node["reftype"] == "obj":  # a function named like its module: the function
        candidates = [n for n in candidates if objects[n].objtype != "module"] or candidates
    # one object documented once can appear under its canonical name too (an alias)
    candidates = [n for n in candidates if not objects[n].aliased] or candidates
    module = node.get("py:module") or ""
    if len(candidates) > 1 and module:
        # prefer the object of the module the reference is written in
        candidates = [n for n in candidates if n.startswith(module + ".")] or candidates
    return (candidates[0], False) if len(candidates) == 1 else ("", False)


def _sets_attribute(cls, member: str) -> bool:
    """Whether ``member`` is an instance attribute of ``cls``: an ``:ivar:`` of its docstring, or
    assigned as ``self.member`` in the source of the class or one of its bases of ours."""
    if f" {member}:" in (cls.__doc__ or ""):
        return True
    for base in cls.__mro__:
        if not base.__module__.startswith("pyro_elbo_lab"):
            continue
        try:
            source = inspect.getsource(base)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{re.escape(member)}\s*(:[^=]*)?=[^=]", source):
            return True
    return False


def _pyro_elbo_member(name: str) -> bool:
    """A method of Pyro's ELBO named without its class (``loss_and_grads``)."""
    from pyro.infer import Trace_ELBO

    return "." not in name and not name.startswith("__") and hasattr(Trace_ELBO, name)


class FlatAPI(SphinxDirective):
    """``.. flat-api::``: a table of every name ``pyro_elbo_lab`` exports, with its summary line."""

    def run(self):
        names = [n for n in pyro_elbo_lab.__all__ if not isinstance(getattr(pyro_elbo_lab, n), types.ModuleType)]
        lines = [".. autosummary::", "   :nosignatures:", ""] + [f"   pyro_elbo_lab.{n}" for n in names]
        return self.parse_text_to_nodes("\n".join(lines))


# modules that have no API page on purpose: the entry point, and the demos (documented in the gallery)
UNDOCUMENTED_MODULES = re.compile(r"pyro_elbo_lab\.(__main__|demos(\..*)?)$")


def _check_every_module_documented(app, env):
    """A module added to the package without an ``automodule`` on an API page is a warning."""
    documented = set(env.get_domain("py").modules)
    for info in pkgutil.walk_packages(pyro_elbo_lab.__path__, "pyro_elbo_lab."):
        if info.name not in documented and not UNDOCUMENTED_MODULES.match(info.name):
            logger.warning(f"module {info.name} is not documented: add an automodule for it to a page of docs/api/")


def setup(app):
    app.connect("missing-reference", _resolve_own_reference)
    app.connect("env-check-consistency", _check_every_module_documented)
    app.add_directive("flat-api", FlatAPI)
