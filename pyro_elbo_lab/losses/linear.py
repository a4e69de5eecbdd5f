# SPDX-License-Identifier: Apache-2.0
"""
The linear fast path of ``WeightedObjective._particle`` (:mod:`.objective`): the β-weighted
objective as a weighted sum of the stacked per-site sums, and its record as signed sums of
gathered rows (elementwise kernels the step already runs, no matrix products).

It applies when the weighting is linear in the per-site log-densities: β weighting only (no
free bits, no capacity), every guide site reparameterised, the Monte Carlo KL, and every
auxiliary guide site attributed whole to an entry (:mod:`.attribution`). The per-site,
per-particle sums are stacked once, ``S`` of shape ``(sites,)`` or ``(sites, P)``
(observed log p, the latent rows' log q, the model log p; the rows grouped by shape by
:func:`~pyro_elbo_lab.sites.stack_per_particle`); the objective is ``sum_w c_w S_w``
(``c`` = +1 observed, -β_e log q, +β_e log p per entry e), and with vectorised particles the
differentiable surrogate is the same sum over Pyro's own ``log_prob_sum`` of each site (so
``S`` is detached and the backward graph is Pyro's); the record's reconstruction, KL
and entropy rows are signed sums of gathered rows of ``S`` (padded with a zero row, never a
zero coefficient, so a non-finite row reaches only its own entry's terms, never another's),
with ``c`` and the gather index built once per structure (:func:`linear_matrices`, cached by
the caller). Same values as the general path to float rounding.

Imports :mod:`.attribution` only (and Pyro's ``is_identically_zero``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions.util import is_identically_zero

from .attribution import Attribution, Entry

__all__ = ["entry_label", "linear_matrices", "linear_particle"]

#: ``(c at β = 1, dc/dβ, record gather index, record signs, names)``
LinearMatrices = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list]


def entry_label(entry: Entry) -> tuple:
    """
    The record name of an entry after its term.

    :param Entry entry: an entry of the per-site record.
    :returns: ``(site,)``, or ``(name, covered sites)`` for a group.
    :rtype: tuple
    """
    return (entry.name, entry.sites) if entry.kind == "group" else (entry.name,)


def linear_matrices(
    plan: Attribution,
    obs_names: list,
    num_latent: int,
    p_rows: list,
    weighted: tuple,
    like: torch.Tensor,
    order: tuple[int, ...] | None = None,
) -> LinearMatrices | None:
    """
    The coefficients and the record's gather index of the linear path.

    The stacked rows are, in this order, the observed log p, the latent rows' log q and the
    log p of the latent rows in ``p_rows``; ``order`` (from
    :func:`~pyro_elbo_lab.sites.stack_per_particle`) says which of them each row of the
    stacked tensor holds. The record's row ``j`` (after the objective) is
    ``sum_k signs[j, k] * ext[gather[j, k]]``, where ``ext`` is the stacked rows followed by
    the objective and a zero row (the padding): no coefficient is ever zero, so a
    non-finite row reaches only its own entry's terms.

    :param Attribution plan: the entries of the per-site record.
    :param list obs_names: the observed sites, in stacking order.
    :param int num_latent: the number of latent rows (model latent sites, then auxiliary sites).
    :param list p_rows: the latent rows that have a model log p, in stacking order.
    :param tuple weighted: per entry, whether β weights it.
    :param torch.Tensor like: the stacked rows (for the dtype, device and number of dims).
    :param tuple order: the stacked row of each position, ``None`` for the order above.
    :returns: ``(c at β = 1, dc/dβ, gather, signs, names)``: two ``(width,)`` coefficient
        vectors (``width`` being the number of stacked rows), the record's ``(rows, k)``
        gather index (int64) and ``(rows, k)`` signs (shaped to broadcast over particles),
        and the record names; ``None`` when an auxiliary site is split over entries (the
        general path).
    """
    entries = plan.entries
    if sorted(r for e in entries for r in e.rows) != list(range(num_latent)):
        return None
    num_obs = len(obs_names)
    width = num_obs + num_latent + len(p_rows)
    position = list(range(width))
    if order is not None:
        for i, j in enumerate(order):
            position[j] = i
    p_column = {r: num_obs + num_latent + i for i, r in enumerate(p_rows)}
    objective_row, zero_row = width, width + 1
    # (column, sign) lists of the record rows: objective, reconstruction, kl, entropy
    terms: list = [[(objective_row, 1.0)]] + [[(position[i], 1.0)] for i in range(num_obs)]
    kl_terms: list = []
    entropy_terms: list = []
    c_one = [1.0] * num_obs + [0.0] * (width - num_obs)
    c_beta = [0.0] * width
    for e, entry in enumerate(entries):
        kl_e, entropy_e = [], []
        for r in entry.rows:
            kl_e.append((position[num_obs + r], 1.0))
            entropy_e.append((position[num_obs + r], -1.0))
            c_one[num_obs + r] = -1.0
            c_beta[num_obs + r] = 1.0 if weighted[e] else 0.0
        for r in entry.rows:
            if r in p_column:
                kl_e.append((position[p_column[r]], -1.0))
                c_one[p_column[r]] = 1.0
                c_beta[p_column[r]] = -1.0 if weighted[e] else 0.0
        kl_terms.append(kl_e)
        entropy_terms.append(entropy_e)
    terms += kl_terms + entropy_terms
    k = max(len(t) for t in terms)
    gather = [[c for c, _ in t] + [zero_row] * (k - len(t)) for t in terms]
    signs = [[v for _, v in t] + [1.0] * (k - len(t)) for t in terms]
    # coefficients in the stacked tensor's row order
    c_one_t = torch.tensor([c_one[j] for j in (order or range(width))], dtype=like.dtype, device=like.device)
    c_beta_t = torch.tensor([c_beta[j] for j in (order or range(width))], dtype=like.dtype, device=like.device)
    signs_t = torch.tensor(signs, dtype=like.dtype, device=like.device).reshape(
        (len(terms), k) + (1,) * (like.dim() - 1)
    )
    names = (
        ["objective"]
        + [("reconstruction", n) for n in obs_names]
        + [("kl",) + entry_label(e) for e in entries]
        + [("entropy",) + entry_label(e) for e in entries]
    )
    gather_t = torch.tensor([c for row in gather for c in row], dtype=torch.long, device=like.device)
    return c_one_t, c_beta_t, gather_t, signs_t, names


def linear_particle(
    beta: Any,
    obs_names: list,
    observed: list,
    latent: list,
    *,
    stack_log_probs: Callable[[list], tuple[torch.Tensor, tuple[int, ...] | None, torch.Tensor | None]],
    attribution: Callable[[], Attribution],
    entry_weight: Callable[[Entry], bool],
    cache: dict,
) -> tuple[torch.Tensor, torch.Tensor, list, torch.Tensor] | None:
    """
    One particle (or the vectorised particle plate) by the linear path.

    :param beta: β of the step (a float, or a 0-dim tensor in a compiled step).
    :param list obs_names: the observed sites' names.
    :param list observed: the observed model sites.
    :param list latent: ``[(name, model_site or None, guide_site), ...]``, model sites first.
    :param stack_log_probs: ``sites -> (stacked, order, totals)``: the sites' scaled
        ``log_prob`` summed per particle and stacked, shape ``(sites,)`` or ``(sites, P)``
        (nats), row ``i`` being site ``order[i]`` (``order`` ``None``: the sites' order), as
        :func:`~pyro_elbo_lab.sites.stack_per_particle`; and ``None``, or the rows' sums over
        particles ``(sites,)`` (differentiable; ``stacked`` then detached).
    :param attribution: ``() ->`` the :class:`~.latent_rows.Attribution` of these traces.
    :param entry_weight: ``entry ->`` whether β weights it.
    :param dict cache: the caller's cache of :func:`linear_matrices` per structure.
    :returns: ``(objective, surrogate, names, record)`` as
        ``WeightedObjective._particle`` (:mod:`.objective`; the surrogate may be summed over
        particles, shape ``()``), or ``None`` when the case does not
        apply (a score-function guide site, an auxiliary site split over entries).
    """
    log_q, log_p, p_rows = [], [], []
    for r, (_, model_site, guide_site) in enumerate(latent):
        if not is_identically_zero(guide_site["score_parts"].score_function):
            return None  # score-function site: the general path
        log_q.append(guide_site)
        if model_site is not None:
            log_p.append(model_site)
            p_rows.append(r)
    plan = attribution()
    weighted = tuple(entry_weight(e) for e in plan.entries)
    stacked, order, totals = stack_log_probs(observed + log_q + log_p)  # dtypes promoted, as the general path's stacks
    key = (plan, tuple(obs_names), tuple(p_rows), weighted, order, stacked.dtype, stacked.device, stacked.dim())
    found = cache.get(key, False)
    if found is False:
        found = linear_matrices(plan, obs_names, len(latent), p_rows, weighted, stacked, order)
        if len(cache) >= 64:
            cache.clear()
        cache[key] = found
    if found is None:
        return None  # an auxiliary site split over entries: the general path
    c_one, c_beta, gather, signs, names = found
    coefficients = c_one if not torch.is_tensor(beta) and beta == 1.0 else c_one - (beta - 1.0) * c_beta
    # elementwise products and sums rather than matrix products: the same few kernels as
    # the model's and Pyro's own (cheaper, at a few sites, than a matmul called once a step)
    rows = coefficients if stacked.dim() == 1 else coefficients.unsqueeze(-1)
    if totals is None:
        surrogate = (stacked * rows).sum(0)
        objective = surrogate.detach()
    else:  # the surrogate summed over particles, from Pyro's per-site sums (its gradient's graph)
        objective = (stacked * rows).sum(0).detach()
        surrogate = (totals * coefficients).sum()
    # The record by signed sums of gathered rows, not a matrix product: a zero coefficient
    # times a non-finite row (an observed log p of -inf, say) would make every term NaN.
    values = stacked.detach()
    ext = torch.cat([values, objective.unsqueeze(0), values.new_zeros((1,) + values.shape[1:])])
    record = (ext.index_select(0, gather).view(signs.shape[:2] + values.shape[1:]) * signs).sum(1)
    return objective, surrogate, names, record
