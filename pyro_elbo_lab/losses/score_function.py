# SPDX-License-Identifier: Apache-2.0
"""
The score-function part of ``WeightedObjective._particle``'s surrogate (:mod:`.objective`):
the gradient of the weighted objective through guide sites that are not reparameterised.

For such a site ``z`` with score function :math:`\\nabla \\log q(z)` (Pyro's
``score_parts.score_function``), the surrogate gains
:math:`\\mathrm{stop\\_grad}(r_z) \\log q(z)`, with :math:`r_z` the downstream cost: the
weighted :math:`\\log p - \\log q` of every sample site in the plates that contain ``z``,
summed per plate frame (Pyro's plate-wise Rao–Blackwellisation, as in
:class:`pyro.infer.Trace_ELBO`), β on the KL of the sites that ``sites=`` selects. A
free-bits or capacity term is a non-linear function of all selected sites in all plates, so
it enters the downstream cost of every score-function site whole (per particle), and the
selected sites under it are left out of the plate-wise cost; free bits and capacity
themselves need reparameterised guide sites (:func:`not_reparameterised_error`).

Imports nothing from the package (Pyro's ``MultiFrameTensor`` and ``get_plate_stacks``).

References

- *Monte Carlo Gradient Estimation in Machine Learning*, S. Mohamed, M. Rosca, M. Figurnov,
  A. Mnih, 2020.
- *Gradient Estimation Using Stochastic Computation Graphs*, J. Schulman, N. Heess, T. Weber,
  P. Abbeel, 2015.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.infer.util import MultiFrameTensor, get_plate_stacks
from pyro.poutine import Trace
from pyro.poutine.runtime import Message

__all__ = ["downstream_cost", "not_reparameterised_error", "score_function_surrogate"]


def not_reparameterised_error(name: str, guide_site: Message) -> NotImplementedError:
    """
    The error for free bits or capacity on a guide site that is not reparameterised.

    :param str name: the guide site's name.
    :param dict guide_site: the guide site.
    :rtype: NotImplementedError
    """
    return NotImplementedError(
        "free bits and capacity are non-linear in the KL and need reparameterised guide "
        f"sites; guide site '{name}' ({type(guide_site['fn']).__name__}) is not "
        "reparameterisable. Use beta weighting, a reparameterisable (e.g. relaxed) "
        "distribution, or restrict sites= to reparameterised sites."
    )


def downstream_cost(
    model_trace: Trace, guide_trace: Trace, beta: float | torch.Tensor, selected: set, exclude: set
) -> MultiFrameTensor:
    """
    The downstream cost per plate frame for the score-function term, detached: each model
    sample site's ``log_prob`` (minus the guide's for a latent site, times β for a latent
    site in ``selected``), leaving out the latent sites in ``exclude`` (those under a
    free-bits / capacity term).

    :param pyro.poutine.Trace model_trace: the model trace (log-probabilities computed).
    :param pyro.poutine.Trace guide_trace: the guide trace (log-probabilities computed).
    :param beta: β in force.
    :param set selected: names of the latent sites that ``sites=`` selects.
    :param set exclude: names of the latent sites left out.
    :returns: the cost in nats, per plate frame.
    :rtype: pyro.infer.util.MultiFrameTensor
    """
    log_r = MultiFrameTensor()
    stacks = get_plate_stacks(model_trace)
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or name in exclude:
            continue
        term = site["log_prob"]
        if not site["is_observed"]:
            term = term - guide_trace.nodes[name]["log_prob"]
            if name in selected and (torch.is_tensor(beta) or beta != 1.0):
                term = beta * term
        log_r.add((stacks[name], term.detach()))
    return log_r


def score_function_surrogate(
    surrogate: torch.Tensor | float,
    score_sites: list,
    log_r: MultiFrameTensor,
    per_particle: Callable[[torch.Tensor], torch.Tensor],
    *,
    extra: torch.Tensor | None = None,
    max_plate_nesting: int = 1,
) -> torch.Tensor | float:
    """
    Adds the score-function term of each site in ``score_sites`` to ``surrogate``, one site
    after the other.

    :param surrogate: the surrogate objective so far, per particle.
    :param list score_sites: ``[(guide_site, score_function), ...]`` of the guide sites that
        are not reparameterised.
    :param pyro.infer.util.MultiFrameTensor log_r: the downstream cost (:func:`downstream_cost`).
    :param per_particle: ``tensor -> `` its sum per particle (shape ``()`` or
        ``(num_particles,)``).
    :param extra: a free-bits / capacity cost per particle (shape ``()`` or
        ``(num_particles,)``) added to every site's downstream cost, or ``None``.
    :param int max_plate_nesting: the loss's ``max_plate_nesting`` (the vectorised particle
        plate counted), to broadcast ``extra`` against a site's plates.
    :returns: ``surrogate`` plus the score-function terms.
    """
    if extra is not None and extra.dim():
        extra = extra.reshape(extra.shape + (1,) * (max_plate_nesting - 1))
    for guide_site, sf in score_sites:
        downstream = log_r.sum_to(guide_site["cond_indep_stack"])
        if extra is not None:
            downstream = downstream + extra
        surrogate = surrogate + per_particle(downstream * sf)
    return surrogate
