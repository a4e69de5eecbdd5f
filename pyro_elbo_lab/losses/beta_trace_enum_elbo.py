# SPDX-License-Identifier: Apache-2.0
"""
:class:`BetaTraceEnumELBO`: the β-weighted ELBO with discrete sites summed out exactly
(Pyro's :class:`~pyro.infer.TraceEnum_ELBO`), recording its decomposition.

Imports :mod:`pyro_elbo_lab.terms`, :mod:`pyro_elbo_lab.schedules`, :mod:`.beta_state`
and :mod:`.pyro_enum` (the one home of what it takes from Pyro's enumeration machinery below
the documented API).
"""

from __future__ import annotations

import queue
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from opt_einsum import shared_intermediates
from pyro import poutine
from pyro.infer import TraceEnum_ELBO
from pyro.infer.enum import iter_discrete_escape, iter_discrete_extend
from pyro.infer.util import Dice
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.rings import SampleRing
from pyro.poutine import Trace
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.util import warn_if_nan

from ..schedules import Constant, ScheduleLike
from ..terms import ELBOTerms, TermsRecord, stack_columns
from .beta_state import BetaState, check_selection_matches, site_selected
from .pyro_enum import check_enumeration_constraint, common_scale, dice_expectations, find_ordinal

__all__ = ["BetaTraceEnumELBO"]

_PARTICLE_PLATE = "num_particles_vectorized"  # the plate of pyro.infer.elbo.ELBO._vectorized_num_particles


