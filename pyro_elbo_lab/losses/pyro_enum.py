# SPDX-License-Identifier: Apache-2.0
"""
The one place where :class:`~pyro_elbo_lab.BetaTraceEnumELBO` meets Pyro's enumeration
machinery below its documented API.

* Re-implemented here from Pyro 1.9's ``pyro/infer/traceenum_elbo.py`` (Apache-2.0), on
  public trace data only (``Trace.plate_to_symbol``, ``site["cond_indep_stack"]``,
  ``site["infer"]``), so that no private name of Pyro is imported:
  :func:`find_ordinal`, :func:`common_scale`, :func:`check_enumeration_constraint`, and
  :func:`dice_log_factors` (from the attributes ``log_denom`` and ``log_probs`` of
  :class:`pyro.infer.util.Dice`); :func:`dice_expectations` is
  :meth:`pyro.infer.util.Dice.compute_expectation` cost by cost and per particle.
* Still Pyro's own: the adjoint protocol of ``pyro.ops.einsum.adjoint``
  (``require_backward``, then ``_pyro_backward()`` and ``_pyro_backward_result`` on the
  tensors), which :func:`query_marginals` uses to read every marginal of a sum-product in
  one backward pass, as :meth:`pyro.infer.util.Dice.compute_expectation` does. It is checked when this
  module is imported: a Pyro outside :data:`SUPPORTED_PYRO` that lacks it raises an
  ``ImportError`` naming the supported range.

Imports nothing of the package.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from opt_einsum import shared_intermediates
from pyro import __version__ as _pyro_version
from pyro.distributions.util import is_identically_zero
from pyro.infer.util import Dice
from pyro.ops import packed
from pyro.ops.rings import MarginalRing
from pyro.poutine import Trace
from pyro.poutine.runtime import Message
from pyro.util import ignore_jit_warnings

#: the pyro-ppl versions this module is written against (and ``pyproject.toml`` requires)
SUPPORTED_PYRO = ">=1.9,<1.10"

try:
    from pyro.ops.einsum.adjoint import require_backward
except ImportError as e:  # pragma: no cover - only with an unsupported Pyro
    raise ImportError(
        f"pyro_elbo_lab's BetaTraceEnumELBO uses Pyro's einsum adjoint (pyro.ops.einsum.adjoint.require_backward), "
        f"which pyro-ppl {_pyro_version} does not have ({e}). Install a supported version: "
        f"pip install 'pyro-ppl{SUPPORTED_PYRO}'."
    ) from e
if not all(hasattr(Dice(Trace(), {}), a) for a in ("log_denom", "log_probs")):  # pragma: no cover
    raise ImportError(
        f"pyro_elbo_lab's BetaTraceEnumELBO reads pyro.infer.util.Dice's log_denom and log_probs, which pyro-ppl "
        f"{_pyro_version} does not have. Install a supported version: pip install 'pyro-ppl{SUPPORTED_PYRO}'."
    )

__all__ = [
    "SUPPORTED_PYRO",
    "check_enumeration_constraint",
    "common_scale",
    "dice_expectations",
    "dice_log_factors",
    "find_ordinal",
    "query_marginals",
]


def find_ordinal(trace: Trace, site: Message) -> frozenset:
    """
    The ordinal of a sample site: the symbols of the vectorised plates it sits in
    (``y`` may depend on ``x`` iff ``ordinal(x) <= ordinal(y)``).

    :param trace: the site's (packed) trace.
    :param dict site: the site.
    :rtype: frozenset
    """
    return frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)


@ignore_jit_warnings()  # a tensor scale is read as a float, as Pyro does: frozen in a compiled step
def common_scale(scales: list, names: list[str]) -> float | torch.Tensor:
    """
    The ``poutine.scale`` shared by the factors of enumerated sites (compared by value,
    as Pyro does: a subsampling scale multiplies the log of the sum, so it must be common).

    :param list scales: the sites' scales (floats or 0-dim tensors).
    :param list names: the sites' names, in the same order (for the error).
    :returns: the common scale (the first site's object).
    :raises ValueError: for a scale that is not a scalar, or for different scales, naming the sites.
    """
    values: dict = {}
    for name, scale in zip(names, scales):
        if isinstance(scale, torch.Tensor) and scale.dim():
            raise ValueError(
                f"site '{name}' has a poutine.scale of shape {tuple(scale.shape)}; the factors of enumerated sites "
                "take scalar scales only. Use a scalar scale (or mask) for it."
            )
        values.setdefault(float(scale), []).append(name)
    if len(values) > 1:
        found = "; ".join(f"{scale:g}: {names}" for scale, names in values.items())
        raise ValueError(
            "the factors that depend on model-enumerated sites must share one poutine.scale (a subsampling scale "
            f"multiplies the log of their sum), found {found}. Give them the same scale."
        )
    return scales[0]


def check_enumeration_constraint(model_enum_ordinals: list[frozenset], guide_trace: Trace) -> None:
    """
    Model enumeration must be no more global than guide enumeration: a guide-enumerated
    site may not sit in a plate that some model-enumerated site is outside of.

    :param list model_enum_ordinals: the ordinals of the model-enumerated sites.
    :param guide_trace: the packed guide trace.
    :raises ValueError: naming the guide site and the plate.
    """
    min_ordinal = frozenset.intersection(*model_enum_ordinals)
    for name, site in guide_trace.nodes.items():
        if site["type"] == "sample" and (site["infer"] or {}).get("_enumerate_dim") is not None:
            for f in site["cond_indep_stack"]:
                if f.vectorized and guide_trace.plate_to_symbol[f.name] not in min_ordinal:
                    raise ValueError(
                        "Expected model enumeration to be no more global than guide enumeration, but found model "
                        f"enumeration sites upstream of guide site '{name}' in plate('{f.name}'). Try converting "
                        "some model enumeration sites to guide enumeration sites."
                    )


def dice_log_factors(dice: Dice, target: frozenset) -> list:
    """
    The DiCE log factors of the costs at ordinal ``target`` (Foerster et al. 2018): the
    guide's log-probabilities of every upstream ordinal, minus the log of how many times
    the non-downstream ordinals are counted (sequential enumeration); as Pyro 1.9's
    ``Dice._get_log_factors``.

    :param dice: the guide trace's :class:`~pyro.infer.util.Dice`.
    :param frozenset target: the costs' ordinal.
    :returns: packed tensors and, first, a float when the count is not 1.
    :rtype: list
    """
    log_denom: float | torch.Tensor = 0.0
    for ordinal, term in dice.log_denom.items():
        if not ordinal <= target:  # not downstream
            log_denom = log_denom + term
    factors: list = [] if is_identically_zero(log_denom) else [-log_denom]
    for ordinal, terms in dice.log_probs.items():
        if ordinal <= target:  # upstream
            factors.extend(terms)
    return factors


def query_marginals(ring: MarginalRing, log_factors: list, sum_dims: set, queries: list) -> list:
    """
    The marginal (log-space) of each query tensor under the product of ``log_factors``,
    summed over ``sum_dims``: one sum-product and one backward pass through Pyro's einsum
    adjoint, as :meth:`pyro.infer.util.Dice.compute_expectation`.

    :param ring: a :class:`pyro.ops.rings.MarginalRing` (within ``shared_intermediates``).
    :param list log_factors: packed log factors; every query must be one of them.
    :param set sum_dims: the packed dims to sum out.
    :param list queries: packed tensors among ``log_factors``.
    :returns: their marginals, in order (log-space, packed dims of each query).
    :rtype: list
    """
    for query in queries:
        require_backward(query)
    root = ring.sumproduct(log_factors, sum_dims)
    root._pyro_backward()
    return [query._pyro_backward_result for query in queries]


def dice_expectations(dice: Dice, atoms: list, particle_symbol: str | None, num_particles: int) -> list:
    """
    The DiCE expectation of each cost in ``atoms = [(ordinal, packed cost), ...]``:
    :meth:`pyro.infer.util.Dice.compute_expectation` term by term (its value and
    gradient), kept per particle (shape ``(num_particles,)``) when ``particle_symbol``
    names the vectorised particle plate. Zero-probability terms drop out, as in
    ``TraceEnum_ELBO``, without a device sync.

    :param dice: the guide trace's :class:`~pyro.infer.util.Dice`.
    :param list atoms: ``(ordinal, cost)`` pairs, each cost a packed tensor (or 0).
    :param particle_symbol: the packed dim of the vectorised particle plate, or ``None``.
    :param int num_particles: the number of vectorised particles (1 when sequential).
    :returns: one tensor per atom, shape ``()`` or ``(num_particles,)``, in nats.
    :rtype: list
    """
    out: list = [None] * len(atoms)
    by_ordinal: dict = {}
    for index, (ordinal, cost) in enumerate(atoms):
        by_ordinal.setdefault(ordinal, []).append((index, cost))
    with shared_intermediates() as cache:
        ring = MarginalRing(cache=cache)
        for ordinal, items in by_ordinal.items():
            log_factors = dice_log_factors(dice, ordinal)
            scale = math.exp(sum(x for x in log_factors if not isinstance(x, torch.Tensor)))
            log_factors = [x for x in log_factors if isinstance(x, torch.Tensor)]
            queries: dict[frozenset, Any] = {frozenset(cost._pyro_dims): None for _, cost in items}
            log_factor: Any
            for log_factor in log_factors:
                key = frozenset(log_factor._pyro_dims)
                if queries.get(key, False) is None:
                    queries[key] = log_factor
            for _, cost in items:
                key = frozenset(cost._pyro_dims)
                if queries[key] is None:
                    query: Any = torch.zeros_like(cost)
                    query._pyro_dims = cost._pyro_dims
                    log_factors.append(query)
                    queries[key] = query
            sum_dims = set().union(*(f._pyro_dims for f in log_factors)) - ordinal
            marginals = query_marginals(ring, log_factors, sum_dims, list(queries.values()))
            probs = {key: marginal.exp() for key, marginal in zip(queries, marginals)}
            for index, cost in items:
                key = frozenset(cost._pyro_dims)
                prob = probs[key]
                prob._pyro_dims = queries[key]._pyro_dims
                if is_identically_zero(cost):
                    out[index] = prob.new_zeros((num_particles,) if particle_symbol else ())
                    continue
                cost, prob = packed.broadcast_all(cost, prob)
                dims = cost._pyro_dims
                # zero-probability terms drop out (as in TraceEnum_ELBO), without a device sync
                cost = cost.masked_fill(prob <= 0, 0.0)
                term = prob * cost
                if particle_symbol is None:
                    value = term if term.dim() == 0 else term.sum()
                elif particle_symbol in dims:
                    k = dims.index(particle_symbol)
                    rest = [d for d in range(term.dim()) if d != k]
                    value = term.sum(rest) if rest else term
                else:  # a cost outside the particle plate, shared out among the particles
                    value = ((term if term.dim() == 0 else term.sum()) / num_particles).expand(num_particles)
                out[index] = scale * value if scale != 1.0 else value
    return out
