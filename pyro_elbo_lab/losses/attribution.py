# SPDX-License-Identifier: Apache-2.0
"""
Which model sites the auxiliary guide sites stand for, so that the per-site KL and entropy
of a guide with auxiliary sites are reported, weighted and floored at the model sites.

An *auxiliary* guide site is a sample site of the guide that the model does not have. Its
log q belongs to the model sites it was drawn for:

- :class:`~pyro.infer.autoguide.AutoNormal` draws ``<name>_unconstrained`` for each
  constrained site ``<name>`` (known from the guide's ``_event_dims``) and then a ``Delta``
  at ``<name>`` whose log density is the log-Jacobian: the auxiliary log q moves whole onto
  ``<name>`` (kind ``"site"``);
- an :class:`~pyro.infer.autoguide.AutoContinuous` guide draws one joint latent for all its
  model sites (its ``_unconstrained_shapes``, in the order of ``_unpack_latent``). When the
  joint distribution factorises over the latent dimensions
  (:class:`~pyro.infer.autoguide.AutoDiagonalNormal`), its per-dimension log q is split by
  the latent layout and each slice moves onto its model site (*split*); otherwise
  (:class:`~pyro.infer.autoguide.AutoMultivariateNormal`, low-rank, flows, Laplace) no
  per-site KL exists, and the joint KL is one *group* entry named after the auxiliary site
  that covers those model sites (kind ``"group"``);
- a hand-written auxiliary site says what it stands for with
  ``infer={"is_auxiliary": True, "auxiliary_for": "mu"}`` (one model site: its log q moves
  onto it) or ``"auxiliary_for": ("a", "b")`` (a group of model sites); without the key its
  log q stays an entry of its own (kind ``"auxiliary"``) and free bits or capacity on the
  sites it may stand for are refused (:func:`~.weighting.check_auxiliary`).
  :class:`~pyro.infer.autoguide.AutoGuideList` parts are read one by one.

:func:`attribute` computes the :class:`~.latent_rows.Attribution` once per guide and set of
sites (the losses cache it); the latent list it reads (:func:`~.latent_rows.sample_sites`)
and moving the stacked per-site rows onto the entries (:meth:`~.latent_rows.Attribution.apply`)
live in :mod:`~pyro_elbo_lab.losses.latent_rows`, the per-step half, whose names this module
re-exports (the import path the losses and diagnostics use).

A guide wrapped around an autoguide (``poutine.scale(guide, s)``, other handlers,
:class:`functools.partial`, a closure) is read through :func:`unwrap_guide`; an
``AutoNormal`` behind any other wrapper is recognised from the trace (an auxiliary
``<name>_unconstrained`` next to a ``Delta`` at ``<name>``). An autoguide-like auxiliary site
that stays unattributed warns (once per guide and set of sites).

Imports :mod:`pyro_elbo_lab.sites` and :mod:`~pyro_elbo_lab.losses.latent_rows` only.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.distributions import Delta
from pyro.infer.autoguide import AutoContinuous, AutoGuideList, AutoNormal
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger

from .. import sites
from .latent_rows import Attribution, Entry, Split
from .latent_rows import auxiliary_sites as auxiliary_sites  # re-exported: the import path of the losses
from .latent_rows import sample_sites as sample_sites

__all__ = [
    "AUXILIARY_FOR",
    "attribute",
    "unwrap_guide",
]

#: The ``infer`` key of a hand-written auxiliary guide site naming the model site(s) it stands for.
AUXILIARY_FOR = "auxiliary_for"


def _separable(guide_site: Any) -> bool:
    """Whether a joint latent's log q is a sum over its last dimension (a factorised distribution)."""
    f = sites.factorise(guide_site["fn"])
    return f.reinterpreted == 1 and f.element.event_shape == () and guide_site["value"].dim() >= 1


_AUTOGUIDES = (AutoGuideList, AutoNormal, AutoContinuous)


