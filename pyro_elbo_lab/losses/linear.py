# SPDX-License-Identifier: Apache-2.0
"""
The linear fast path of ``WeightedObjective._particle`` (:mod:`.objective`): the β-weighted
objective and its record as two matrix products over the stacked per-site sums.

It applies when the weighting is linear in the per-site log-densities: β weighting only (no
free bits, no capacity), every guide site reparameterised, the Monte Carlo KL, and every
auxiliary guide site attributed whole to an entry (:mod:`.attribution`). The per-site,
per-particle sums are stacked once, ``S`` of shape ``(sites,)`` or ``(sites, P)``
(observed log p, the latent rows' log q, the model log p); the objective is ``c @ S``
(``c`` = +1 observed, -β_e log q, +β_e log p per entry e); the record's KL and entropy rows
are per-entry sums of the log q and log p rows (``index_add`` by the entry of each row, the
attribution folded in, so a non-finite row reaches only its own entry's terms, never another's
through a zero coefficient), with ``c`` and the row-to-entry indices built once per structure
(:func:`linear_matrices`, cached by the caller). Same values as the general path to float
rounding.

Imports :mod:`.attribution` only (and Pyro's ``is_identically_zero``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pyro.distributions.util import is_identically_zero

from .attribution import Attribution, Entry

__all__ = ["entry_label", "linear_matrices", "linear_particle"]

#: ``(c at β = 1, dc/dβ, entry of each log q row, entry of each log p row, names)``
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
    plan: Attribution, obs_names: list, num_latent: int, p_rows: list, weighted: tuple, like: torch.Tensor
) -> LinearMatrices | None:
    """
    The coefficients and the record matrix of the linear path.

    :param Attribution plan: the entries of the per-site record.
    :param list obs_names: the observed sites, in stacking order.
    :param int num_latent: the number of latent rows (model latent sites, then auxiliary sites).
    :param list p_rows: the latent rows that have a model log p, in stacking order.
    :param tuple weighted: per entry, whether β weights it.
    :param torch.Tensor like: a tensor of the dtype and device to build in.
    :returns: ``(c at β = 1, dc/dβ, q_entry, p_entry, names)``: two ``(width,)`` coefficient
        vectors (``width`` being the number of stacked rows), the entry of each log q row
        ``(num_latent,)`` and of each log p row ``(len(p_rows),)`` (int64), and the record
        names; ``None`` when an auxiliary site is split over entries (the general path).
    """
    entries = plan.entries
    if sorted(r for e in entries for r in e.rows) != list(range(num_latent)):
        return None
    num_obs = len(obs_names)
    width = num_obs + num_latent + len(p_rows)
    p_column = {r: num_obs + num_latent + i for i, r in enumerate(p_rows)}
    kl_rows = torch.zeros(len(entries), width, dtype=like.dtype, device=like.device)
    q_entry = [0] * num_latent
    for e, entry in enumerate(entries):
        for r in entry.rows:
            q_entry[r] = e
            kl_rows[e, num_obs + r] = 1.0
            if r in p_column:
                kl_rows[e, p_column[r]] = -1.0
    recon_rows = torch.eye(num_obs, width, dtype=like.dtype, device=like.device)
    selected = torch.tensor(weighted, dtype=like.dtype, device=like.device)
    c_one = recon_rows.sum(0) - kl_rows.sum(0)
    c_beta = selected @ kl_rows
    q_index = torch.tensor(q_entry, dtype=torch.long, device=like.device)
    p_index = torch.tensor([q_entry[r] for r in p_rows], dtype=torch.long, device=like.device)
    names = (
        ["objective"]
        + [("reconstruction", n) for n in obs_names]
        + [("kl",) + entry_label(e) for e in entries]
        + [("entropy",) + entry_label(e) for e in entries]
    )
    return c_one, c_beta, q_index, p_index, names


def linear_particle(
    beta: Any,
    obs_names: list,
    obs_lp: list,
    latent: list,
    *,
    log_prob_per_particle: Callable[[Any], torch.Tensor],
    attribution: Callable[[], Attribution],
    entry_weight: Callable[[Entry], bool],
    cache: dict,
) -> tuple[torch.Tensor, torch.Tensor, list, torch.Tensor] | None:
    """
    One particle (or the vectorised particle plate) by the linear path.

    :param beta: β of the step (a float, or a 0-dim tensor in a compiled step).
    :param list obs_names: the observed sites.
    :param list obs_lp: their scaled log p summed per particle, ``()`` or ``(P,)`` each (nats).
    :param list latent: ``[(name, model_site or None, guide_site), ...]``, model sites first.
    :param log_prob_per_particle: ``site -> `` its scaled ``log_prob`` summed per particle.
    :param attribution: ``() ->`` the :class:`~.latent_rows.Attribution` of these traces.
    :param entry_weight: ``entry ->`` whether β weights it.
    :param dict cache: the caller's cache of :func:`linear_matrices` per structure.
    :returns: ``(objective, surrogate, names, record)`` as
        ``WeightedObjective._particle`` (:mod:`.objective`), or ``None`` when the case does not
        apply (a score-function guide site, an auxiliary site split over entries).
    """
    log_q, log_p, p_rows = [], [], []
    for r, (_, model_site, guide_site) in enumerate(latent):
        if not is_identically_zero(guide_site["score_parts"].score_function):
            return None  # score-function site: the general path
        log_q.append(log_prob_per_particle(guide_site))
        if model_site is not None:
            log_p.append(log_prob_per_particle(model_site))
            p_rows.append(r)
    plan = attribution()
    weighted = tuple(entry_weight(e) for e in plan.entries)
    stacked = torch.stack(obs_lp + log_q + log_p)  # dtypes promoted, as the general path's stacks
    key = (plan, tuple(obs_names), tuple(p_rows), weighted, stacked.dtype, stacked.device)
    found = cache.get(key, False)
    if found is False:
        found = linear_matrices(plan, obs_names, len(latent), p_rows, weighted, stacked)
        if len(cache) >= 64:
            cache.clear()
        cache[key] = found
    if found is None:
        return None  # an auxiliary site split over entries: the general path
    c_one, c_beta, q_index, p_index, names = found
    coefficients = c_one if not torch.is_tensor(beta) and beta == 1.0 else c_one - (beta - 1.0) * c_beta
    surrogate = coefficients @ stacked
    objective = surrogate.detach()
    # The record by per-entry sums, not a matrix product: a zero coefficient times a
    # non-finite row (an observed log p of -inf, say) would make every term NaN.
    values = stacked.detach()
    num_obs, num_latent = len(obs_lp), len(log_q)
    log_q_rows = values[num_obs : num_obs + num_latent]
    sums = values.new_zeros((len(plan.entries),) + values.shape[1:])
    entropy = -sums.index_add(0, q_index, log_q_rows)
    kl = (-entropy).index_add(0, p_index, values[num_obs + num_latent :], alpha=-1.0)
    record = torch.cat([objective.unsqueeze(0), values[:num_obs], kl, entropy])
    return objective, surrogate, names, record
