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
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import pyro_elbo_lab  # noqa: E402

project = "pyro-elbo-lab"
author = "pyro-elbo-lab developers"
copyright = "2026, pyro-elbo-lab developers"
release = pyro_elbo_lab.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
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
    "torch": ("https://pytorch.org/docs/stable", (r"torch", r"nn")),
    "pyro": ("https://docs.pyro.ai/en/stable", (r"pyro", r"poutine", r"dist")),
    "arviz": ("https://python.arviz.org/en/stable", (r"arviz", r"az", r"arviz_base", r"arviz_stats", r"arviz_plots")),
    "xarray": ("https://docs.xarray.dev/en/stable", (r"xarray", r"xr")),
    "numpy": ("https://numpy.org/doc/stable", (r"numpy", r"np")),
    "pandas": ("https://pandas.pydata.org/docs", (r"pandas", r"pd")),
    "matplotlib": ("https://matplotlib.org/stable", (r"matplotlib", r"plt", r"mpl")),
    "lightning": ("https://lightning.ai/docs/pytorch/stable", (r"pytorch_lightning", r"lightning", r"pl")),
}
_ONLINE = os.environ.get("ELBO_LAB_DOCS_ONLINE") == "1"
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
nitpick_ignore_regex: list[tuple[str, str]] = []
for _name, (_url, _modules) in _PROJECTS.items():
    _local = HERE / "_inventories" / f"{_name}.inv"
    if _local.exists():
        intersphinx_mapping[_name] = (_url, str(_local))
    elif _ONLINE:
        intersphinx_mapping[_name] = (_url, None)
    else:
        for _module in _modules:
            nitpick_ignore_regex.append((r"py:.*", rf"{_module}(\..*)?"))
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
    (``pyro_elbo_lab.BetaELBO``), or a member named without its class inside a class's
    docstring (``last_terms``, found along the class's MRO), to the one place where it is
    documented (``pyro_elbo_lab.losses.BetaELBO``). Only a unique match resolves;
    anything else stays a warning.
    """
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    objects = domain.objects
    target = node["reftarget"]
    candidates: list[str] = []
    cls, member = _class_in_context(node), target
    parts = target.removeprefix("pyro_elbo_lab.").split(".")
    if len(parts) == 2 and parts[0][:1].isupper():
        # Owner.member: pyro_elbo_lab.BetaELBO.last_terms, CollapseReport.kl_method
        owner = getattr(pyro_elbo_lab, parts[0], None) if parts[0] in pyro_elbo_lab.__all__ else None
        if owner is None and node.get("py:module"):
            owner = getattr(importlib.import_module(node["py:module"]), parts[0], None)
        cls, member = (owner, parts[1]) if isinstance(owner, type) else (None, target)
    if cls is not None and "." not in member:
        for base in cls.__mro__:
            name = f"{base.__module__}.{base.__qualname__}.{member}"
            if name in objects:
                candidates = [name]
                break
        else:
            # a member without an entry of its own (an instance attribute listed as :ivar:,
            # a dataclass field, a private hook) links to the documentation of its class
            fields = getattr(cls, "__dataclass_fields__", {})
            if member in fields or hasattr(cls, member) or _sets_attribute(cls, member):
                for base in cls.__mro__:
                    name = f"{base.__module__}.{base.__qualname__}"
                    if name in objects or (name := _documented_as(objects, base)):
                        return _resolve_as_class(app, env, node, contnode, domain, name)
                return None
    if not candidates:
        if target.startswith("pyro_elbo_lab."):
            target = target[len("pyro_elbo_lab.") :]
        elif "." in target and not target.split(".")[0][:1].isupper():
            return None  # another project's dotted name
        suffix = "." + target
        candidates = [n for n, e in objects.items() if n.startswith("pyro_elbo_lab.") and n.endswith(suffix)]
        # one object documented once can appear under its canonical name too (an alias)
        canonical = [n for n in candidates if not objects[n].aliased]
        candidates = canonical or candidates
        module = node.get("py:module") or ""
        if len(candidates) > 1 and module:
            # prefer the object of the module the reference is written in
            candidates = [n for n in candidates if n.startswith(module + ".")] or candidates
    if len(candidates) != 1:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], candidates[0], node, contnode)


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


def _documented_as(objects, cls) -> str:
    """The name under which a class of ours is documented (its canonical name or a re-export)."""
    if not cls.__module__.startswith("pyro_elbo_lab"):
        return ""
    found = [n for n, e in objects.items() if n.endswith("." + cls.__qualname__) and n.startswith("pyro_elbo_lab.")]
    found = [n for n in found if not objects[n].aliased] or found
    return found[0] if len(found) == 1 else ""


def _resolve_as_class(app, env, node, contnode, domain, name):
    node = node.deepcopy()
    node["reftype"] = "class"
    return domain.resolve_xref(env, node["refdoc"], app.builder, "class", name, node, contnode)


def setup(app):
    app.connect("missing-reference", _resolve_own_reference)
