# SPDX-License-Identifier: Apache-2.0
"""
:class:`IWAE`: the importance-weighted (Rényi-α) bound with the doubly-reparameterised
gradient, recording the bound, the ELBO of the same particles and its decomposition.

Imports :mod:`pyro_elbo_lab.sites` (per-particle sums), :mod:`pyro_elbo_lab.terms` and
:mod:`.beta_state`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any, cast

import pyro.distributions as dist
import torch
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.infer import RenyiELBO
from pyro.infer.util import get_dependent_plate_dims, is_validation_enabled, torch_sum
from pyro.poutine import Trace
from pyro.poutine.runtime import Message
from pyro.util import warn_if_nan
from torch.distributions import Independent

from ..checks import check_int
from ..sites import log_prob_per_particle
from ..terms import TermsRecord, stack_columns
from .beta_state import BetaState, check_enumerated_sites

__all__ = ["IWAE"]

_GRADIENTS = ("dreg", "standard")
_NORMALS = (dist.Normal, torch.distributions.Normal)


class IWAE(BetaState, RenyiELBO):
    """
    The importance-weighted bound of order α (α = 0: IWAE, Burda et al. 2016; Rényi
    bound, Li & Turner 2016) with ``K = num_particles`` particles,

    .. math::

        \\mathcal{L}_{\\alpha,K} = \\frac{1}{1-\\alpha}
            \\log \\frac{1}{K} \\sum_{k=1}^K w_k^{1-\\alpha}, \\qquad
        w_k = \\frac{p(x, z_k)}{q(z_k)},\\; z_k \\sim q,

    taken per element of the plates that the particles' log-weights do not couple (as
    :class:`pyro.infer.RenyiELBO` does), in nats. Its value is ``RenyiELBO``'s for the same
    seed, and ``gradient="standard"`` gives ``RenyiELBO``'s gradient.

    ``gradient="dreg"`` (default) uses the doubly-reparameterised estimator for the
    guide's parameters φ (Tucker et al. 2019), generalised to α with normalised weights
    :math:`\\tilde w_k \\propto w_k^{1-\\alpha}`:

    .. math::

        \\nabla_\\phi \\mathcal{L} \\approx \\sum_k \\big(\\alpha \\tilde w_k
            + (1-\\alpha)\\tilde w_k^2\\big)
            \\frac{\\partial \\log w_k}{\\partial z_k} \\frac{\\partial z_k}{\\partial \\phi},

    with :math:`\\log q` evaluated at parameters held fixed (``stop_gradient``), which
    removes the score-function term whose variance grows with K (Rainforth et al. 2018).
    Model parameters get the standard gradient :math:`\\sum_k \\tilde w_k \\nabla_\\theta
    \\log p(x, z_k)`; a parameter used by both model and guide is treated as a guide
    parameter. DReG needs reparameterised guide sites whose distribution parameters are
    plain tensors (``Normal``, ``Independent``, ``TransformedDistribution`` with tensor
    transforms, ``Delta``, ...) and, to be unbiased, guide sites that do not depend on one
    another (a mean-field guide; for hierarchical guides the stop-gradient is per site,
    as in Tucker et al.'s implementation). Neural-network transforms (normalising flows)
    are refused under validation.

    :attr:`last_terms` records, per particle, each observed site's reconstruction and each
    latent site's Monte Carlo KL and entropy: its ``elbo`` is the ELBO of the same
    particles; its ``objective`` is the bound (the same value in every particle's column).
    :attr:`last_bound` and :attr:`last_elbo` hold both as floats.

    :param int num_particles: K >= 1.
    :param float alpha: the order α (α != 1; α = 0 is IWAE).
    :param str gradient: ``"dreg"`` or ``"standard"``.
    :param max_plate_nesting: as in :class:`~pyro.infer.RenyiELBO`.
    :param bool vectorize_particles: draw the K particles in one vectorised pass.
    :raises ValueError: for K < 1, α = 1 or an unknown ``gradient``.
    :raises NotImplementedError: at a call, for a non-reparameterised guide site.

    References

    [1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan
        Salakhutdinov (2016)

    [2] `Rényi Divergence Variational Inference`, Yingzhen Li, Richard E. Turner (2016)

    [3] `Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives`, George
        Tucker, Dieterich Lawson, Shixiang Gu, Chris J. Maddison (2019)

    [4] `Tighter Variational Bounds are Not Necessarily Better`, Tom Rainforth, Adam R.
        Kosiorek, Tuan Anh Le, Chris J. Maddison, Maximilian Igl, Frank Wood, Yee Whye Teh
        (2018)
    """

    def __init__(
        self,
        num_particles: int = 8,
        *,
        alpha: float = 0.0,
        gradient: str = "dreg",
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = True,
        strict_enumeration_warning: bool = True,
    ):
        check_int("num_particles", num_particles, 1, hint="K, the number of importance samples per bound")
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a number != 1, got alpha={alpha!r}") from None
        if not math.isfinite(alpha) or alpha == 1.0:
            raise ValueError(
                f"alpha must be a finite number != 1, got alpha={alpha!r}; alpha=1 is the ELBO: use BetaELBO"
            )
        if gradient not in _GRADIENTS:
            raise ValueError(f"gradient must be one of {_GRADIENTS}, got gradient={gradient!r}")
        self.gradient = gradient
        self._init_beta(1.0)
        self.last_bound: float | None = None
        super().__init__(
            alpha=alpha,
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
        )

    # -- entry points -----------------------------------------------------------------------

    @property
    def last_elbo(self) -> float | None:
        """
        The ELBO of the last call's particles, in nats (``None`` before the first call),
        read from :attr:`last_terms` on demand, so a training step that never reads it pays
        for no device synchronisation or Python work beyond the bound's.
        """
        return None if self._last_record is None else self._last_record.terms().elbo

    def loss(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
        """
        :returns: ``-bound`` in nats; records :attr:`last_terms`; no step is counted.
        :rtype: float
        """
        with torch.no_grad():
            bound, _ = self._run(model, guide, args, kwargs, need_grads=False)
        loss = -bound
        warn_if_nan(loss, "loss")  # type: ignore[call-overload]  # Pyro's stub: numbers.Number, not float
        return loss

    def loss_and_grads(self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
        """
        ``-bound`` in nats; accumulates the gradient estimate (``gradient=``) into the
        parameters' ``.grad``; counts one optimiser step
        (not inside :meth:`optimizer_step`; the rule: :class:`~pyro_elbo_lab.losses.beta_state.BetaState`).

        :rtype: float
        """
        bound, surrogates = self._run(model, guide, args, kwargs, need_grads=True)
        for i, (surrogate, params) in enumerate(surrogates):
            # accumulated into .grad by autograd itself, as Pyro's losses do
            torch.autograd.backward(-surrogate, inputs=params, retain_graph=i + 1 < len(surrogates))
        self._advance_step()
        loss = -bound
        warn_if_nan(loss, "loss")  # type: ignore[call-overload]  # Pyro's stub: numbers.Number, not float
        return loss

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        ``-bound`` as a tensor whose first derivative with respect to the parameters is the
        gradient estimate of :meth:`loss_and_grads` (not differentiable twice); counts one optimiser step
        (not inside :meth:`optimizer_step`; the rule: :class:`~pyro_elbo_lab.losses.beta_state.BetaState`).

        :rtype: torch.Tensor (scalar)
        """
        bound, surrogates = self._run(model, guide, args, kwargs, need_grads=True)
        record = self._last_record
        assert record is not None  # _run records the terms
        loss = record.values.new_tensor(-bound)  # on the model's device
        for i, (surrogate, params) in enumerate(surrogates):
            grads = torch.autograd.grad(surrogate, params, retain_graph=i + 1 < len(surrogates), allow_unused=True)
            for param, grad in zip(params, grads):
                if grad is not None:
                    loss = loss - ((param * grad).sum() - (param * grad).sum().detach())
        warn_if_nan(loss, "loss")
        self._advance_step()
        return loss

    # -- the work ---------------------------------------------------------------------------

    def _get_trace(self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict) -> tuple:
        if is_validation_enabled():  # a site enumerated in the model: name BetaTraceEnumELBO
            model, guide = check_enumerated_sites(model, guide)
        return super()._get_trace(model, guide, args, kwargs)

    def _run(
        self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict, need_grads: bool
    ) -> tuple[float, list[tuple[torch.Tensor, list[torch.Tensor]]]]:
        """
        One evaluation from one (vectorised) pass of guide and model: the bound (float, nats)
        and the surrogates to differentiate, each with the parameters it is for (the guide's
        for DReG, the model's for the standard gradient).
        """
        vectorized = self.vectorize_particles and self.num_particles > 1
        dreg = need_grads and self.gradient == "dreg"
        log_ws: list = []
        log_ws_stop: list = []
        columns = []
        model_params: dict[str, torch.Tensor] = {}
        guide_params: dict[str, torch.Tensor] = {}
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            # each site's log-density summed over the plates the particles' weights couple
            # (RenyiELBO's sums), reused by the record
            model_sums: dict[str, torch.Tensor] = {}
            guide_sums: dict[str, torch.Tensor] = {}
            lw: Any = 0.0
            for name, site in model_trace.nodes.items():
                if site["type"] == "sample":
                    lp = model_sums[name] = torch_sum(site["log_prob"], sum_dims)
                    lw = lw + lp
                elif site["type"] == "param":
                    model_params[name] = site["value"].unconstrained()
            lw_stop = lw
            for name, site in guide_trace.nodes.items():
                if site["type"] == "param":
                    guide_params[name] = site["value"].unconstrained()
                if site["type"] != "sample":
                    continue
                lq = guide_sums[name] = torch_sum(site["log_prob"], sum_dims)
                lw = lw - lq
                if need_grads:
                    if not site["fn"].has_rsample:
                        raise NotImplementedError(
                            f"IWAE needs reparameterised guide sites; guide site '{name}' "
                            f"({type(site['fn']).__name__}) is not. Use pyro.infer.RenyiELBO (score function) "
                            "or a reparameterisable (e.g. relaxed) distribution."
                        )
                    if dreg:
                        lw_stop = lw_stop - _stopped_sum(name, site, lq, sum_dims)
            log_ws.append(lw)
            log_ws_stop.append(lw_stop)
            with torch.no_grad():
                columns.append(self._record(model_trace, guide_trace, model_sums, guide_sums, vectorized))
        if vectorized:
            log_w, log_w_stop = log_ws[0], log_ws_stop[0]
        else:
            log_w, log_w_stop = torch.stack(log_ws), torch.stack(log_ws_stop)
        one_minus = 1.0 - self.alpha
        scaled = log_w if one_minus == 1.0 else one_minus * log_w  # IWAE (α = 0): no multiplication
        log_mean = torch.logsumexp(scaled, dim=0) - math.log(self.num_particles)
        bound_t = log_mean.sum() if one_minus == 1.0 else log_mean.sum() / one_minus
        bound = bound_t.item()

        names, values = columns[0] if len(columns) == 1 else stack_columns(columns)
        values = torch.cat([torch.full_like(values[:1], bound), values])
        self._last_record = TermsRecord(["objective"] + names, values, 1.0, None)
        self.last_bound = bound

        surrogates: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        if need_grads and torch.is_tensor(log_w) and log_w.requires_grad:
            weights = torch.softmax(scaled.detach(), dim=0)  # normalised over particles
            if self.gradient == "standard":
                params = {**model_params, **guide_params}
            else:
                params = {k: v for k, v in model_params.items() if k not in guide_params}
            if params:
                surrogates.append(((weights * log_w).sum(), list(params.values())))
            if self.gradient == "dreg" and guide_params:
                coefficient = weights**2 if self.alpha == 0.0 else self.alpha * weights + one_minus * weights**2
                surrogates.append(((coefficient * log_w_stop).sum(), list(guide_params.values())))
        return bound, surrogates

    def _record(
        self,
        model_trace: Trace,
        guide_trace: Trace,
        model_sums: dict[str, torch.Tensor],
        guide_sums: dict[str, torch.Tensor],
        vectorized: bool,
    ) -> tuple[list, torch.Tensor]:
        """
        Per-particle reconstruction, KL and entropy: names and values of shape ``(entries,
        particles)``. ``model_sums`` and ``guide_sums`` are the sites' sums over the coupled
        plates; where one is already one value per particle (no plate common to all sites)
        it is the per-particle sum and nothing is recomputed.
        """
        num, nesting = (self.num_particles, self.max_plate_nesting - 1) if vectorized else (None, 0)
        shape = (self.num_particles,) if vectorized else ()

        def total(site: Message, summed: torch.Tensor) -> torch.Tensor:
            if summed.shape == shape and (not vectorized or site["log_prob"].dim() == self.max_plate_nesting):
                return summed
            return log_prob_per_particle(site, num, nesting)

        names: list = []
        observed = []
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample" and site["is_observed"]:
                names.append(("reconstruction", name))
                observed.append(total(site, model_sums[name]))
        latent, log_q, log_p = [], [], []
        zero = None
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            latent.append(name)
            log_q.append(total(site, guide_sums[name]))
            model_site = model_trace.nodes.get(name)
            if model_site is not None and model_site["type"] == "sample":
                log_p.append(total(model_site, model_sums[name]))
            else:  # an auxiliary guide site: its KL is its log q
                if zero is None:
                    zero = torch.zeros_like(log_q[-1])
                log_p.append(zero)
        rows = [torch.stack(observed)] if observed else []
        if latent:
            q = torch.stack(log_q)
            rows += [q - torch.stack(log_p), -q]
            names += [("kl", n) for n in latent] + [("entropy", n) for n in latent]
        column = torch.cat(rows) if len(rows) > 1 else rows[0]
        return names, column if column.dim() == 2 else column.unsqueeze(-1)


def _detached(obj: Any, keep_log_density: bool = True, memo: dict[int, Any] | None = None) -> Any:
    """
    A shallow copy of a distribution (or transform) whose tensor attributes are detached, except,
    with ``keep_log_density``, a ``Delta``'s ``log_density``: in autoguides (AutoNormal,
    AutoContinuous) it is the Jacobian term -log|J(u)| of the sampled u, a function of the draw,
    not of the parameters, whose path derivative DReG needs. ``memo`` (id -> copy) keeps
    reference cycles (a transform and its ``_InverseTransform``) finite and shared.
    """
    if memo is None:
        memo = {}
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_detached(x, keep_log_density, memo) for x in obj)
    if isinstance(obj, (torch.distributions.Distribution, torch.distributions.Transform)):
        if isinstance(obj, torch.nn.Module):
            return obj  # parameters in modules: caught by the validation check
        if id(obj) in memo:
            return memo[id(obj)]
        new = memo[id(obj)] = copy.copy(obj)
        for key, value in vars(obj).items():
            if keep_log_density and key == "log_density" and isinstance(obj, dist.Delta):
                continue
            if torch.is_tensor(value) or isinstance(
                value, (list, tuple, torch.distributions.Distribution, torch.distributions.Transform)
            ):
                new.__dict__[key] = _detached(value, keep_log_density, memo)
        return new
    return obj


def _stopped_sum(name: str, site: Message, log_prob_sum: torch.Tensor, sum_dims: list[int]) -> torch.Tensor:
    """
    :func:`_log_prob_stopped` summed over ``sum_dims``, up to a constant: only its gradient
    in the draw is used (the DReG surrogate's value is never read). Two cases cost less:

    - a ``Delta`` site (an autoguide's transformed value) reuses ``log_prob_sum``, its own
      sum: its log-density at its own value is ``log_density`` plus a constant with no
      gradient, so holding ``v`` fixed changes neither value nor gradient;
    - a ``Normal`` site (or ``Independent`` of one: the autoguides' draws) is
      :math:`-\\tfrac12 ((z - \\bar\\mu) / \\bar\\sigma)^2`, four tensor operations instead
      of a copied distribution's ``log_prob`` (nine): the dropped
      :math:`-\\log\\bar\\sigma - \\tfrac12\\log 2\\pi` has no gradient.
    """
    fn: Any = site["fn"]
    if type(fn) is dist.Delta:
        return log_prob_sum
    reinterpreted = 0
    while isinstance(fn, Independent):
        reinterpreted += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if type(fn) in _NORMALS:
        value = cast(torch.Tensor, site["value"])
        eps = (value - fn.loc.detach()) / fn.scale.detach()
        half_square = sum_rightmost(-0.5 * eps * eps, reinterpreted)
        return torch_sum(scale_and_mask(half_square, site["scale"], site["mask"]), sum_dims)
    return torch_sum(_log_prob_stopped(name, site), sum_dims)


def _log_prob_stopped(name: str, site: Message) -> torch.Tensor:
    """
    ``log q(z)`` at the sampled ``z`` (gradient kept) with the distribution's parameters
    detached; scaled and masked.
    """
    fn = _detached(site["fn"])
    if is_validation_enabled():
        held = _detached(site["fn"], keep_log_density=False)  # Delta's Jacobian too: nothing may need grad
        value = cast(torch.Tensor, site["value"])
        if held.log_prob(value.detach()).requires_grad:
            raise NotImplementedError(
                f"gradient='dreg' cannot hold the parameters of guide site '{name}' ({type(site['fn']).__name__}) "
                "fixed: they live in a torch.nn.Module (e.g. a normalising flow). Use gradient='standard'."
            )
    return scale_and_mask(fn.log_prob(site["value"]), site["scale"], site["mask"])
