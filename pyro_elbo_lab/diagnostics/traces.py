# SPDX-License-Identifier: Apache-2.0
"""
Vectorised importance sampling from a guide: one model/guide trace over a sample plate.

Shared by the evidence estimator, the collapse diagnostics and the ArviZ converter, so
that every post-fit quantity is computed from the same kind of draws, without a Python
loop over samples.
"""

from __future__ import annotations

import functools
import math
import operator
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

from .. import sites
from ..checks import empty_plate_errors

__all__ = [
    "SAMPLE_PLATE",
    "ImportanceTraces",
    "guess_max_plate_nesting",
    "vectorized_traces",
    "log_joint_and_guide",
    "probe_traces",
    "check_sample_plate",
    "enumerated_site_error",
]

#: Name of the plate that vectorises importance samples.
SAMPLE_PLATE = "_elbo_lab_samples"


def enumerated_site_error(name: str) -> ValueError:
    """
    The error of every post-fit diagnostic for a latent site enumerated in the model
    (``infer={"enumerate": ...}``, ``config_enumerate``) that the guide does not sample.
    """
    return ValueError(
        f"site '{name}' is enumerated in the model: posterior_collapse, aggregate_posterior, rate_distortion, "
        "to_inference_data, guide_moments and estimate_evidence(per_datapoint=...) do not marginalise "
        "enumerated sites yet (estimate_evidence without per_datapoint does). Use a guide that samples it "
        "(e.g. pyro.sample(name, "
        "dist.Categorical(logits=...)) in the guide), or pyro.infer.infer_discrete for its posterior; "
        "BetaTraceEnumELBO's last_terms report the fit's marginal terms."
    )


class _RefuseEnumerated(Messenger):
    """Raise :func:`enumerated_site_error` at an enumerated model site the guide lacks, before the model goes on."""

    def __init__(self, guide_trace: Trace) -> None:
        super().__init__()
        self.guide_names = {n for n, site in guide_trace.nodes.items() if site["type"] == "sample"}

    def _pyro_sample(self, msg: Message) -> None:
        # the model's own infer dict: this handler runs before poutine.replay substitutes the guide's
        enumerate = (msg.get("infer") or {}).get("enumerate")
        name = msg["name"]
        if enumerate in ("parallel", "sequential") and not msg["is_observed"] and name not in self.guide_names:
            raise enumerated_site_error(str(name))