class BetaTraceEnumELBO(BetaState, TraceEnum_ELBO):
    """
    A drop-in replacement for :class:`pyro.infer.TraceEnum_ELBO` that maximises

    .. math::

        \\mathcal{L}_\\beta = \\mathbb{E}_{q}\\Big[\\log \\sum_{z_e} p(x, z_e \\mid z)\\Big]
            - \\beta \\sum_{s \\in S} \\mathrm{KL}_s - \\sum_{s \\notin S} \\mathrm{KL}_s,
        \\qquad \\mathrm{KL}_s = \\mathbb{E}_q[\\log q(z_s) - \\log p(z_s \\mid \\mathrm{pa}(z_s))],

    where :math:`z_e` are the sites enumerated in the model (summed out exactly, as
    ``TraceEnum_ELBO`` does) and :math:`z` the guide's sites: sampled, or enumerated in the
    guide (then the expectation over them is exact). β multiplies the cost terms
    :math:`\\log p(z_s)` and :math:`-\\log q(z_s)` of the selected sites; DiCE weights
    (Foerster et al. 2018) use the unscaled score functions, so this equals putting
    ``poutine.scale(scale=β)`` on those sites in model and guide, and the score-function
    terms of sampled discrete sites carry β on the KL parts downstream of them.

    With ``beta=1`` the loss and its gradients are those of ``TraceEnum_ELBO`` for the
    same seed (up to float summation order).

    **Recorded decomposition** (:attr:`last_terms`, nats, unweighted):

    - ``reconstruction`` of an observed site that depends on no model-enumerated site:
      :math:`\\mathbb{E}_q[\\log p(x_s \\mid \\cdot)]`.
    - The *marginal* reconstruction: the factors that depend on model-enumerated sites (the
      enumerated sites' own priors, the observed sites below them, and any guide site whose
      model ``log_prob`` depends on them) are contracted into
      :math:`\\mathbb{E}_q[\\log \\sum_{z_e} \\prod \\text{factors}]` and reported as one
      ``reconstruction`` entry named after the observed sites of that group joined by
      ``"+"`` (e.g. ``"obs"``). Model-enumerated sites get no KL entry: they are summed
      out, not approximated.
    - ``kl`` and ``entropy`` of each guide site, sampled or guide-enumerated (exact
      expectations for the latter). A guide site whose model ``log_prob`` depends on a
      model-enumerated site has its :math:`\\log p` inside the marginal reconstruction, so
      its ``kl`` entry is :math:`\\mathbb{E}_q \\log q` only (like an auxiliary guide site).

    With ``vectorize_particles=True`` the per-particle values are kept (standard errors
    in :attr:`last_terms`); traces of sequential guide enumeration are summed per particle.

    :param beta: β >= 0, or a schedule ``step -> β`` (:mod:`pyro_elbo_lab.schedules`).
    :param sites: the guide sites whose KL β weights: names, a glob pattern (``"z_*"``) or a
        callable ``name -> bool``, checked at every call against the sites present; all
        guide sites when None.
    :param free_bits: not supported (must be None).
    :param capacity: not supported (must be None).
    :param kwargs: :class:`~pyro.infer.TraceEnum_ELBO` arguments (``num_particles``,
        ``max_plate_nesting``, ``vectorize_particles``, ``strict_enumeration_warning``...).
    :raises NotImplementedError: for ``free_bits`` or ``capacity``; at a call, for a
        selected site whose model ``log_prob`` depends on a model-enumerated site (its KL
        does not separate from the marginal likelihood).
    :raises ValueError: for negative or NaN β; at a call, for ``sites`` that are not guide
        sites (a model-enumerated site is named as such).

    Example::

        elbo = BetaTraceEnumELBO(beta=0.5, max_plate_nesting=1)
        svi = pyro.infer.SVI(model, config_enumerate(guide), pyro.optim.Adam({"lr": 0.01}), elbo)
        svi.step(data)
        print(elbo.last_terms)

    References

    [1] `Tensor Variable Elimination for Plated Factor Graphs`, Fritz Obermeyer, Eli
        Bingham, Martin Jankowiak, Justin Chiu, Neeraj Pradhan, Alexander Rush, Noah
        Goodman (2019)

    [2] `DiCE: The Infinitely Differentiable Monte-Carlo Estimator`, Jakob Foerster, Greg
        Farquhar, Maruan Al-Shedivat, Tim Rocktäschel, Eric P. Xing, Shimon Whiteson (2018)

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
            "free bits and capacity are non-linear in the KL, which DiCE's exact expectations over enumerated "
            "sites do not carry through. Use BetaELBO for free bits or capacity on a model without enumerated sites.",
            kwargs,
        )
        super().__init__(**kwargs)

    # -- traces ------------------------------------------------------------------------------

    def _particle_traces(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Iterator[tuple]:
        """``(particle index, model_trace, guide_trace)``, as ``TraceEnum_ELBO._get_traces``."""
        if isinstance(poutine.unwrap(guide), poutine.messenger.Messenger):
            raise NotImplementedError("BetaTraceEnumELBO does not support GuideMessenger")
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        if self.vectorize_particles:
            guide = self._vectorized_num_particles(guide)
            model = self._vectorized_num_particles(model)
        guide = EnumMessenger(first_available_dim=-1 - self.max_plate_nesting)(guide)
        model = EnumMessenger()(model)
        q: queue.LifoQueue = queue.LifoQueue()
        guide = poutine.queue(guide, q, escape_fn=iter_discrete_escape, extend_fn=iter_discrete_extend)
        for particle in range(1 if self.vectorize_particles else self.num_particles):
            q.put(poutine.Trace())
            while not q.empty():
                model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
                yield particle, model_trace, guide_trace

    def _get_traces(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> Iterator[tuple]:
        for _, model_trace, guide_trace in self._particle_traces(model, guide, args, kwargs):
            yield model_trace, guide_trace

    # -- the entry points -----------------------------------------------------------------------

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        :returns: ``-objective`` in nats (the negative ELBO for β = 1), averaged over particles.
        :rtype: float

        Records :attr:`last_terms`; does not advance the step count.
        """
        with torch.no_grad():
            loss, _ = self._run(model, guide, args, kwargs, "value")
        value = loss.item()
        warn_if_nan(value, "loss")
        return value

    def differentiable_loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """
        ``-objective`` as a differentiable tensor (its gradient is the DiCE estimator's);
        counts one optimiser step (not inside :meth:`optimizer_step`; the rule:
        :class:`~pyro_elbo_lab.losses.beta_state.BetaState`).

        :rtype: torch.Tensor (scalar)
        :raises ValueError: if the objective cannot be differentiated.
        """
        loss, surrogate = self._run(model, guide, args, kwargs, "differentiable")
        if not torch.is_tensor(surrogate) or not surrogate.requires_grad:
            raise ValueError(f"ELBO cannot be differentiated: {loss}")
        self._advance_step()
        warn_if_nan(loss, "loss")
        return loss + (surrogate - surrogate.detach())

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """
        ``-objective`` in nats; accumulates its gradient into the parameters' ``.grad``
        (what :class:`pyro.infer.SVI` calls); counts one optimiser step
        (not inside :meth:`optimizer_step`; the rule: :class:`~pyro_elbo_lab.losses.beta_state.BetaState`).

        :rtype: float
        """
        loss, _ = self._run(model, guide, args, kwargs, "backward")
        self._advance_step()
        value = loss.item()
        warn_if_nan(value, "loss")
        return value

    def decompose(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> ELBOTerms:
        """
        The decomposition, evaluated without gradients, without advancing the step count
        and without touching :attr:`last_terms`.

        :returns: the terms, in nats.
        :rtype: ELBOTerms
        """
        last = self._last_record
        try:
            with torch.no_grad():
                self._run(model, guide, args, kwargs, "value")
            assert self._last_record is not None
            return self._last_record.terms()
        finally:
            self._last_record = last

    def _run(self, model: Callable, guide: Callable, args: tuple, kwargs: dict, mode: str) -> tuple:
        """
        ``(loss, surrogate)``: the loss detached (0-dim) and, in ``"differentiable"`` mode,
        ``-objective`` as a differentiable tensor (else 0.0; in ``"backward"`` mode the
        gradients are accumulated trace by trace, as ``TraceEnum_ELBO.loss_and_grads``).
        Records :attr:`last_terms`.
        """
        beta = self.current_beta()
        loss, surrogate, names, values = self._evaluate(model, guide, args, kwargs, beta, mode == "backward")
        self._last_record = TermsRecord(names, values, beta, None)
        return loss, (surrogate if mode == "differentiable" else 0.0)

    def _evaluate(
        self, model: Callable, guide: Callable, args: tuple, kwargs: dict, beta: float | torch.Tensor, backward: bool
    ) -> tuple:
        """
        The whole step: ``(loss, surrogate, names, values)``, the loss detached (0-dim),
        ``-objective`` (differentiable unless ``backward``, when the gradient of each trace
        is accumulated at once and the surrogate is 0), the record's names and its values
        (terms × particles, detached). β may be a 0-dim tensor (the compiled loss).
        """
        objective: torch.Tensor | None = None
        columns: dict = {}  # particle -> {name: value}
        order: list = []
        seen: set = set()
        num_particles = self.num_particles
        for particle, model_trace, guide_trace in self._particle_traces(model, guide, args, kwargs):
            objective_p, names, record = self._particle(model_trace, guide_trace, beta)
            total = objective_p if objective_p.dim() == 0 and num_particles == 1 else objective_p.sum() / num_particles
            if backward:
                if total.requires_grad and _has_params(model_trace, guide_trace):
                    # retain_graph: sequentially enumerated traces share the graph upstream of
                    # the enumerated site (as TraceEnum_ELBO.loss_and_grads)
                    (-total).backward(retain_graph=True)
                total = total.detach()
            objective = total if objective is None else objective + total
            column = columns.setdefault(particle, {})
            for name, value in zip(names, record):
                column[name] = column[name] + value if name in column else value
                if name not in seen:
                    seen.add(name)
                    order.append(name)
        assert objective is not None
        loss = -objective.detach()
        surrogate = -objective if objective.requires_grad else loss
        return loss, surrogate, order, _record_values(order, list(columns.values()))

    # -- one trace -----------------------------------------------------------------------------

    def _particle(self, model_trace: Trace, guide_trace: Trace, beta: float | torch.Tensor) -> tuple:
        """
        The objective of one trace pair (differentiable; shape ``()`` or
        ``(num_particles,)`` when vectorised), the record names and the record values
        (detached, each of the objective's shape).
        """
        # the sites as plain dicts (their packed tensors carry Pyro's _pyro_dims)
        model_nodes: dict[str, Any] = model_trace.nodes
        guide_nodes: dict[str, Any] = guide_trace.nodes
        ordering = {
            name: find_ordinal(trace, site)
            for trace in (model_trace, guide_trace)
            for name, site in trace.nodes.items()
            if site["type"] == "sample"
        }
        enum_dims: set = set()
        non_enum_dims = set().union(*ordering.values())
        enumerated = []
        for name, site in model_nodes.items():
            if site["type"] != "sample":
                continue
            if name in guide_nodes:
                non_enum_dims.update(guide_nodes[name]["packed"]["log_prob"]._pyro_dims)
            elif site["infer"].get("_enumerate_dim") is not None:
                enumerated.append(name)
                enum_dims.update(site["packed"]["log_prob"]._pyro_dims)
        enum_dims -= non_enum_dims
        self._check_sites_per_call(model_trace, guide_trace, self._check_sites, enumerated)

        atoms: list = []  # (ordinal, cost)

        def atom(ordinal: frozenset, cost: torch.Tensor | float) -> int:
            atoms.append((ordinal, cost))
            return len(atoms) - 1

        # entries: (name, [(sign, atom index), ...], weight in the objective or None (not in it))
        entries: list = []
        log_factors: OrderedDict = OrderedDict()
        scales: list = []
        scale_names: list = []
        marginal_observed: list = []
        kl_sites: list = []
        for name, site in model_nodes.items():
            if site["type"] != "sample":
                continue
            in_guide = name in guide_nodes
            if not in_guide and site["infer"].get("_enumerate_dim") is not None:
                log_factors.setdefault(ordering[name], []).append(site["packed"]["unscaled_log_prob"])
                scales.append(site["scale"])
                scale_names.append(name)
                continue
            lp = site["packed"]["log_prob"]
            if enum_dims.isdisjoint(lp._pyro_dims):
                if site["is_observed"]:
                    entries.append((("reconstruction", name), [(1.0, atom(ordering[name], lp))], 1.0))
                else:
                    kl_sites.append((name, atom(ordering[name], lp)))
                continue
            # depends on a model-enumerated site: mask inside, scale outside the log-sum-exp
            if not site["is_observed"] and self._weighted(name) and self.sites is not None:
                raise NotImplementedError(
                    f"sites names '{name}', whose model log_prob depends on the model-enumerated site(s) "
                    f"{enumerated}: its KL does not separate from the marginal likelihood, so β cannot weight it. "
                    "Enumerate it away, or leave it out of sites=."
                )
            if not site["is_observed"] and self.sites is None and not self._beta_is_one(beta):
                compiled = isinstance(beta, torch.Tensor)
                raise NotImplementedError(
                    f"β weights every guide site (sites=None), but the model log_prob of '{name}' depends on the "
                    f"model-enumerated site(s) {enumerated}: its KL does not separate from the marginal likelihood. "
                    "Pass sites= naming the other guide sites, or "
                    + (
                        f"a constant beta=1.0: {type(self).__name__} compiles β as an input, so it accepts this "
                        f"model with sites=None only when β is the constant 1, not a schedule "
                        f"({self._beta!r}), even one whose value is 1."
                        if compiled
                        else "beta=1.0 (the ELBO itself)."
                    )
                )
            masked = packed.scale_and_mask(site["packed"]["unscaled_log_prob"], mask=site["packed"]["mask"])
            log_factors.setdefault(ordering[name], []).append(masked)
            scales.append(site["scale"])
            scale_names.append(name)
            if site["is_observed"]:
                marginal_observed.append(name)
            else:
                kl_sites.append((name, None))
        if log_factors:
            if enumerated:
                check_enumeration_constraint([ordering[n] for n in enumerated], guide_trace)
            scale = common_scale(scales, scale_names)
            dim_to_size: dict = {}
            for terms in log_factors.values():
                for term in terms:
                    dim_to_size.update(zip(term._pyro_dims, term.shape))
            with shared_intermediates() as cache:
                ring = SampleRing(cache=cache, dim_to_size=dim_to_size)
                contracted = contract_tensor_tree(log_factors, enum_dims, ring=ring)
            group = [
                atom(t, packed.scale_and_mask(term, scale=scale)) for t, terms in contracted.items() for term in terms
            ]
            key = "+".join(marginal_observed or enumerated)
            entries.append((("reconstruction", key), [(1.0, i) for i in group], 1.0))

        guide_atoms = {
            name: atom(ordering[name], site["packed"]["log_prob"])
            for name, site in guide_nodes.items()
            if site["type"] == "sample"
        }
        model_lp = dict(kl_sites)
        latent_names = [n for n, _ in kl_sites if n in guide_atoms]
        latent_names += [n for n in guide_atoms if n not in model_lp]  # auxiliary guide sites
        latent_names += [n for n, _ in kl_sites if n not in guide_atoms]  # sampled from the prior
        kl_entries, entropy_entries = [], []
        for name in latent_names:
            parts = []
            if name in guide_atoms:
                parts.append((1.0, guide_atoms[name]))
            if model_lp.get(name) is not None:
                parts.append((-1.0, model_lp[name]))
            weight = beta if self._weighted(name) and (name in guide_atoms) else 1.0
            kl_entries.append((("kl", name), parts, -weight))
            entropy_entries.append(
                (("entropy", name), [(-1.0, guide_atoms[name])] if name in guide_atoms else [], None)
            )
        entries += kl_entries + entropy_entries

        particles = self.num_particles if self.vectorize_particles else 1
        particle_symbol = guide_trace.plate_to_symbol.get(_PARTICLE_PLATE) if particles > 1 else None
        expected = dice_expectations(Dice(guide_trace, ordering), atoms, particle_symbol, particles)

        objective: torch.Tensor | None = None
        names: list = ["objective"]
        values: list = []
        for name, parts, weight in entries:
            value = _signed_sum(parts, expected) if parts else torch.zeros_like(expected[0])
            if weight is None:  # recorded only
                pass
            elif not isinstance(weight, float):  # a tensor β (compiled step)
                objective = weight * value if objective is None else objective + weight * value
            elif weight == 1.0:
                objective = value if objective is None else objective + value
            elif weight == -1.0:
                objective = -value if objective is None else objective - value
            else:
                objective = weight * value if objective is None else objective + weight * value
            names.append(name)
            values.append(value.detach())
        if objective is None:
            objective = torch.zeros_like(expected[0])
        values.insert(0, objective.detach())
        return objective, names, values

    def _weighted(self, name: str) -> bool:
        return site_selected(self.sites, name)

    def _beta_is_one(self, beta: float | torch.Tensor) -> bool:
        """Whether β is 1 (for a tensor β, an input of a compiled step: whether the schedule is constant 1)."""
        if isinstance(beta, torch.Tensor):
            return isinstance(self._beta, Constant) and self._beta.value == 1.0
        return beta == 1.0

    def _check_sites(self, model_trace: Trace, guide_trace: Trace, enumerated: list) -> None:
        if self.sites is None:
            return
        guide_sites = [n for n, s in guide_trace.nodes.items() if s["type"] == "sample"]
        if not isinstance(self.sites, frozenset):
            check_selection_matches(self.sites, guide_sites)
            return
        for name in sorted(self.sites):
            if name in guide_sites:
                continue
            if name in enumerated:
                raise ValueError(
                    f"sites names '{name}', a site enumerated in the model: it is summed out exactly and has no KL. "
                    f"Drop it from sites=, or enumerate it in the guide. Guide sites: {guide_sites}"
                )
            raise ValueError(
                f"sites names '{name}', which is not a site of the guide. β weights the KL of guide sites: "
                f"{guide_sites}. Fix the name, or pass sites=None to weight every guide site."
            )


def _signed_sum(parts: list, expected: list) -> torch.Tensor:
    """``sum(sign * expected[i] for sign, i in parts)`` for signs ±1, without multiplications."""
    (sign, i), *rest = parts
    value = expected[i] if sign == 1.0 else -expected[i]
    for sign, i in rest:
        value = value + expected[i] if sign == 1.0 else value - expected[i]
    return value


def _has_params(model_trace: Trace, guide_trace: Trace) -> bool:
    return any(site["type"] == "param" for trace in (model_trace, guide_trace) for site in trace.nodes.values())


def _record_values(order: list, columns: list) -> torch.Tensor:
    """
    The record's values, shape ``(len(order), particles)``, from one ``{name: value}`` dict
    per particle (zeros where a particle lacks a name).
    """
    if len(columns) == 1:
        (column,) = columns
        values = torch.stack([column[n] for n in order])
        return values if values.dim() == 2 else values.unsqueeze(-1)
    names, values = stack_columns([(list(column), torch.stack(list(column.values()))) for column in columns])
    if names != order:
        rank = {n: i for i, n in enumerate(names)}
        values = values[[rank[n] for n in order]]
    return values
