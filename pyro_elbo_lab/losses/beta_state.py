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

import fnmatch
import math
from typing import Callable, Iterable

from ..checks import nonnegative_number
from ..schedules import ScheduleLike, as_schedule
from ..terms import ELBOTerms, TermsRecord

__all__ = ["BetaState", "GlobSites", "check_selection_matches", "check_site_names", "site_selected"]


def check_site_names(sites: Iterable[str] | str | Callable[[str], bool] | None):
    """
    Validate ``sites=``: ``None`` (every site), site names (a str or an iterable of str), a
    glob pattern (a str with ``*``, ``?`` or ``[``, matched with :func:`fnmatch.fnmatchcase`)
    or a callable ``name -> bool``.

    :returns: ``None``, a frozenset of names, or a predicate ``name -> bool`` (patterns
        become a :class:`GlobSites`).
    :raises ValueError: for an empty collection or a name that is not a str.
    """
    if sites is None:
        return None
    if isinstance(sites, str) and any(c in sites for c in "*?["):
        return GlobSites(sites)
    if callable(sites):
        return sites
    if isinstance(sites, str):
        sites = [sites]
    try:
        sites = frozenset(sites)
    except TypeError:
        raise ValueError(
            f"sites must be site names, a glob pattern or a callable name -> bool, got sites={sites!r}"
        ) from None
    if not sites:
        raise ValueError("sites is empty: pass None to weight every latent site, or name at least one")
    for name in sites:
        if not isinstance(name, str):
            raise ValueError(f"sites must be site names (str), got {name!r} in sites={sorted(map(str, sites))}")
    return sites


class GlobSites:
    """A ``sites=`` glob pattern as a predicate (``GlobSites("z_*")("z_3") is True``)."""

    def __init__(self, pattern: str):
        self.pattern = pattern

    def __call__(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def __repr__(self) -> str:
        return repr(self.pattern)


def site_selected(sites, name: str) -> bool:
    """Whether ``sites`` (as returned by :func:`check_site_names`) selects site ``name``."""
    if sites is None:
        return True
    if isinstance(sites, frozenset):
        return name in sites
    return bool(sites(name))


def check_selection_matches(sites, available: list) -> None:
    """
    A pattern or predicate must select at least one of the ``available`` sites of this
    call (explicit names are checked by the losses, with their own messages).

    :raises ValueError: naming the pattern and the sites present.
    """
    if sites is None or isinstance(sites, frozenset):
        return
    if not any(sites(name) for name in available):
        raise ValueError(
            f"sites={sites!r} selects none of the sites β can weight in this call: {available}. "
            "Fix the pattern, or pass sites=None to weight every site."
        )


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