def _replayed_model_trace(
    model: Callable[..., Any], guide_trace: Trace, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> Trace:
    """The model replayed against ``guide_trace``, refusing sites enumerated in the model."""
    return poutine.trace(poutine.replay(_RefuseEnumerated(guide_trace)(model), trace=guide_trace)).get_trace(
        *args, **kwargs
    )


def guess_max_plate_nesting(
    model: Callable[..., Any], guide: Callable[..., Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> int:
    """
    How many plate dimensions the model and guide use, found by running them once
    without recording parameters (like :meth:`pyro.infer.ELBO._guess_max_plate_nesting`).

    :returns: the number of batch dimensions to the right of the sample plate.
    :rtype: int
    """
    return probe_traces(model, guide, args, kwargs)[0]


def probe_traces(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    *,
    marginalise: bool = False,
) -> tuple[int, int]:
    """
    Run the guide and the replayed model once (no sample plate, parameters not recorded,
    no gradients) to learn what a vectorised pass will need. Sites enumerated in the
    model are refused (:func:`enumerated_site_error`) unless ``marginalise``, where they
    are drawn once from the model (the model must run with a drawn value).

    :returns: ``(max_plate_nesting, elements_per_sample)``: the plate depth (as
        :func:`guess_max_plate_nesting`) and the number of value and log_prob entries
        one importance sample adds to the traces (for choosing batch sizes).
    :rtype: tuple
    """
    with poutine.block(), torch.no_grad(), empty_plate_errors():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        if marginalise:
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        else:
            model_trace = _replayed_model_trace(model, guide_trace, args, kwargs)
    dims = [0]
    elements = 0
    for trace in (prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            dims += [-frame.dim for frame in site["cond_indep_stack"] if frame.vectorized and frame.dim is not None]
            value = site["value"]
            fn = site["fn"]
            # math.prod: a distribution's batch_shape may be a plain tuple (Pyro accepts it)
            batch_shape = fn.batch_shape if isinstance(fn, torch.distributions.Distribution) else ()
            elements += (value.numel() if isinstance(value, torch.Tensor) else 1) + math.prod(batch_shape)
    return max(dims), max(1, elements)


class ImportanceTraces(NamedTuple):
    """
    A model trace replayed against a guide trace, both vectorised over ``num_samples``
    draws in the plate :data:`SAMPLE_PLATE` at dim ``-(max_plate_nesting + 1)``, with
    ``log_prob`` computed at every sample site.
    """

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    num_samples: int
    max_plate_nesting: int
    #: whether sites enumerated in the model were enumerated (``marginalise=True``)
    enumerated: bool = False


def vectorized_traces(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    num_samples: int,
    max_plate_nesting: int | None = None,
    *,
    marginalise: bool = False,
) -> ImportanceTraces:
    """
    Draw ``num_samples`` joint samples from the guide in one vectorised pass and replay
    the model against them.

    :param model: a Pyro model.
    :param guide: a Pyro guide.
    :param tuple args: model/guide positional arguments.
    :param dict kwargs: model/guide keyword arguments.
    :param int num_samples: S >= 1.
    :param int max_plate_nesting: the model's plate depth; guessed when None.
    :param bool marginalise: enumerate the sites enumerated in the model (``poutine.enum``
        with the enumeration dims left of the sample plate), for :func:`log_joint_and_guide`,
        which then sums them out exactly; without it such sites are refused. Only for
        callers that read nothing but :func:`log_joint_and_guide`.
    :rtype: ImportanceTraces
    :raises ValueError: if a latent site of the model has no guide site (for a site
        enumerated in the model: :func:`enumerated_site_error`, raised while the model
        runs, before shape errors of code written for enumeration); under validation
        (``pyro.enable_validation``), if model and guide shapes disagree at a site or a site
        does not fit its plates (Pyro's ``check_model_guide_match`` / ``check_site_shape``).
    """
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    # the plate goes inside the replay, as in Pyro's vectorised ELBO, so that it broadcasts the
    # model's distributions too (a replayed site is "done" and not broadcast from outside)
    plate = pyro.plate(SAMPLE_PLATE, num_samples, dim=-(max_plate_nesting + 1))
    with poutine.block(), empty_plate_errors():
        guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
        if marginalise:
            enum_model = poutine.enum(plate(model), first_available_dim=-(max_plate_nesting + 2))
            model_trace = poutine.trace(poutine.replay(enum_model, trace=guide_trace)).get_trace(*args, **kwargs)
        else:
            model_trace = _replayed_model_trace(plate(model), guide_trace, args, kwargs)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    enumerated = False
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and name not in guide_trace.nodes:
            if marginalise and (site["infer"] or {}).get("_enumerate_dim") is not None:
                enumerated = True
                continue
            raise ValueError(
                f"The model's latent site '{name}' has no site in the guide, so the guide cannot propose it. "
                f"Guide sites: {[n for n, s in guide_trace.nodes.items() if s['type'] == 'sample']}"
            )
    if is_validation_enabled():
        # Pyro's own checks (as in get_importance_trace): shapes that disagree between model
        # and guide, or sites that do not fit their plates, would give silently wrong weights
        if not enumerated:
            check_model_guide_match(model_trace, guide_trace, max_plate_nesting + 1)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    for trace in (model_trace, guide_trace) if not enumerated else (guide_trace,):
        check_sample_plate(trace, num_samples, max_plate_nesting)
    if is_validation_enabled():
        for trace in (model_trace, guide_trace) if not enumerated else (guide_trace,):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, max_plate_nesting + 1)
    return ImportanceTraces(model_trace, guide_trace, num_samples, max_plate_nesting, enumerated)


def check_sample_plate(trace: Trace, num_samples: int, max_plate_nesting: int) -> None:
    """
    Refuse a site whose ``log_prob`` has dims left of the sample plate (dim
    ``-(max_plate_nesting + 1)``) or a size there other than ``num_samples`` or 1: a model
    that broadcasts wrongly under the vectorised plate (e.g. a parameter reshaped for a
    scalar latent, giving ``(S, S, N)`` instead of ``(S, N)``) would otherwise be summed
    into wrong weights without an error. Shapes only (no data read); checked whether or not
    validation is enabled, since Pyro's ``check_site_shape`` ignores the leftmost dims.

    :raises ValueError: naming the site, its ``log_prob`` shape and the expected one.
    """
    depth = max_plate_nesting + 1
    for name, site in trace.nodes.items():
        log_prob = site.get("log_prob")
        if site["type"] != "sample" or not isinstance(log_prob, torch.Tensor):
            continue
        shape = tuple(log_prob.shape)
        if len(shape) > depth or (len(shape) == depth and shape[0] not in (1, num_samples)):
            raise ValueError(
                f"site '{name}' has log_prob shape {shape}, but under the sample plate of {num_samples} draws "
                f"(dim {-depth}, max_plate_nesting={max_plate_nesting}) it must have at most {depth} dims with "
                f"{num_samples} at dim {-depth}: the site broadcasts against an earlier sample wrongly (e.g. a "
                "parameter reshaped or unsqueezed for a scalar latent); write it so it broadcasts from the "
                "right (use ...-indexing and plates), or pass the right max_plate_nesting"
            )


def log_joint_and_guide(traces: ImportanceTraces) -> tuple[torch.Tensor, torch.Tensor]:
    """
    :returns: ``(log p(x, z_s), log q(z_s))``, each of shape ``(S,)``, in nats, with
        Pyro's data scaling (subsampled plates scaled to the full data) and masks
        (:func:`pyro_elbo_lab.sites.log_prob`, summed by
        :func:`pyro_elbo_lab.sites.sum_per_particle`).
    """
    S, mpn = traces.num_samples, traces.max_plate_nesting
    if traces.enumerated:
        return _marginal_log_joint(traces), _total(traces.guide_trace, S, mpn)
    return _total(traces.model_trace, S, mpn), _total(traces.guide_trace, S, mpn)


def _total(trace: Trace, S: int, mpn: int) -> torch.Tensor:
    terms = [
        sites.sum_per_particle(sites.log_prob(site), S, mpn)
        for site in trace.nodes.values()
        if site["type"] == "sample"
    ]
    return functools.reduce(operator.add, terms) if terms else torch.zeros(S)


def _pyro_dims(packed_tensor: torch.Tensor) -> str:
    """The dim symbols :func:`pyro.ops.packed.pack` attaches to a packed tensor."""
    return packed_tensor._pyro_dims  # type: ignore[attr-defined]  # set at run time by Pyro's packing; not in torch's stubs


def _marginal_log_joint(traces: ImportanceTraces) -> torch.Tensor:
    """
    ``log p(x, z_s)`` with the sites enumerated in the model summed out exactly, shape
    ``(S,)``: the factors that depend on an enumeration dim are contracted with Pyro's
    :func:`pyro.ops.contract.contract_to_tensor` (log-sum-exp over enumerated values,
    sum over plates) down to the sample plate, as ``TraceEnum_ELBO`` does; the others are
    summed as usual. Masks apply inside the sum over enumerated values.

    :raises ValueError: if a factor that depends on an enumerated site has a scale
        (subsampling or ``poutine.scale``): not supported.
    """
    from pyro.ops import packed
    from pyro.ops.contract import contract_to_tensor
    from pyro.ops.rings import LogRing

    S, mpn = traces.num_samples, traces.max_plate_nesting
    trace = traces.model_trace
    trace.pack_tensors()
    sample_symbol = trace.plate_to_symbol[SAMPLE_PLATE]
    plate_symbols = set(trace.plate_to_symbol.values())
    enum_dims: set[str] = set()
    for site in trace.nodes.values():
        if site["type"] == "sample" and (site["infer"] or {}).get("_enumerate_dim") is not None:
            enum_dims.update(d for d in _pyro_dims(site["packed"]["unscaled_log_prob"]) if d not in plate_symbols)
    rest = []
    tree: OrderedDict[frozenset[str], list[torch.Tensor]] = OrderedDict()
    for name, site in trace.nodes.items():
        if site["type"] != "sample":
            continue
        log_prob = site["packed"]["unscaled_log_prob"]
        if enum_dims.isdisjoint(_pyro_dims(log_prob)):
            rest.append(sites.sum_per_particle(sites.log_prob(site), S, mpn))
            continue
        scale = site["scale"]
        if torch.is_tensor(scale) or scale != 1.0:
            raise ValueError(
                f"site '{name}' depends on a site enumerated in the model and has scale {scale!r} (a subsampled "
                "plate or poutine.scale): the evidence of an enumerated model is only computed without scaling; "
                "pass the full data, or sample the enumerated site in the guide."
            )
        factor = packed.scale_and_mask(log_prob, mask=site["packed"]["mask"])
        ordinal = frozenset(trace.plate_to_symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        tree.setdefault(ordinal, []).append(factor)
    marginal = contract_to_tensor(tree, enum_dims, target_ordinal=frozenset({sample_symbol}), ring=LogRing())
    if sample_symbol in _pyro_dims(marginal):
        marginal = marginal.reshape(-1)
    marginal = marginal.expand(S) if marginal.numel() == 1 else marginal
    return marginal + sum(rest) if rest else marginal
