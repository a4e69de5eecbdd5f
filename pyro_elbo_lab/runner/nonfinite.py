# SPDX-License-Identifier: Apache-2.0
"""
What the runner does about non-finite values: the check of a step's gradients
(:func:`all_finite_grads`), the recognition of a distribution's argument-validation error
(:func:`is_invalid_value_error`), the diagnostic pass that finds sites with a non-finite
``log_prob`` (:func:`invalid_sites`), and the :class:`~pyro_elbo_lab.runner.result.NonFiniteError`
naming the culprit terms, sites and parameters (:func:`nonfinite_error`).

Imports :mod:`pyro_elbo_lab.runner` siblings (``params``, ``result``), and
:mod:`pyro_elbo_lab.terms` when it builds an error.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pyro
import pyro.poutine as poutine
import pyro.util
import torch

from .params import nonfinite_params
from .result import NonFiniteError

__all__ = ["all_finite_grads", "invalid_sites", "is_invalid_value_error", "nonfinite_error"]


def nonfinite_error(
    loss_fn: Any,
    chain: int,
    step: int,
    loss: float,
    params: Iterable[torch.Tensor],
    cause: BaseException | None,
    sites: dict[str, list[str]] | None = None,
    *,
    grads: list[str] | None = None,
) -> NonFiniteError:
    """
    The :class:`NonFiniteError` of ``step``, naming the culprit terms, sites and parameters.

    :param loss_fn: the chain's ELBO (its ``last_terms`` name the culprit terms and sites).
    :param int chain: the chain's index.
    :param int step: the step.
    :param float loss: its loss value.
    :param params: the step's unconstrained parameters (their ``.grad`` is checked).
    :param cause: the exception the model or guide raised, or None.
    :param dict sites: ``{site: [what is not finite]}`` found otherwise, or None.
    :param list grads: names of the parameters with non-finite gradients, when the
        gradients are not in ``.grad`` (the fused step); None: read ``.grad``.
    :rtype: NonFiniteError
    """
    store = pyro.get_param_store()
    terms = getattr(loss_fn, "last_terms", None) if cause is None else None
    bad_terms: list[str] = []
    bad_sites: dict[str, list[str]] = dict(sites or {})
    if terms is not None:
        from ..terms import TOTAL_FIELDS

        bad_terms = [n for n in TOTAL_FIELDS if not math.isfinite(getattr(terms, n))]
        for site, values in terms.per_site.items():
            bad = [k for k, v in values.items() if not math.isfinite(v)]
            if bad:
                bad_sites[site] = bad
    if grads is None:
        found = (store.param_name(p) for p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all()))
        grads = [name for name in found if name is not None]
    bad_grads = sorted(grads)
    bad_params = nonfinite_params()
    lines = [f"non-finite values at step {step} (chain {chain}); the update of this step was not applied."]
    lines.append(f"The model or guide raised: {cause}" if cause is not None else f"loss = {loss}")
    if bad_terms:
        lines.append("ELBO terms: " + ", ".join(f"{n} = {getattr(terms, n)}" for n in bad_terms))
    if bad_sites and terms is not None and all(s in terms.per_site for s in bad_sites):
        lines.append(
            "sites: "
            + "; ".join(
                f"'{s}' ({', '.join(f'{k} = {terms.per_site[s][k]}' for k in ks)})" for s, ks in bad_sites.items()
            )
        )
    elif bad_sites:
        lines.append("sites: " + "; ".join(f"'{s}' ({', '.join(ks)})" for s, ks in bad_sites.items()))
    if bad_grads:
        lines.append("parameters with non-finite gradients: " + ", ".join(f"'{n}'" for n in bad_grads))
    if bad_params:
        lines.append(
            "parameters with non-finite values: "
            + ", ".join(f"'{n}'" for n in bad_params)
            + " (produced by an earlier update: lower the learning rate or clip gradients)"
        )
    lines.append(
        "The partial result (history before this step, last finite parameters) is error.result. Fix the "
        "log-probability of the named sites (e.g. clamp scales away from 0, check the data for inf/NaN), "
        "lower the learning rate, or pass on_nonfinite='skip' to drop such steps."
    )
    return NonFiniteError(
        "\n".join(lines), step=step, terms=bad_terms, sites=bad_sites, grads=bad_grads, params=bad_params
    )


_INVALID_VALUES = re.compile(
    r"Expected (parameter \w+|value argument) \(.*(to satisfy the constraint|to be within the support).*"
    r"but found invalid values",
    re.S,
)


def is_invalid_value_error(error: BaseException) -> bool:
    """
    Whether ``error`` is the ``ValueError`` of a distribution's argument validation (torch's
    ``Expected parameter ... but found invalid values`` or ``Expected value argument ...``):
    the form a NaN, infinite or zero scale or a NaN value takes with validation on.
    """
    return isinstance(error, ValueError) and bool(_INVALID_VALUES.search(str(error)))


def invalid_sites(model: Callable, guide: Callable, args: tuple, model_kwargs: dict) -> dict[str, list[str]]:
    """
    Sample sites whose ``log_prob`` is not finite, or whose distribution could not be
    built, found by one pass of the guide and the model with validation off and without
    gradients. Only called after a step failed; the RNG state is restored afterwards, so
    the pass does not change the random numbers of later steps.

    :returns: ``{site: ["log_prob (model)"]}`` etc.; empty when the pass finds nothing.
    """
    rng = pyro.util.get_rng_state()
    found: dict[str, list[str]] = {}
    try:
        with torch.no_grad(), pyro.validation_enabled(False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for role, trace in _traces(model, guide, args, model_kwargs):
                for name, site in trace.nodes.items():
                    if site["type"] != "sample":
                        continue
                    try:
                        ok = bool(torch.isfinite(site["fn"].log_prob(site["value"])).all())
                    except Exception:  # noqa: BLE001  a distribution that cannot even evaluate
                        ok = False
                    if not ok:
                        found.setdefault(name, []).append(f"log_prob ({role})")
    except Exception:  # noqa: BLE001  the diagnosis must not hide the original error
        pass
    finally:
        pyro.util.set_rng_state(rng)
    return found


def _traces(model: Callable, guide: Callable, args: tuple, model_kwargs: dict) -> Iterator[tuple[str, Any]]:
    guide_trace = poutine.trace(poutine.block(guide, hide_types=["param"])).get_trace(*args, **model_kwargs)
    yield "guide", guide_trace
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **model_kwargs)
    yield "model", model_trace


def all_finite_grads(params: Iterable[torch.Tensor]) -> bool:
    """Whether every ``.grad`` of ``params`` that is set is finite (one reduction over all of them)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
