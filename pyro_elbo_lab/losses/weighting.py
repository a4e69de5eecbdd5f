# SPDX-License-Identifier: Apache-2.0
"""
The hyper-parameters of the weighted objectives (β, the latent sites they weight, free
bits λ, capacity C and its weight γ): validation at construction and their values at a
step. Used by :mod:`pyro_elbo_lab.losses.objective`.
"""

from __future__ import annotations

import math

from pyro.distributions import Delta

from ..checks import check_int, nonnegative_number
from ..schedules import Schedule, ScheduleLike, as_schedule
from .beta_state import check_selection_matches, check_site_names, site_selected

__all__ = [
    "check_auxiliary",
    "check_particles",
    "check_schedule",
    "check_selected_sites",
    "check_weighting",
    "schedule_value",
]


def check_schedule(schedule, name: str) -> None:
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


def schedule_value(schedule, step: int, name: str) -> float:
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
    sites,
    free_bits: float | None,
    capacity: ScheduleLike | None,
    gamma: float,
):
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


def _sample_names(trace, observed: bool | None = None) -> list[str]:
    return [
        n
        for n, s in trace.nodes.items()
        if s["type"] == "sample" and (observed is None or s["is_observed"] == observed)
    ]


def check_selected_sites(model_trace, guide_trace, sites) -> None:
    """
    :raises ValueError: if ``sites`` names an observed site or a site that is neither a
        latent site of the model nor an auxiliary guide site.
    """
    if sites is None:
        return
    latent = _sample_names(model_trace, observed=False)
    observed = _sample_names(model_trace, observed=True)
    auxiliary = [n for n in _sample_names(guide_trace) if n not in model_trace.nodes]
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


def check_auxiliary(model_trace, guide_trace, sites, nonlinear: bool) -> None:
    """
    Refuse a weighting that auxiliary guide sites (those of ``AutoNormal``,
    ``AutoDiagonalNormal``, every ``AutoContinuous`` guide, and hand-written sites with
    ``infer={"is_auxiliary": True}``) would make wrong.

    With an autoguide the model site's guide distribution is a ``Delta`` and its log q
    lives at an auxiliary site, so the term of the model site alone is the cross-entropy
    :math:`-\\log p(z)`, not a KL; with a hand-written auxiliary site ``u``, the log q of
    the sites it stands for is split between them and ``u``. A linear weighting of every
    site (``sites=None``) is still exact (the total is); β on a subset is exact only when
    the subset holds each model site together with the auxiliary sites that carry its
    log q (AutoNormal's ``<site>_unconstrained``; an AutoContinuous guide's joint latent
    and all its model sites; every hand-written auxiliary site, since which sites it
    stands for is not known); free bits and capacity, non-linear in each KL, are refused.

    :raises ValueError: naming the site, what is wrong and what to use instead.
    """
    auxiliary = [n for n in _sample_names(guide_trace) if n not in model_trace.nodes]
    if not auxiliary:
        return
    latent = _sample_names(model_trace, observed=False)
    delta = [n for n in latent if isinstance(_strip(guide_trace.nodes[n]["fn"]), Delta)]
    # auxiliary sites of a hand-written guide (infer={"is_auxiliary": True}): which model
    # sites they stand for is not known, so each may carry the log q of any non-Delta site
    paired = {f"{n}_unconstrained" for n in latent}
    free = [n for n in auxiliary if n not in paired and not n.startswith("_Auto")]
    selected = {n for n in latent + auxiliary if site_selected(sites, n)}

    def partners(name: str) -> list:
        if name in auxiliary:
            if name.endswith("_unconstrained") and name[: -len("_unconstrained")] in latent:
                return [name[: -len("_unconstrained")]]
            return delta if name not in free else []
        if f"{name}_unconstrained" in auxiliary:
            return [f"{name}_unconstrained"]
        return [n for n in auxiliary if n not in paired] if name in delta else free

    touched = sorted(n for n in selected if n in auxiliary or partners(n))
    if not touched:
        return
    if nonlinear:
        raise ValueError(
            f"free bits and capacity need the KL of each selected latent site, but site '{touched[0]}' is part of "
            f"a guide with auxiliary sites {auxiliary} (AutoNormal, AutoDiagonalNormal, AutoContinuous, or "
            "infer={'is_auxiliary': True}): the log q of a latent site lives (partly) at an auxiliary site, so "
            "its term would not be a KL. Use beta weighting, restrict sites= to sites that the guide samples "
            "directly, or write a guide with one site per latent (e.g. pyro.sample(name, "
            "dist.Normal(loc, scale).to_event(1)))."
        )
    if sites is None:
        return
    for name in touched:
        missing = [n for n in partners(name) if n not in selected]
        if missing:
            raise ValueError(
                f"sites selects '{name}' but not {missing}: with auxiliary guide sites the log q of a latent site "
                f"lives (partly) at an auxiliary site, so the KL of '{name}' is only weighted right together with "
                f"{missing}. Add them to sites=, or pass sites=None."
            )


def _strip(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


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
