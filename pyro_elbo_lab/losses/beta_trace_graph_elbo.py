# SPDX-License-Identifier: Apache-2.0
"""
:class:`BetaTraceGraphELBO`: the β-weighted ELBO with Pyro's Rao–Blackwellised
score-function estimator and baselines (:class:`~pyro.infer.TraceGraph_ELBO`), recording
its decomposition.

Imports :mod:`pyro_elbo_lab.sites` (per-particle sums), :mod:`pyro_elbo_lab.terms` and
:mod:`.beta_state`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceGraph_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace
from pyro.util import warn_if_nan

from ..schedules import ScheduleLike
from ..sites import log_prob_per_particle, sum_per_particle
from ..terms import TermsRecord, stack_columns
from .beta_state import BetaState, check_enumerated_sites, check_selection_matches, site_selected

__all__ = ["BetaTraceGraphELBO"]


class _BetaScale(Messenger):
    """
    Multiplies the ``scale`` of the selected latent sample sites by β and remembers each
    site's unweighted scale (for the recorded decomposition).
    """

    def __init__(self, beta: float, selected: Callable[[str], bool]) -> None:
        super().__init__()
        self.beta = beta
        self.selected = selected
        self.unweighted: dict = {}

    def _pyro_sample(self, msg):
        if msg["is_observed"] or not self.selected(msg["name"]):
            return
        self.unweighted[msg["name"]] = msg["scale"]
        msg["scale"] = self.beta * msg["scale"]


class BetaTraceGraphELBO(BetaState, TraceGraph_ELBO):
    """
    A drop-in replacement for :class:`pyro.infer.TraceGraph_ELBO` that maximises

    .. math::

        \\mathcal{L}_\\beta = \\mathbb{E}_q[\\log p(x \\mid z)]
            - \\beta \\sum_{s \\in S} \\mathbb{E}_q[\\log q(z_s) - \\log p(z_s \\mid \\mathrm{pa}(z_s))]
            - \\sum_{s \\notin S} \\mathbb{E}_q[\\log q(z_s) - \\log p(z_s \\mid \\mathrm{pa}(z_s))]

    with Pyro's gradient estimator for non-reparameterised sites: the score function times
    the *downstream* cost (provenance tracking), minus a baseline (decaying average or a
    neural baseline, configured per guide site as in ``TraceGraph_ELBO``).

    β is applied as a site scale: each call wraps model and guide in a messenger that
    multiplies the ``scale`` of the selected latent sites by β (the KL-annealing pattern of
    Pyro's deep Markov model example). Pyro scales ``log_prob`` and the entropy term but not
    the score function, so the downstream cost a score-function site sees carries β on
    exactly the KL parts it reaches, and the estimator stays unbiased for
    :math:`\\nabla \\mathcal{L}_\\beta`. Baselines learn the β-weighted cost.

    With ``beta=1`` the loss and its gradients are those of ``TraceGraph_ELBO`` for the same
    seed. :attr:`last_terms` records, unweighted and per particle, the reconstruction of
    each observed site and the Monte Carlo KL (:math:`\\log q - \\log p`) and entropy
    (:math:`-\\log q`) of each latent site (auxiliary guide sites: KL = :math:`\\log q`).

    :param beta: β >= 0, or a schedule ``step -> β`` (:mod:`pyro_elbo_lab.schedules`).
    :param sites: the latent sites β weights: names, a glob pattern (``"z_*"``) or a callable
        ``name -> bool``, checked at every call against the sites present; all latent (and
        auxiliary guide) sites when None.
    :param free_bits: not supported (must be None).
    :param capacity: not supported (must be None).
    :param kwargs: :class:`~pyro.infer.TraceGraph_ELBO` arguments (``num_particles``,
        ``max_plate_nesting``, ``vectorize_particles``, ...).
    :raises ValueError: for negative or NaN β; at a call, for ``sites`` that are not latent
        sites.
    :raises NotImplementedError: for ``free_bits`` or ``capacity``.

    References

    [1] `Gradient Estimation Using Stochastic Computation Graphs`, John Schulman, Nicolas
        Heess, Theophane Weber, Pieter Abbeel (2015)

    [2] `Neural Variational Inference and Learning in Belief Networks`, Andriy Mnih, Karol
        Gregor (2014)

    [3] `beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework`,
        Irina Higgins, Loic Matthey, Arka Pal, Christopher Burgess, Xavier
        Glorot, Matthew Botvinick, Shakir Mohamed, Alexander Lerchner (2017)
    """

    def __init__(
        self,
        beta: ScheduleLike = 1.0,
        *,
        sites: Iterable[str] | str | Callable[[str], bool] | None = None,
        free_bits: float | None = None,
        capacity: ScheduleLike | None = None,
        **kwargs: Any,
    ) -> None:
        self._init_beta_only(
            beta,
            sites,
            free_bits,
            capacity,
            "free bits and capacity are non-linear in the KL and would have to enter every score-function site's "
            "downstream cost whole. Use BetaELBO, which does this for score-function sites left out of sites=.",
            kwargs,
        )
        self._call_beta = 1.0
        self._columns: list = []
        super().__init__(**kwargs)

    # -- entry points -----------------------------------------------------------------------

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        :returns: ``-objective`` in nats (the negative ELBO for β = 1), averaged over particles.
        :rtype: float

        Records :attr:`last_terms`; does not advance the step count.
        """
        self._begin()
        with torch.no_grad():
            loss = super().loss(model, guide, *args, **kwargs)
        self._finish()
        return loss

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        ``-objective`` in nats; accumulates the gradient estimate (and the baselines'
        gradients) into ``.grad`` (what :class:`pyro.infer.SVI` calls); counts one optimiser step
        (not inside :meth:`optimizer_step`; the rule: :class:`~pyro_elbo_lab.losses.beta_state.BetaState`).

        :rtype: float
        """
        self._begin()
        loss = super().loss_and_grads(model, guide, *args, **kwargs)
        self._finish()
        self._advance_step()
        return loss

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """
        ``-objective`` as a tensor whose gradient is the estimator of
        :meth:`loss_and_grads` (surrogate, baseline loss included); counts one optimiser step
        (not inside :meth:`optimizer_step`; the rule: :class:`~pyro_elbo_lab.losses.beta_state.BetaState`).
        """
        self._begin()
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        self._finish()
        self._advance_step()
        loss = -torch.as_tensor(elbo).detach()
        if torch.is_tensor(surrogate_loss) and surrogate_loss.requires_grad:
            loss = loss + (surrogate_loss - surrogate_loss.detach())
        warn_if_nan(loss, "loss")
        return loss

    # -- traces -----------------------------------------------------------------------------

    def _begin(self) -> None:
        self._call_beta = self.current_beta()
        self._columns = []

    def _finish(self) -> None:
        columns = self._columns
        names, values = columns[0] if len(columns) == 1 else stack_columns(columns)
        self._last_record = TermsRecord(names, values, self._call_beta, None)
        self._columns = []

    def _get_trace(self, model, guide, args, kwargs):
        if is_validation_enabled():
            model, guide = check_enumerated_sites(model, guide)
        beta = self._call_beta
        if beta == 1.0:  # nothing to weight: Pyro's traces as they are
            model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
            with torch._C.DisableTorchFunctionSubclass():  # plain tensor ops, no provenance tracking
                self._record(model_trace, guide_trace, {}, {})
            return model_trace, guide_trace
        model_scale = _BetaScale(beta, self._weighted)
        guide_scale = _BetaScale(beta, self._weighted)
        model_trace, guide_trace = super()._get_trace(model_scale(model), guide_scale(guide), args, kwargs)
        with torch._C.DisableTorchFunctionSubclass():  # plain tensor ops, no provenance tracking
            self._record(model_trace, guide_trace, model_scale.unweighted, guide_scale.unweighted)
        return model_trace, guide_trace

    def _weighted(self, name: str) -> bool:
        return site_selected(self.sites, name)

    def _record(self, model_trace: Trace, guide_trace: Trace, model_unweighted: dict, guide_unweighted: dict) -> None:
        """Unweighted per-site terms of one trace pair, per particle: columns of shape ``(num_entries, P)``."""
        self._check_sites_per_call(model_trace, guide_trace, self._check_sites)
        vectorized = self.vectorize_particles and self.num_particles > 1
        num, nesting = (self.num_particles, self.max_plate_nesting - 1) if vectorized else (None, 0)

        def weighted_total(site):
            return log_prob_per_particle(site, num, nesting)

        def total(site: Message, unweighted: dict) -> torch.Tensor:
            scale = unweighted.get(site["name"])
            if scale is None:
                return weighted_total(site)
            x = scale_and_mask(site["unscaled_log_prob"], scale, site["mask"])
            return sum_per_particle(x, num, nesting)

        recon_names, recon, lp_model, lp_guide = [], [], [], []
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            lp_model.append(weighted_total(site))
            if site["is_observed"]:
                recon_names.append(("reconstruction", name))
                recon.append(lp_model[-1])
        latent_names, lq, lp = [], [], []
        zero = None
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample":
                continue
            lp_guide.append(weighted_total(site))
            latent_names.append(name)
            lq.append(total(site, guide_unweighted))
            model_site = model_trace.nodes.get(name)
            if model_site is not None and model_site["type"] == "sample":
                lp.append(total(model_site, model_unweighted))
            else:
                zero = torch.zeros_like(lq[-1]) if zero is None else zero
                lp.append(zero)
        objective = torch.stack(lp_model).sum(0)
        if lp_guide:
            objective = objective - torch.stack(lp_guide).sum(0)
        rows = [objective.unsqueeze(0)]
        if recon:
            rows.append(torch.stack(recon))
        if lq:
            lq_t, lp_t = torch.stack(lq), torch.stack(lp)
            rows += [lq_t - lp_t, -lq_t]
        column = torch.cat(rows).detach()
        if column.dim() == 1:
            column = column.unsqueeze(-1)
        names = ["objective"] + recon_names + [("kl", n) for n in latent_names] + [("entropy", n) for n in latent_names]
        self._columns.append((names, column))

    def _check_sites(self, model_trace: Trace, guide_trace: Trace) -> None:
        if self.sites is None:
            return
        latent = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"]
        if not isinstance(self.sites, frozenset):
            check_selection_matches(self.sites, latent)
            return
        observed = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and s["is_observed"]]
        for name in sorted(self.sites):
            if name in latent:
                continue
            what = "an observed site of the model" if name in observed else "not a latent site"
            raise ValueError(
                f"sites names '{name}', {what}; β weights the KL of latent sites: {latent}. "
                "Fix the name, or pass sites=None to weight every latent site."
            )