def unwrap_guide(guide: Any) -> Any:
    """
    The autoguide behind a wrapped guide, or the guide itself.

    Follows ``__wrapped__`` (Pyro's handlers, ``poutine.scale(guide, s)``,
    ``poutine.block(guide)``, :func:`functools.wraps`), :class:`functools.partial` ``.func``,
    a messenger's ``.fn``, and a closure that holds exactly one autoguide
    (``def guide(x): return auto(x)``). The attribution checks the autoguide's site names
    against the trace, so an autoguide found this way that the guide does not run changes
    nothing.

    :param guide: a guide callable (or ``None``).
    :returns: the first autoguide found, else ``guide``.
    """
    seen: set[int] = set()
    current = guide
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _AUTOGUIDES):
            return current
        inner = getattr(current, "__wrapped__", None)
        if inner is None and isinstance(current, functools.partial):
            inner = current.func
        if inner is None and isinstance(current, Messenger):
            inner = getattr(current, "fn", None)
        if inner is None:
            cells = getattr(current, "__closure__", None) or ()
            held = []
            for cell in cells:
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                if isinstance(value, _AUTOGUIDES):
                    held.append(value)
            inner = held[0] if len(held) == 1 else None
        if inner is None:
            return guide
        current = inner
    return guide


def _is_delta(fn: Any) -> bool:
    while not isinstance(fn, Delta) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, Delta)


def _autoguide_parts(guide: Callable[..., Any] | None) -> list:
    guide = unwrap_guide(guide)
    if isinstance(guide, AutoGuideList):
        return [p for part in guide for p in _autoguide_parts(part)]
    return [guide] if isinstance(guide, (AutoNormal, AutoContinuous)) else []


def _hint(name: str, site: Any, latent_names: Sequence[str]) -> tuple[str, ...] | None:
    value = (site.get("infer") or {}).get(AUXILIARY_FOR)
    if value is None:
        return None
    targets: tuple = (value,)
    if not isinstance(value, str):
        try:
            targets = tuple(value)
        except TypeError:
            pass
    bad = [t for t in targets if not isinstance(t, str) or t not in latent_names]
    if bad or not targets:
        raise ValueError(
            f"auxiliary guide site '{name}' has infer['{AUXILIARY_FOR}']={value!r}, but {bad or value!r} "
            f"{'is' if len(bad) <= 1 else 'are'} not latent sites of the model. Name the model site(s) whose "
            f"log q it carries, e.g. infer={{'is_auxiliary': True, '{AUXILIARY_FOR}': 'mu'}}; latent sites: "
            f"{list(latent_names)}"
        )
    return targets


