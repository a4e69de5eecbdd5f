# SPDX-License-Identifier: Apache-2.0
"""
The hyper-parameters of the weighted objectives (β, the latent sites they weight, free
bits λ, capacity C and its weight γ): validation at construction and their values at a
step. Used by :mod:`pyro_elbo_lab.losses.objective`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from pyro.poutine import Trace

from ..checks import check_int, nonnegative_number
from ..schedules import Schedule, ScheduleLike, as_schedule
from ..sites import element_mask
from .attribution import Attribution, Entry, auxiliary_sites
from .beta_state import SiteSelection, check_selection_matches, check_site_names, site_selected

__all__ = [
    "check_auxiliary",
    "check_particles",
    "check_schedule",
    "check_selected_sites",
    "check_weighting",
    "schedule_value",
]


def check_schedule(schedule: Callable[[int], float], name: str) -> None:
    """
    Validate a schedule at construction: its value at step 0 and, for the schedules of
    :mod:`pyro_elbo_lab.schedules` (monotone between ``start`` and ``end``), its end
    points must be finite and >= 0. Other callables are checked again at every call.
    """
    values = [("its value at step 0", schedule(0))]
    if isinstance(schedule, Schedule):
        values += [(attr, getattr(schedule, attr)) for attr in ("value", "start", "end") if hasattr(schedule, attr)]
    for what, value in values:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"the {name} schedule {schedule!r} must return numbers; {what} is {value!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"the {name} schedule {schedule!r} has {what} = {value!r}; {name} must stay finite and >= 0"
            )


def schedule_value(schedule: Callable[[int], float], step: int, name: str) -> float:
    """
    The schedule's value at ``step``, checked.

    :raises ValueError: if it is negative or not finite.
    """
    value = float(schedule(step))
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"the {name} schedule {schedule!r} returned {value!r} at step {step}; {name} must be finite and >= 0"
        )
    return value


def check_weighting(
    beta: ScheduleLike,
    sites: Iterable[str] | str | Callable[[str], bool] | None,
    free_bits: float | None,
    capacity: ScheduleLike | None,
    gamma: float,
) -> tuple[Callable[[int], float], SiteSelection, float | None, float, Callable[[int], float] | None]:
    """
    Validate the objective's hyper-parameters.

    :returns: ``(beta schedule, sites (None, a frozenset of names or a predicate, as
        :func:`~pyro_elbo_lab.losses.beta_state.check_site_names`), free_bits, gamma,
        capacity schedule or None)``.
    :raises ValueError: naming the argument, the value found and what to pass instead.
    """
    if not callable(beta):
        beta = nonnegative_number(
            beta,
            "beta",
            "beta=1 gives the ELBO, beta>1 a β-VAE, beta<1 weakens the KL term; or pass a schedule",
        )
    else:
        check_schedule(beta, "beta")
    beta_schedule = as_schedule(beta, "beta")
    sites = check_site_names(sites)
    if free_bits is not None:
        free_bits = nonnegative_number(
            free_bits, "free_bits", "λ in Kingma et al. 2016 is a number of nats per latent dimension"
        )
    gamma = nonnegative_number(gamma, "gamma", "γ in Burgess et al. 2018 weights |KL - C|")
    if capacity is not None:
        if free_bits is not None:
            raise ValueError("free_bits and capacity are alternative objectives: pass one of them, not both")
        if callable(beta) or beta != 1:
            raise ValueError(
                "capacity replaces β: the objective is E_q[log p(x|z)] - gamma * |KL - C|; "
                f"leave beta at 1 (got beta={beta!r}) and set gamma instead"
            )
        if not callable(capacity):
            capacity = nonnegative_number(capacity, "capacity", "C is in nats per element of the data plate")
        else:
            check_schedule(capacity, "capacity")
        capacity = as_schedule(capacity, "capacity")
    return beta_schedule, sites, free_bits, gamma, capacity


def _sample_names(trace: Trace, observed: bool | None = None) -> list[str]:
    return [
        n
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and (observed is None or s["is_observed"] == observed)
    ]


def check_selected_sites(model_trace: Trace, guide_trace: Trace, sites: SiteSelection) -> None:
    """
    :raises ValueError: if ``sites`` names an observed site or a site that is neither a
        latent site of the model nor an auxiliary guide site.
    """
    if sites is None:
        return
    latent = _sample_names(model_trace, observed=False)
    observed = _sample_names(model_trace, observed=True)
    auxiliary = [name for name, _ in auxiliary_sites(model_trace, guide_trace)]
    if not isinstance(sites, frozenset):  # a glob pattern or a predicate
        check_selection_matches(sites, latent + auxiliary)
        return
    for name in sorted(sites):
        if name in observed:
            raise ValueError(
                f"sites names '{name}', an observed site of the model; β, free bits and capacity weight "
                f"the KL of latent sites. Latent sites: {latent + auxiliary}"
            )
        if name not in latent and name not in auxiliary:
            raise ValueError(
                f"sites names '{name}', which is not a latent site of the model. Latent sites: "
                f"{latent + auxiliary}. Fix the name, or pass sites=None to weight every latent site."
            )


def check_auxiliary(
    model_trace: Trace,
    guide_trace: Trace,
    attribution: Attribution,
    sites: SiteSelection,
    *,
    free_bits: bool,
    capacity: bool,
) -> None:
    """
    Refuse a weighting that auxiliary guide sites would make wrong, given which model sites
    they stand for (:func:`~pyro_elbo_lab.losses.attribution.attribute`).

    - An auxiliary site attributed to one model site (``AutoNormal``'s
      ``<site>_unconstrained``, a slice of ``AutoDiagonalNormal``'s latent, a hand-written
      site with ``infer["auxiliary_for"]``) is part of that site's KL: β, free bits and
      capacity apply to the site's whole KL. Free bits then need the site to be one latent
      dimension (its auxiliary log q is one number per element).
    - A joint auxiliary site that cannot be split (``AutoMultivariateNormal``, low-rank,
      flows; ``auxiliary_for`` naming several sites) has one KL for its model sites: β and
      capacity weight them together (``sites`` selects all of them or none), free bits are
      refused (no KL per latent dimension exists).
    - An auxiliary site whose model sites are not known (a hand-written site without
      ``auxiliary_for``) may carry the log q of any latent site: free bits and capacity on
      latent sites are refused, and β on a subset must include it.

    :raises ValueError: naming the site, what is wrong and what to use instead.
    """
    entries = attribution.entries
    unknown = [e.name for e in entries if e.kind == "auxiliary"]

    def chosen(entry: Entry) -> list[str]:
        return [n for n in entry.names if site_selected(sites, n)]

    nonlinear = free_bits or capacity
    for entry in entries:
        picked = chosen(entry)
        if not picked:
            continue
        if entry.kind == "group" and sites is not None and entry.name not in picked:
            missing = [n for n in entry.sites if n not in picked]
            if missing:
                raise ValueError(
                    f"sites selects '{picked[0]}' but not {missing}: the guide's auxiliary site '{entry.name}' has one "
                    f"joint log q for {list(entry.sites)} (a non-factorised joint such as AutoMultivariateNormal's), "
                    f"so their KL is one number and is weighted whole. Add {missing} to sites=, name '{entry.name}', "
                    "or pass sites=None."
                )
        if nonlinear and unknown and entry.kind != "group":
            raise ValueError(
                f"free bits and capacity need the KL of each selected latent site, but site '{picked[0]}' is part of "
                f"a guide with auxiliary sites {unknown} whose model sites are not known: the log q of a latent site "
                "may live (partly) at an auxiliary site, so its term would not be a KL. Mark each auxiliary site "
                "with the model site(s) it stands for, infer={'is_auxiliary': True, 'auxiliary_for': 'z'}; or use "
                "beta weighting, or restrict sites= to sites that the guide samples directly."
            )
        if free_bits and entry.kind == "group":
            raise ValueError(
                f"free bits need the KL of each latent dimension, but the guide's auxiliary site '{entry.name}' has "
                f"one joint log q for {list(entry.sites)} (a non-factorised joint: AutoMultivariateNormal, "
                "AutoLowRankMultivariateNormal, a normalising flow, or auxiliary_for naming several sites), so no KL "
                "per site or dimension exists. Use capacity or beta weighting, leave these sites out of sites=, or "
                "use a factorised guide (AutoNormal, AutoDiagonalNormal)."
            )
        if free_bits and entry.kind == "site" and entry.auxiliary:
            dims = element_mask(model_trace.nodes[entry.name], guide_trace.nodes[entry.name], per_dim=True).shape[-1]
            if dims != 1:
                raise ValueError(
                    f"free bits floor the KL per latent dimension, but site '{entry.name}' has {dims} latent "
                    f"dimensions and the log q of its auxiliary site(s) {list(entry.auxiliary)} is one number per "
                    "element, which no dimension owns. Use capacity or beta weighting for this site, or leave it "
                    "out of sites=."
                )
        if sites is not None and unknown and entry.kind == "site":
            missing = [n for n in unknown if not site_selected(sites, n)]
            if missing:
                raise ValueError(
                    f"sites selects '{picked[0]}' but not {missing}: the guide's auxiliary site(s) {missing} do not "
                    "say which model sites they stand for, so they may carry (part of) the log q of "
                    f"'{entry.name}', whose KL is only weighted right together with them. Add them to sites=, mark "
                    "them with infer={'is_auxiliary': True, 'auxiliary_for': <model site>}, or pass sites=None."
                )


def check_particles(elbo_kwargs: dict) -> None:
    """
    Check Pyro's ``num_particles`` before ``ELBO.__init__`` sees it.

    :raises ValueError: if it is not an integer >= 1.
    """
    check_int(
        "num_particles",
        elbo_kwargs.get("num_particles", 1),
        1,
        hint="the number of samples the loss averages over per step",
    )
