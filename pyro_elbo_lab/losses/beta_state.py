# SPDX-License-Identifier: Apache-2.0
"""
The β schedule, step count, checkpoint state and last recorded terms shared by the losses
that do not build on :class:`~pyro_elbo_lab.losses.objective.WeightedObjective`
(:class:`~pyro_elbo_lab.BetaTraceEnumELBO`, :class:`~pyro_elbo_lab.BetaTraceGraphELBO`,
:class:`~pyro_elbo_lab.IWAE`). and through
:class:`~pyro_elbo_lab.losses.objective.WeightedObjective` also by
:class:`~pyro_elbo_lab.BetaELBO`, :class:`~pyro_elbo_lab.BetaMeanFieldELBO` and the compiled
losses: the one home of the schedule position (see :class:`BetaState` for the rule).

Imports only torch, :mod:`pyro_elbo_lab.checks`, :mod:`pyro_elbo_lab.schedules` and
:mod:`pyro_elbo_lab.terms`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace

from ..checks import check_int, empty_plate_errors, nonnegative_number
from ..schedules import ScheduleLike, as_schedule
from ..terms import ELBOTerms, TermsRecord

__all__ = [
    "BetaState",
    "GlobSites",
    "SiteSelection",
    "check_enumerated_sites",
    "check_selection_matches",
    "check_site_names",
    "enumerated_site_error",
    "site_selected",
]


#: ``sites=`` once validated by :func:`check_site_names`: every site (``None``), a set of names or a predicate.
SiteSelection = frozenset | Callable[[str], bool] | None


def check_site_names(sites: Iterable[str] | str | Callable[[str], bool] | None) -> SiteSelection:
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

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern

    def __call__(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)

    def __repr__(self) -> str:
        return repr(self.pattern)


def site_selected(sites: SiteSelection, name: str) -> bool:
    """Whether ``sites`` (as returned by :func:`check_site_names`) selects site ``name``."""
    if sites is None:
        return True
    if isinstance(sites, frozenset):
        return name in sites
    return bool(sites(name))


def check_selection_matches(sites: SiteSelection, available: list) -> None:
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


def enumerated_site_error(name: str) -> ValueError:
    """
    The error for a latent site enumerated in the model (``infer={"enumerate": ...}``,
    ``config_enumerate``) that the guide does not sample, raised by every loss that cannot
    sum it out; it names the class that can, :class:`~pyro_elbo_lab.BetaTraceEnumELBO`.
    """
    return ValueError(
        f"The model's latent site '{name}' is enumerated in the model; use BetaTraceEnumELBO, which sums it "
        "out exactly (or add a guide site of that name to sample it)."
    )


def is_enumerated(msg: Message) -> bool:
    """Whether a model sample site is latent and marked for enumeration."""
    return not msg["is_observed"] and (msg.get("infer") or {}).get("enumerate") in ("parallel", "sequential")


class _GuideSiteNames(Messenger):
    def __init__(self) -> None:
        super().__init__()
        self.names: set = set()

    def _pyro_sample(self, msg: Message) -> None:
        self.names.add(msg["name"])


class _EnumeratedSiteCheck(Messenger):
    def __init__(self, guide_names: _GuideSiteNames) -> None:
        super().__init__()
        self.guide_names = guide_names

    def _pyro_sample(self, msg: Message) -> None:
        # runs before poutine.replay substitutes the guide's value and infer dict
        if is_enumerated(msg) and msg["name"] not in self.guide_names.names:
            raise enumerated_site_error(str(msg["name"]))  # Message.name is Optional; a sample site has one


def check_enumerated_sites(
    model: Callable[..., Any], guide: Callable[..., Any]
) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """
    Wrap ``model`` and ``guide`` (for one ``_get_trace``, guide run first, as Pyro's
    ``get_importance_trace``) so that a model site enumerated in the model with no guide
    site raises :func:`enumerated_site_error` while the model runs, before Pyro's
    "Found vars in model but not guide" warning. For the losses that cannot sum such a
    site out (:class:`~pyro_elbo_lab.BetaTraceGraphELBO`, :class:`~pyro_elbo_lab.IWAE`);
    they call it under validation only.

    :returns: ``(model, guide)`` wrapped.
    """
    names = _GuideSiteNames()
    return _EnumeratedSiteCheck(names)(model), names(guide)


class BetaState:
    """
    Mixin: a β schedule, the schedule position :attr:`step` and the last
    :class:`~pyro_elbo_lab.terms.TermsRecord`.

    **The step rule: one optimiser step is one schedule step.** β (and the capacity C)
    are read at :attr:`step`, the number of optimiser steps taken so far.

    * A call that computes gradients (``loss_and_grads``, or ``differentiable_loss``
      with gradients enabled) counts one optimiser step, after it has run. That is right
      for :class:`pyro.infer.SVI` (one ``loss_and_grads`` per ``svi.step()``) and for a
      PyTorch loop that calls the loss once per ``optimizer.step()``.
    * ``loss``, ``decompose`` and ``differentiable_loss`` under :func:`torch.no_grad`
      (evaluation) never count.
    * An optimiser that evaluates the loss several times per step (``torch.optim.LBFGS``'s
      closure, its line search and inner iterations; gradient accumulation) wraps the
      step in :meth:`optimizer_step`: every call inside the block uses the same β and C,
      and the block counts one step when it exits (``with loss.optimizer_step():
      optimizer.step(closure)``).
    * A driver with its own step counter sets the position before each step with
      ``load_state_dict({"step": n})`` (:class:`~pyro_elbo_lab.SVIRunner` counts through
      ``loss_and_grads``; the Lightning module sets ``trainer.global_step``).

    Why explicit and not detected: a parameter change between two calls does not mark
    an optimiser step (L-BFGS moves the parameters at every line-search trial and inner
    iteration of one ``optimizer.step``), and parameters outside Pyro's param store
    would go unseen; the block is exact for any optimiser and costs nothing per call.

    Subclasses call :meth:`_init_beta` (or :meth:`_init_step`) before
    ``super().__init__``, set ``self._last_record`` on every loss evaluation, and call
    :meth:`_advance_step` after every gradient call.
    """

    # empty data (a plate of size 0) named once for every loss: each runs the model through
    # Pyro's _guess_max_plate_nesting and _get_trace (vectorised particles included)
    def _guess_max_plate_nesting(self, model, guide, args, kwargs):
        with empty_plate_errors():
            return super()._guess_max_plate_nesting(model, guide, args, kwargs)  # type: ignore[misc]

    def _get_trace(self, model, guide, args, kwargs):
        with empty_plate_errors():
            return super()._get_trace(model, guide, args, kwargs)  # type: ignore[misc]

    def _init_beta(self, beta: ScheduleLike) -> None:
        if not callable(beta):
            beta = nonnegative_number(
                beta, "beta", "beta=1 gives the ELBO, beta>1 a β-VAE, beta<1 weakens the KL term; or pass a schedule"
            )
        self._beta = as_schedule(beta, "beta")
        self._init_step()

    def _init_beta_only(
        self,
        beta: ScheduleLike,
        sites: Iterable[str] | str | Callable[[str], bool] | None,
        free_bits: float | None,
        capacity: ScheduleLike | None,
        why: str,
        elbo_kwargs: dict,
    ) -> None:
        """
        β and ``sites`` of a loss that weights by β only (free bits and capacity refused).

        :param str why: why this loss cannot take free bits or capacity, and what to use instead.
        :param dict elbo_kwargs: the keyword arguments for Pyro's ELBO (``num_particles`` checked).
        :raises NotImplementedError: for ``free_bits`` or ``capacity``.
        :raises ValueError: for ``num_particles`` not an integer >= 1.
        """
        if free_bits is not None or capacity is not None:
            raise NotImplementedError(f"{type(self).__name__} supports β weighting only: {why}")
        check_int(
            "num_particles",
            elbo_kwargs.get("num_particles", 1),
            1,
            hint="the number of samples the loss averages over per step",
        )
        self._init_beta(beta)
        self.sites = check_site_names(sites)

    def _init_step(self) -> None:
        self.step = 0
        self._step_held = 0
        self._last_record: TermsRecord | None = None
        self._sites_seen: set = set()

    def _check_sites_per_call(self, model_trace: Trace, guide_trace: Trace, check: Callable, *extra: Any) -> None:
        """
        The one rule for ``sites=``: checked on every call against the sites present (a deep
        Markov model's ``z_1 … z_T`` varies with the batch's length), cheaply: ``check(model_trace,
        guide_trace, *extra)`` runs once per set of model and guide site names seen.
        """
        key = (tuple(model_trace.nodes), tuple(guide_trace.nodes))
        seen = self.__dict__.setdefault("_sites_seen", set())
        if key in seen:
            return
        check(model_trace, guide_trace, *extra)
        if len(seen) >= 4096:  # bounded: a stream of ever-new site sets is checked every time
            seen.clear()
        seen.add(key)

    def _advance_step(self) -> None:
        """Count one optimiser step after a gradient call, unless inside :meth:`optimizer_step` or under no_grad."""
        if not getattr(self, "_step_held", 0) and torch.is_grad_enabled():
            self.step += 1

    @contextlib.contextmanager
    def optimizer_step(self) -> Iterator:
        """
        Context manager for one optimiser step that calls the loss several times (an
        L-BFGS closure, gradient accumulation): every call inside uses the schedules at
        the same :attr:`step`, and :attr:`step` advances by exactly one when the block
        exits normally (not when it raises). Nested blocks count once (the outermost).

        Example::

            optimizer = torch.optim.LBFGS(params)

            def closure():
                optimizer.zero_grad()
                return loss_fn.loss_and_grads(model, guide, data)

            for _ in range(num_steps):
                with loss_fn.optimizer_step():
                    optimizer.step(closure)
        """
        self._step_held = getattr(self, "_step_held", 0) + 1
        try:
            yield self
        except BaseException:
            self._step_held -= 1
            raise
        self._step_held -= 1
        if not self._step_held:
            self.step += 1

    def current_beta(self, step: int | None = None) -> float:
        """
        β at ``step`` (default: the current step).

        :raises ValueError: if the schedule returns a negative or non-finite value.
        """
        step = self.step if step is None else step
        value = float(self._beta(step))
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"the beta schedule {self._beta!r} returned {value!r} at step {step}; β must be finite and >= 0"
            )
        return value

    def current_capacity(self, step: int | None = None) -> float | None:
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

    def decompose(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> ELBOTerms:
        """
        Evaluates the decomposition without gradients, without advancing the step count and
        without touching :attr:`last_terms`: one :meth:`loss` call (which records and counts
        no step), its terms returned. Classes whose ``loss`` does more override it.

        :returns: the terms, in nats.
        :rtype: ELBOTerms
        """
        last = self._last_record
        try:
            with torch.no_grad():
                self.loss(model, guide, *args, **kwargs)  # type: ignore[attr-defined]  # the Pyro ELBO's
            record = self._last_record
            assert record is not None  # loss always records
            return record.terms()
        finally:
            self._last_record = last

    @property
    def last_terms(self) -> ELBOTerms | None:
        """
        The :class:`~pyro_elbo_lab.ELBOTerms` of the last ``loss``, ``loss_and_grads`` or
        ``differentiable_loss`` call (``None`` before the first); one device sync on first access.
        """
        return None if self._last_record is None else self._last_record.terms()