def attribute(guide: Callable[..., Any] | None, model_trace: Trace, guide_trace: Trace, latent: list) -> Attribution:
    """
    Which model sites each auxiliary guide site of ``latent`` stands for.

    :param guide: the guide callable (an autoguide is read for its layout), or ``None``
        (only ``infer["auxiliary_for"]`` hints are used).
    :param model_trace: the model's trace.
    :param guide_trace: the guide's trace.
    :param list latent: ``[(name, model_site or None, guide_site), ...]``, model sites first.
    :returns: the entries of the per-site record and how rows move onto them.
    :rtype: Attribution
    :raises ValueError: for an ``auxiliary_for`` naming no latent site of the model, or a
        model site claimed by two groups.
    """
    index = {name: i for i, (name, _, _) in enumerate(latent)}
    model_names = [name for name, model_site, _ in latent if model_site is not None]
    aux_names = [name for name, model_site, _ in latent if model_site is None]
    whole: dict[str, list[str]] = {n: [] for n in model_names}  # model site -> auxiliary sites moved whole
    split: dict[str, list[tuple[str, int]]] = {}  # auxiliary site -> [(model site, size), ...]
    shaped: dict[str, tuple[tuple[str, tuple[int, ...], int], ...]] = {}  # ... -> Split.layout
    groups: dict[str, tuple[str, ...]] = {}  # auxiliary site -> model sites
    known: set = set()
    for aux in aux_names:
        targets = _hint(aux, guide_trace.nodes[aux], model_names)
        if targets is None:
            continue
        known.add(aux)
        if len(targets) == 1:
            whole[targets[0]].append(aux)
        else:
            groups[aux] = targets
    for part in _autoguide_parts(guide):
        if isinstance(part, AutoNormal):
            for name in getattr(part, "_event_dims", {}):
                aux = f"{name}_unconstrained"  # the name AutoNormal.forward samples
                if aux in index and aux not in known and name in whole:
                    whole[name].append(aux)
                    known.add(aux)
            continue
        shapes = getattr(part, "_unconstrained_shapes", None)
        aux = f"_{part._pyro_name}_latent"  # the name AutoContinuous.sample_latent samples
        if shapes is None or aux not in index or aux in known:
            continue
        layout = [(name, math.prod(shape)) for name, shape in shapes.items()]
        prototype = getattr(part, "prototype_trace", None)
        covered = tuple(name for name, _ in layout)
        if not all(name in whole for name in covered):
            continue  # the prototype and this trace differ: leave the site unattributed
        known.add(aux)
        site = guide_trace.nodes[aux]
        value = site["value"]
        if isinstance(value, torch.Tensor) and _separable(site) and value.shape[-1] == sum(size for _, size in layout):
            split[aux] = layout
            shaped[aux] = (
                ()
                if prototype is None
                else tuple(
                    (
                        name,
                        tuple(shape),
                        prototype.nodes[name]["fn"].event_dim + len(shape) - prototype.nodes[name]["value"].dim(),
                    )
                    for name, shape in shapes.items()
                )
            )
        else:
            groups[aux] = covered
    for aux in aux_names:  # AutoNormal's layout from the trace (a guide the unwrapping did not reach)
        name = aux[: -len("_unconstrained")]
        if (
            aux not in known
            and aux.endswith("_unconstrained")
            and name in whole
            and (guide_trace.nodes[aux].get("infer") or {}).get("is_auxiliary")
            and _is_delta(guide_trace.nodes[name]["fn"])
        ):
            whole[name].append(aux)
            known.add(aux)
    unknown = [a for a in aux_names if a not in known and (a.endswith("_unconstrained") or a.endswith("_latent"))]
    if unknown and model_names:
        warnings.warn(
            f"The guide's auxiliary site(s) {unknown} look like an autoguide's, but the loss could not tell which "
            f"model sites they stand for (the guide {type(guide).__name__} hides the autoguide): kl/<site> of "
            f"their model sites holds the cross-entropy -log p(z), and each is a per-site entry of its own. Pass "
            f"the autoguide itself (or poutine.scale/block or functools.partial of it), or mark the site with "
            f"infer={{'is_auxiliary': True, '{AUXILIARY_FOR}': <model site(s)>}}.",
            UserWarning,
            stacklevel=2,
        )
    owner: dict[str, str] = {}
    for aux, covered in groups.items():
        for name in covered:
            if name in owner:
                raise ValueError(
                    f"model site '{name}' is covered by two joint auxiliary guide sites, '{owner[name]}' and "
                    f"'{aux}'; each model site may belong to one group (infer['{AUXILIARY_FOR}'])."
                )
            owner[name] = aux
    entries: list[Entry] = []
    position: dict[str, int] = {}
    for name in model_names:
        if name in owner:
            aux = owner[name]
            if aux not in position:
                covered = groups[aux]
                rows = (index[aux],) + tuple(index[n] for n in covered)
                rows += tuple(index[a] for n in covered for a in whole[n])
                auxiliary = (aux,) + tuple(a for n in covered for a in whole[n])
                position[aux] = len(entries)
                entries.append(Entry(aux, "group", rows, covered, auxiliary))
            position[name] = position[aux]
            continue
        position[name] = len(entries)
        rows = (index[name],) + tuple(index[a] for a in whole[name])
        entries.append(Entry(name, "site", rows, (name,), tuple(whole[name])))
    splits = []
    for aux, layout in split.items():
        columns: list[int] = []
        for name, size in layout:
            columns += [position[name]] * size
        splits.append(Split(index[aux], tuple(columns), shaped[aux]))
        for name, _ in layout:  # record the auxiliary site on every entry it is split onto
            e = position[name]
            entry = entries[e]
            if aux not in entry.auxiliary:
                entries[e] = Entry(entry.name, entry.kind, entry.rows, entry.sites, entry.auxiliary + (aux,))
    for aux in aux_names:
        if aux not in known:
            entries.append(Entry(aux, "auxiliary", (index[aux],), (), (aux,)))
    return Attribution(entries, splits, len(latent), frozenset(index[a] for a in aux_names))
