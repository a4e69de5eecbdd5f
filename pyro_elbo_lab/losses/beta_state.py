# SPDX-License-Identifier: Apache-2.0
"""
The β schedule, step count, checkpoint state and last recorded terms shared by the losses
that do not build on :class:`~pyro_elbo_lab.losses.objective.WeightedObjective`
(:class:`~pyro_elbo_lab.BetaTraceEnumELBO`, :class:`~pyro_elbo_lab.BetaTraceGraphELBO`,
:class:`~pyro_elbo_lab.IWAE`). Same semantics as :class:`~pyro_elbo_lab.BetaELBO`:
``loss`` records terms without advancing the step, ``loss_and_grads`` and
``differentiable_loss`` count one gradient step.

Imports only :mod:`pyro_elbo_lab.checks`, :mod:`pyro_elbo_lab.schedules` and
:mod:`pyro_elbo_lab.terms`.
"""
from __future__ import annotations

import math
from typing import Iterable

from ..checks import nonnegative_number
from ..schedules import ScheduleLike, as_schedule
from ..terms import ELBOTerms, TermsRecord

__all__ = ["BetaState", "check_site_names"]


def check_site_names(sites: Iterable[str] | str | None) -> frozenset | None:
    """
    ``sites`` as a frozenset of names (``None`` stays ``None``).

    :raises ValueError: for an empty collection or a non-string name.
    """
    if sites is None:
        return None
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
            raise ValueError(f"sites must be site names (str), got {name!r} in sites={sorted(map(str, sites))}")
    return sites


class BetaState:
    """
    Mixin: a β schedule, the gradient-step count and the last :class:`~pyro_elbo_lab.terms.TermsRecord`.

    Subclasses call :meth:`_init_beta` before ``super().__init__`` and set
    ``self._last_record`` on every loss evaluation.
    """

    def _init_beta(self, beta: ScheduleLike) -> None:
        if not callable(beta):
            beta = nonnegative_number(
                beta, "beta", "beta=1 gives the ELBO, beta>1 a β-VAE, beta<1 weakens the KL term; or pass a schedule"
            )
        self._beta = as_schedule(beta, "beta")
        self.step = 0
        self._last_record: TermsRecord | None = None

    def current_beta(self, step: int | None = None) -> float:
        """
        β at ``step`` (default: the current step).

        :raises ValueError: if the schedule returns a negative or non-finite value.
        """
        step = self.step if step is None else step
        value = float(self._beta(step))
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"the beta schedule {self._beta!r} returned {value!r} at step {step}; β must be finite and >= 0")
        return value

    def current_capacity(self, step: int | None = None) -> None:
        """Always ``None``: these losses have no capacity term."""
        return None

    def state_dict(self) -> dict:
        """The loss's own state (its gradient-step count), for checkpoints."""
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        """
        Restore :meth:`state_dict` so that schedules continue where they stopped.

        :raises ValueError: if ``state`` has no non-negative integer ``"step"``.
        """
        step = state.get("step") if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"state must be a dict with a non-negative integer 'step', got {state!r}")
        self.step = step

    @property
    def last_terms(self) -> ELBOTerms | None:
        """
        The :class:`~pyro_elbo_lab.ELBOTerms` of the last ``loss``, ``loss_and_grads`` or
        ``differentiable_loss`` call (``None`` before the first); one device sync on first access.
        """
        return None if self._last_record is None else self._last_record.terms()
