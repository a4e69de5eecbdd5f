# SPDX-License-Identifier: Apache-2.0
"""
The hyper-parameters of the weighted objectives (β, the latent sites they weight, free
bits λ, capacity C and its weight γ): validation at construction and their values at a
step. Used by :mod:`pyro_elbo_lab.losses.objective`.
"""
from __future__ import annotations

import math
from typing import Iterable

from ..checks import nonnegative_number
from ..schedules import Schedule, ScheduleLike, as_schedule

__all__ = ["check_schedule", "check_weighting", "schedule_value"]


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
    sites: Iterable[str] | None,
    free_bits: float | None,
    capacity: ScheduleLike | None,
    gamma: float,
):
    """
    Validate the objective's hyper-parameters.

    :returns: ``(beta schedule, sites as a frozenset or None, free_bits, gamma, capacity
        schedule or None)``.
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
    if sites is not None:
        if isinstance(sites, str):
            sites = [sites]
        try:
            sites = frozenset(sites)
        except TypeError:
            raise ValueError(f"sites must be an iterable of latent site names, got sites={sites!r}") from None
        if not sites:
            raise ValueError("sites is empty: pass None to weight every latent site, or name at least one")
        for name in sites:
            if not isinstance(name, str):
                raise ValueError(f"sites must be site names (str), got {name!r}")
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
