# SPDX-License-Identifier: Apache-2.0
"""
The β-weighted, free-bits and capacity objectives, computed from the traces a loss step
already has, together with the ELBO's decomposition.

This module holds the machinery shared by :class:`~pyro_elbo_lab.BetaELBO` (Monte Carlo
KL) and :class:`~pyro_elbo_lab.BetaMeanFieldELBO` (analytic KL where registered). The two
differ only in the KL estimator: the hooks of :class:`~.particle_sums.ParticleSums`
(``_latent_site_terms`` per site, or ``_latent_terms`` for all sites at once) and
:attr:`WeightedObjective.analytic_kl` for free bits. Every per-site quantity comes from
:mod:`pyro_elbo_lab.sites`; the common linear case (β weighting, reparameterised guide sites,
Monte Carlo KL) runs as a few vector operations in :mod:`.linear`, and the score-function term of
guide sites that are not reparameterised is built in :mod:`.score_function`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from pyro.util import warn_if_nan

from .. import sites
from ..schedules import ScheduleLike
from ..terms import ELBOTerms, TermsRecord, merge_records
from .attribution import Attribution, Entry, attribute, sample_sites
from .beta_state import BetaState, check_enumerated_sites, site_selected
from .linear import entry_label, linear_particle
from .particle_sums import ParticleSums
from .score_function import downstream_cost, not_reparameterised_error, score_function_surrogate
from .weighting import check_auxiliary, check_particles, check_selected_sites, check_weighting, schedule_value

__all__ = ["WeightedObjective"]


class WeightedObjective(ParticleSums, BetaState):
    """
    Mixin that turns a Pyro trace ELBO into the objective

    .. math::

        \\mathcal{L}_\\beta = \\mathbb{E}_q[\\log p(x \\mid z)]
            - \\sum_{s \\notin S} \\mathrm{KL}_s - \\beta \\sum_{s \\in S} \\mathrm{KL}_s,

    (or the free-bits / capacity variants on the sites ``S``), and records the ELBO's
    decomposition on every call. Subclasses implement the estimator hooks of
    :class:`~.particle_sums.ParticleSums` and set :attr:`analytic_kl`. Pyro's hook
    :meth:`_differentiable_loss_particle` computes the same weighted objective.

    Not part of the public API: use :class:`~pyro_elbo_lab.BetaELBO` or
    :class:`~pyro_elbo_lab.BetaMeanFieldELBO`.
    """

    #: whether the KL per latent dimension (free bits) is analytic where registered
    analytic_kl: bool = False
    # set by Pyro's ELBO.__init__ (the class this mixin is combined with; see ParticleSums)
    retain_graph: bool | None

    # -- construction -------------------------------------------------------------------

    def __init__(
        self,
        beta: ScheduleLike = 1.0,
        *,
        sites: Iterable[str] | None = None,
        free_bits: float | None = None,
        capacity: ScheduleLike | None = None,
        gamma: float = 1000.0,
        **kwargs: Any,
    ) -> None:
        # validate and store our hyper-parameters, then Pyro's (as pyro.infer.RenyiELBO)
        self._init_objective(beta, sites, free_bits, capacity, gamma)
        check_particles(kwargs)
        super().__init__(**kwargs)

    def _init_objective(
        self,
        beta: ScheduleLike,
        sites: Iterable[str] | None,
        free_bits: float | None,
        capacity: ScheduleLike | None,
        gamma: float,
    ) -> None:
        (self._beta, self.sites, self.free_bits, self.gamma, self.capacity) = check_weighting(
            beta, sites, free_bits, capacity, gamma
        )
        self._init_step()
        self._weight_cache: dict = {}

    # -- hyper-parameters in force --------------------------------------------------------

    @property
    def beta(self) -> Callable[[int], float]:
        """The β schedule (a :class:`~pyro_elbo_lab.schedules.Constant` for a fixed β)."""
        return self._beta

    def current_capacity(self, step: int | None = None) -> float | None:
        """The capacity C(t) in nats at ``step``, or ``None`` without a capacity term."""
        if self.capacity is None:
            return None
        return schedule_value(self.capacity, self.step if step is None else step, "capacity")

    # -- the three entry points ---------------------------------------------------------------

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        :returns: an estimate of the negative objective, ``-objective`` in nats (the
            negative ELBO for β = 1), averaged over ``num_particles``.
        :rtype: float

        Records :attr:`last_terms`; does not advance the step count.
        """
        with torch.no_grad():
            loss, _ = self._run(model, guide, args, kwargs, mode="value")
        value = float(loss.item())
        warn_if_nan(value, "loss")  # type: ignore[call-overload]  # Pyro's stub: numbers.Number, not float
        return value

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """
        The loss as a tensor whose value is ``-objective`` and whose gradient is the
        gradient estimator of ``-objective`` (pathwise for reparameterised sites, score
        function with Pyro's plate-wise Rao-Blackwellisation otherwise). For plain PyTorch
        training loops; counts one gradient step.

        :rtype: torch.Tensor (scalar)
        """
        loss, surrogate = self._run(model, guide, args, kwargs, mode="differentiable")
        self._advance_step()
        warn_if_nan(loss, "loss")  # as Pyro's Trace_ELBO.differentiable_loss
        if not torch.is_tensor(surrogate):
            return loss
        return loss + (surrogate - surrogate.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        Computes ``-objective`` and accumulates its gradient estimate into the parameters'
        ``.grad`` (what :class:`pyro.infer.SVI` calls); counts one optimiser step, except
        inside :meth:`optimizer_step` (see
        :class:`~pyro_elbo_lab.losses.beta_state.BetaState` for the rule).

        :returns: ``-objective`` in nats.
        :rtype: float
        """
        loss, _ = self._run(model, guide, args, kwargs, mode="backward")
        self._advance_step()
        value = float(loss.item())
        warn_if_nan(value, "loss")  # type: ignore[call-overload]  # Pyro's stub: numbers.Number, not float
        return value

    def decompose(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> ELBOTerms:
        """
        Evaluates the decomposition without gradients, without advancing the step count
        and without touching :attr:`last_terms`.

        :returns: the terms, in nats.
        :rtype: ELBOTerms
        """
        last = self._last_record
        try:
            with torch.no_grad():
                self._run(model, guide, args, kwargs, mode="value")
            record = self._last_record
            assert record is not None  # _run always records
            return record.terms()
        finally:
            self._last_record = last

    def _differentiable_loss_particle(
        self, model_trace: Trace, guide_trace: Trace
    ) -> tuple[float | torch.Tensor, torch.Tensor]:
        """
        Pyro's extension hook (:class:`pyro.infer.Trace_ELBO`,
        :class:`pyro.infer.TraceMeanField_ELBO`): the weighted objective of one particle
        (or of the vectorised particle plate, summed), with β, free bits and capacity at
        the loss's current step, so that a class built on the hook (as Pyro's
        ``JitTraceMeanField_ELBO`` is) keeps the weighting. Records nothing and does not
        advance the step count.

        :returns: ``(loss, surrogate_loss)``: ``-objective`` as a float (a detached
            tensor while tracing) and a tensor of the same value whose gradient estimates
            that of ``-objective``.
        :rtype: tuple
        """
        objective, surrogate, _, _ = self._particle(
            model_trace, guide_trace, self.current_beta(), self.current_capacity()
        )
        total = objective.sum()
        if isinstance(surrogate, torch.Tensor) and surrogate.requires_grad:
            total_surrogate = surrogate.sum()
            total = total + (total_surrogate - total_surrogate.detach())
        loss = -total
        value = loss.detach() if torch._C._get_tracing_state() else loss.item()
        return value, loss

    # -- the work -----------------------------------------------------------------------------

    def _get_trace(self, model, guide, args, kwargs):
        if is_validation_enabled():  # a site enumerated in the model: name BetaTraceEnumELBO (before Pyro warns)
            model, guide = check_enumerated_sites(model, guide)
        return super()._get_trace(model, guide, args, kwargs)

    def _run(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, mode: str
    ) -> tuple[torch.Tensor, torch.Tensor | float]:
        beta = self.current_beta()
        capacity = self.current_capacity()
        loss: torch.Tensor | None = None
        surrogate: torch.Tensor | float = 0.0
        records: list = []
        names: list | None = None
        scale = -1.0 / self.num_particles
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            objective_p, surrogate_p, names_p, record_p = self._particle(model_trace, guide_trace, beta, capacity)
            if objective_p.dim():
                objective_p = objective_p.sum()
            loss_p = -objective_p if scale == -1.0 else scale * objective_p
            loss = loss_p if loss is None else loss + loss_p
            if mode != "value" and torch.is_tensor(surrogate_p) and surrogate_p.requires_grad:
                if surrogate_p.dim():
                    surrogate_p = surrogate_p.sum()
                surrogate_p = -surrogate_p if scale == -1.0 else scale * surrogate_p
                if mode == "backward":
                    trainable = any(
                        site["type"] == "param" for trace in (model_trace, guide_trace) for site in trace.nodes.values()
                    )
                    if trainable:
                        surrogate_p.backward(retain_graph=self.retain_graph)
                else:
                    surrogate = surrogate + surrogate_p
            if names is None:
                names = names_p
            elif names_p != names:  # dynamic structure across sequential particles
                names, records = merge_records(names, records, names_p, record_p)
                continue
            records.append(record_p)
        values = records[0] if len(records) == 1 else torch.stack(records, -1)
        if values.dim() == 1:
            values = values.unsqueeze(-1)
        assert loss is not None and names is not None  # at least one particle
        self._last_record = TermsRecord(names, values, beta, capacity)
        return loss, surrogate

    def _entry_weight(self, entry: Entry) -> bool:
        """Whether ``sites`` selects an entry: by its name, one of its model sites or auxiliary sites."""
        if self.sites is None:
            return True
        return any(site_selected(self.sites, n) for n in entry.names)

    def __getstate__(self) -> dict:
        # copies and pickles leave out the guide of the last call and the caches (rebuilt at
        # the next call): a loss must not carry a guide (or its closures) along, and the
        # compiled functions of a compiled loss (ScriptFunctions cannot be pickled or copied)
        state = self.__dict__.copy()
        for name in ("_traced_guide", "_attributions", "_linear_cache"):
            state.pop(name, None)
        if "_compiled" in state:
            state["_compiled"] = {}
        return state

    def _get_traces(self, model, guide, args, kwargs):
        # the guide object, for the layout of its auxiliary sites (attribution.attribute)
        self._traced_guide = guide
        return super()._get_traces(model, guide, args, kwargs)  # type: ignore[misc]

    def _attribution(self, model_trace: Trace, guide_trace: Trace, latent: list) -> Attribution:
        """Which model sites the auxiliary guide sites stand for, computed once per guide and set of sites."""
        guide = self.__dict__.get("_traced_guide")
        guide_key: object = guide
        try:
            hash(guide)
        except TypeError:
            guide_key = id(guide)
        key = (guide_key, tuple(model_trace.nodes), tuple(guide_trace.nodes))
        cache = self.__dict__.setdefault("_attributions", {})
        plan = cache.get(key)
        if plan is None:
            plan = attribute(guide, model_trace, guide_trace, latent)
            if len(cache) >= 256:  # bounded, as _check_sites_per_call
                cache.clear()
            cache[key] = plan
        return plan

    def _check_sites(self, model_trace: Trace, guide_trace: Trace, latent: list) -> None:
        """``sites`` names latent sites, and auxiliary guide sites allow the weighting."""
        check_selected_sites(model_trace, guide_trace, self.sites)
        check_auxiliary(
            model_trace,
            guide_trace,
            self._attribution(model_trace, guide_trace, latent),
            self.sites,
            free_bits=self.free_bits is not None,
            capacity=self.capacity is not None,
        )

    def _particle(
        self, model_trace: Trace, guide_trace: Trace, beta: float, capacity: float | None
    ) -> tuple[torch.Tensor, torch.Tensor | float, list, torch.Tensor]:
        """
        One particle (or the whole vectorised particle plate): returns the objective per
        particle (detached), the surrogate objective per particle (differentiable; the
        linear path with vectorised particles returns its sum over particles, shape ``()``:
        callers sum it), the record names and the record tensor of shape ``(num_entries,)`` or
        ``(num_entries, num_particles)``.

        The per-site sums are stacked once and weighted with one vector operation, so the
        cost of the objective and of its recording barely grows with the number of sites.
        """
        nonlinear = self.free_bits is not None or capacity is not None

        # one walk of each trace: latent model sites, then auxiliary guide sites (the rows attribute() reads)
        observed, latent = sample_sites(model_trace, guide_trace)
        obs_names: list = [name for name, _ in observed]
        self._check_sites_per_call(model_trace, guide_trace, self._check_sites, latent)
        if not observed and not latent:  # an empty model: loss 0, as Pyro's Trace_ELBO
            zero = torch.zeros(()) if self._particle_plate() is None else torch.zeros(self.num_particles)
            return zero, 0.0, ["objective"], zero.unsqueeze(0)

        if latent and not nonlinear and not self.analytic_kl:
            fast = linear_particle(
                beta,
                obs_names,
                [model_site for _, model_site in observed],
                latent,
                stack_log_probs=self._stack_log_prob_per_particle,
                attribution=lambda: self._attribution(model_trace, guide_trace, latent),
                entry_weight=self._entry_weight,
                cache=self.__dict__.setdefault("_linear_cache", {}),
            )
            if fast is not None:
                return fast
        obs_lp: list = [self._log_prob_per_particle(model_site) for _, model_site in observed]
        names: list = ["objective"] + [("reconstruction", n) for n in obs_names]
        pieces: list = []
        surrogate: torch.Tensor | float = 0.0
        objective: torch.Tensor | float = 0.0
        if obs_lp:
            recon_sites = torch.stack(obs_lp)
            recon = recon_sites.sum(0)
            surrogate = recon
            objective = recon.detach()
            pieces.append(recon_sites.detach())

        score_sites: list = []
        nonlinear_sites: set = set()
        selected_sites: set = set()
        nonlinear_cost: torch.Tensor | float = 0.0
        if latent:
            kl_surrogate, kl, entropy = self._latent_terms(latent)
            plan = self._attribution(model_trace, guide_trace, latent)
            entries = plan.entries
            aux_surrogate = None
            if not plan.trivial:
                # the auxiliary sites' log q moved onto the model sites they stand for
                moved, aux_surrogate = plan.apply(
                    latent,
                    torch.stack([kl_surrogate, kl, entropy]),
                    self._per_particle,
                    auxiliary=self.free_bits is not None,
                )
                kl_surrogate, kl, entropy = moved[0], moved[1].detach(), moved[2].detach()
            names += [("kl",) + entry_label(e) for e in entries] + [("entropy",) + entry_label(e) for e in entries]
            pieces += [kl, entropy]
            # linear entries are weighted by beta (selected) or 1; non-linear ones are handled below
            selected_kl: torch.Tensor | None = None
            selected_size: torch.Tensor | None = None
            linear = []
            weighted = []
            for index, entry in enumerate(entries):
                members = [latent[r] for r in entry.rows]
                is_weighted = self._entry_weight(entry)
                if is_weighted:
                    selected_sites.update(entry.sites)
                if is_weighted and nonlinear and entry.kind != "auxiliary":
                    size = None
                    for name, model_site, guide_site in members:
                        if not is_identically_zero(guide_site["score_parts"].score_function):
                            raise not_reparameterised_error(name, guide_site)
                        if model_site is not None:
                            n = self._per_particle(
                                sites.count(guide_site, mask=sites.element_mask(model_site, guide_site))
                            )
                            size = n if size is None else torch.maximum(size, n)
                    nonlinear_sites.update(entry.sites)
                    assert size is not None  # a site or group entry has a model site
                    if self.free_bits is not None:  # one model site (weighting.check_auxiliary)
                        _, model_site, guide_site = members[0]
                        assert model_site is not None  # rows list model sites before auxiliary ones
                        per_dim = self._per_particle(
                            sites.kl(model_site, guide_site, per_dim=True, analytic=self.analytic_kl)[0], event_dims=1
                        )
                        if aux_surrogate is not None and entry.auxiliary:  # one latent dimension
                            per_dim = per_dim + aux_surrogate[index].unsqueeze(-1)
                        fb = torch.maximum(per_dim, (self.free_bits * size).unsqueeze(-1)).sum(-1)
                        nonlinear_cost = nonlinear_cost - beta * fb.detach()
                        surrogate = surrogate - beta * fb
                    else:
                        kl_s = kl_surrogate[index]
                        selected_kl = kl_s if selected_kl is None else selected_kl + kl_s
                        selected_size = size if selected_size is None else torch.maximum(selected_size, size)
                    continue
                linear.append(index)
                weighted.append(is_weighted)
                for _, _, guide_site in members:
                    sf = guide_site["score_parts"].score_function
                    if not is_identically_zero(sf):
                        score_sites.append((guide_site, sf))
            if selected_kl is not None and selected_size is not None and capacity is not None:
                cap = torch.abs(selected_kl - capacity * selected_size)
                nonlinear_cost = -self.gamma * cap.detach()
                surrogate = surrogate - self.gamma * cap
            if linear:
                if len(linear) < len(entries):
                    kl_surrogate, kl = kl_surrogate[linear], kl[linear]
                # pathwise gradient; for non-reparameterised sites kl_surrogate = -log p(z),
                # which carries the model-parameter gradient, and the guide gradient comes
                # from the score-function term below
                if all(weighted):
                    kl_surrogate_sum, kl_sum = kl_surrogate.sum(0), kl.sum(0)
                    if torch.is_tensor(beta) or beta != 1.0:
                        kl_surrogate_sum, kl_sum = beta * kl_surrogate_sum, beta * kl_sum
                else:
                    w = self._weights(tuple(weighted), beta, kl)
                    kl_surrogate_sum, kl_sum = (w * kl_surrogate).sum(0), (w * kl).sum(0)
                surrogate = surrogate - kl_surrogate_sum
                objective = objective - kl_sum
            if torch.is_tensor(nonlinear_cost):
                objective = objective + nonlinear_cost

        if score_sites:
            # Score-function term with Pyro's plate-wise Rao-Blackwellised downstream cost; a
            # free-bits / capacity cost enters every site's downstream cost whole (.score_function).
            log_r = downstream_cost(model_trace, guide_trace, beta, selected_sites, exclude=nonlinear_sites)
            surrogate = score_function_surrogate(
                surrogate,
                score_sites,
                log_r,
                self._per_particle,
                extra=nonlinear_cost if torch.is_tensor(nonlinear_cost) else None,
                max_plate_nesting=self.max_plate_nesting,
            )

        if not isinstance(objective, torch.Tensor):
            objective = torch.zeros_like(pieces[0][0]) + objective
        # Only the objective and the per-site terms are recorded; the totals, cross-entropies
        # and standard errors are derived when ``last_terms`` is first read (TermsRecord).
        record = torch.cat([objective.detach().unsqueeze(0)] + pieces)
        return objective, surrogate, names, record

    def _weights(self, weighted: tuple, beta: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-site weights (beta for selected sites, 1 otherwise), shaped to broadcast."""
        key = (weighted, like.dtype, like.device, like.dim())
        mask = self._weight_cache.get(key)
        if mask is None:
            mask = torch.tensor(weighted, dtype=like.dtype, device=like.device)
            mask = mask.reshape((-1,) + (1,) * (like.dim() - 1))
            self._weight_cache[key] = mask
        return 1.0 + (beta - 1.0) * mask
