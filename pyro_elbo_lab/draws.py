# SPDX-License-Identifier: Apache-2.0
"""
Draws from a fitted guide as NumPy arrays laid out for ArviZ, in vectorised batches.

:func:`draw_guide` takes the draws of one chain for the converter
(:mod:`pyro_elbo_lab.inference_data`): one guide trace and one replayed model trace per
batch over the sample plate of :mod:`pyro_elbo_lab.diagnostics.traces` (no Python loop
over draws), each batch's values copied into output arrays allocated once, so the peak
memory is one batch's traces plus the output. For several chains the output holds every
chain, ``(chains, S, ...)``, allocated once (:class:`GuideDraws` with ``num_chains``), and
each chain's call fills its slice: no copy to stack chains. Batch sizes follow the rule of
:func:`~pyro_elbo_lab.estimate_evidence` (:func:`pyro_elbo_lab.diagnostics.local.plan`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask

from .diagnostics.local import batches, plan
from .diagnostics.traces import SAMPLE_PLATE, ImportanceTraces, log_joint_and_guide, vectorized_traces

__all__ = ["DRAWN_GROUPS", "GuideDraws", "draw_guide", "to_numpy"]

#: The groups :func:`draw_guide` fills, each ``{variable: array with the draws first}``.
DRAWN_GROUPS = ("posterior", "log_likelihood", "posterior_predictive", "sample_stats")


@dataclass
class GuideDraws:
    """
    The draws of one chain, or of ``num_chains`` chains, as NumPy arrays. Shapes below are
    for one chain (``num_chains=None``); with ``num_chains = C`` every drawn array has the
    chain dim first, ``(C, S, ...)`` (``observed_data`` has neither).

    :ivar dict posterior: per latent (and ``pyro.deterministic``) site of the model, its
        draws, shape ``(S, *plates kept, *event)``.
    :ivar dict log_likelihood: per observed site, the pointwise unscaled, masked
        :math:`\\log p(x_i \\mid z_s)` in nats, shape ``(S, *plates kept)``.
    :ivar dict observed_data: per observed site, the data, shape ``(*plates kept, *event)``.
    :ivar dict posterior_predictive: per observed site, replicated data, shape
        ``(S, *plates kept, *event)`` (empty unless asked for).
    :ivar dict sample_stats: ``log_joint`` (and ``lp``), ``log_guide`` and
        ``log_importance_weight`` per draw, shape ``(S,)``, nats, float64.
    :ivar dict dims: per site, the names of its dims after the draw dim (plates by name,
        others ``<site>_dim_<i>``).
    :ivar int num_chains: ``None`` for one chain's arrays ``(S, ...)``; else the number of
        chains ``C`` of arrays ``(C, S, ...)`` that :func:`draw_guide` fills one chain at a
        time (``out=``, ``chain=``).
    """

    posterior: dict[str, np.ndarray] = field(default_factory=dict)
    log_likelihood: dict[str, np.ndarray] = field(default_factory=dict)
    observed_data: dict[str, np.ndarray] = field(default_factory=dict)
    posterior_predictive: dict[str, np.ndarray] = field(default_factory=dict)
    sample_stats: dict[str, np.ndarray] = field(default_factory=dict)
    dims: dict[str, list[str]] = field(default_factory=dict)
    num_chains: int | None = None

    def group(self, name: str) -> dict[str, np.ndarray]:
        """One group by its ArviZ name (``"posterior"``, ...)."""
        value: dict[str, np.ndarray] = getattr(self, name)
        return value


def draw_guide(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    *,
    num_samples: int,
    batch_size: int | None = None,
    max_plate_nesting: int | None = None,
    posterior_predictive: bool = False,
    out: GuideDraws | None = None,
    chain: int = 0,
) -> GuideDraws:
    """
    ``num_samples`` draws from the guide (the parameters in Pyro's parameter store) with
    the model replayed against them, in vectorised batches of ``batch_size`` draws, under
    :func:`torch.no_grad`.

    Each batch is a fresh set of draws (the global torch RNG advances), so the draws are
    independent whatever the batch size; the same seed with another batch size gives other,
    equally distributed, draws.

    :param model: a Pyro model.
    :param guide: a Pyro guide (fitted).
    :param tuple args: model/guide positional arguments (the full data).
    :param dict kwargs: model/guide keyword arguments, checked by the caller.
    :param int num_samples: ``S >= 1`` draws.
    :param int batch_size: draws per vectorised trace; ``None``: as
        :func:`~pyro_elbo_lab.estimate_evidence` (about :math:`2^{24}` value and log_prob
        entries per batch, from one probing pass).
    :param int max_plate_nesting: the model's plate depth; guessed when ``None``.
    :param bool posterior_predictive: also replicate the observed sites.
    :param GuideDraws out: where to write the draws: ``None``, a new one-chain
        :class:`GuideDraws` (arrays ``(S, ...)``); or a :class:`GuideDraws` with
        ``num_chains = C`` whose arrays ``(C, S, ...)`` are allocated at the first batch drawn
        into it and filled at ``[chain]`` (peak memory: one batch's traces plus the output of
        every chain).
    :param int chain: the chain ``0 <= chain < C`` of ``out`` to fill (ignored for one chain).
    :returns: ``out``, or the new :class:`GuideDraws`.
    :rtype: GuideDraws
    :raises ValueError: for a ``chain`` outside ``out``'s chains; a model without sample
        sites; a site with batch dimensions left of its plates (pass ``max_plate_nesting``);
        a site whose shape, or whose presence, changes between batches; observed data that
        change between batches (a subsampled plate: pass the full data); and as
        :func:`~pyro_elbo_lab.diagnostics.traces.vectorized_traces`.
    """
    if out is None:
        out = GuideDraws()
    elif out.num_chains is not None and not 0 <= chain < out.num_chains:
        raise ValueError(
            f"chain must be in 0 .. {out.num_chains - 1} (out holds {out.num_chains} chains), got chain={chain}; "
            "pass the position of the chain to fill"
        )
    with torch.no_grad():
        max_plate_nesting, batch_size = plan(model, guide, args, kwargs, max_plate_nesting, batch_size)
    start = 0
    for n in batches(num_samples, batch_size):
        with torch.no_grad():
            traces = vectorized_traces(model, guide, args, kwargs, n, max_plate_nesting)
            predictive = _replicate(model, traces, args, kwargs) if posterior_predictive else None
            batch = _batch_draws(traces, predictive)
        if not out.sample_stats:  # the first batch drawn into out: allocate every chain's arrays
            _allocate(out, batch, num_samples)
        _store(out, batch, start, n, chain)
        start += n
    return out


def _replicate(model: Callable[..., Any], traces: ImportanceTraces, args: tuple, kwargs: dict) -> poutine.Trace:
    """The model with its observed sites resampled, replayed against the batch's guide draws."""
    plate = pyro.plate(SAMPLE_PLATE, traces.num_samples, dim=-(traces.max_plate_nesting + 1))
    with poutine.block(), plate:
        return poutine.trace(poutine.uncondition(poutine.replay(model, trace=traces.guide_trace))).get_trace(
            *args, **kwargs
        )


def _batch_draws(traces: ImportanceTraces, predictive: poutine.Trace | None) -> GuideDraws:
    """One batch's draws, shaped for ArviZ (the draw dim first, of the batch's size)."""
    S, mpn = traces.num_samples, traces.max_plate_nesting
    log_p, log_q = log_joint_and_guide(traces)
    out = GuideDraws()
    for name, site in traces.model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        deterministic = (site["infer"] or {}).get("_deterministic", False)
        fn: Any = site["fn"]
        event_dim: int = fn.event_dim
        if deterministic:
            # pyro.deterministic's Delta counts every dim of the value as an event dim;
            # the value is batched over the sample plate like the latents it comes from
            event_dim = max(0, torch.as_tensor(site["value"]).dim() - (mpn + 1))
        if not site["is_observed"] or deterministic:
            out.posterior[name], out.dims[name] = _shape_draws(name, site["value"], site, S, mpn, event_dim)
            continue
        # the site's mask applies (masked points contribute 0), its scale does not
        ll = scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
        # the data, its replicas and the pointwise log-likelihood share the plate dims;
        # the data's event dims come after them and get ArviZ's default names
        out.log_likelihood[name], out.dims[name] = _shape_draws(name, ll, site, S, mpn, 0)
        out.observed_data[name] = _shape_observed(site["value"], site, mpn, event_dim)
        if predictive is not None:
            replica = predictive.nodes[name]
            out.posterior_predictive[name], _ = _shape_draws(name, replica["value"], replica, S, mpn, event_dim)
    if not out.posterior and not out.log_likelihood:
        raise ValueError("the model has no sample sites: there is nothing to draw")
    lp = log_p.detach().cpu().numpy().astype("float64")
    lq = log_q.detach().cpu().numpy().astype("float64")
    # the log weights in the dtype they were computed in: PSIS allows for that dtype's rounding
    # (an exact float32 guide's weights are constant only to float32 rounding)
    lw = (log_p - log_q).detach().cpu().numpy()
    out.sample_stats = {"log_joint": lp, "lp": lp, "log_guide": lq, "log_importance_weight": lw}
    return out


def _allocate(out: GuideDraws, first: GuideDraws, num_samples: int) -> None:
    """Output arrays for every variable of the first batch, ``num_samples`` draws long (per chain)."""
    out.dims = first.dims
    out.observed_data = first.observed_data
    lead = (num_samples,) if out.num_chains is None else (out.num_chains, num_samples)
    for group in DRAWN_GROUPS:
        for name, value in first.group(group).items():
            out.group(group)[name] = np.empty(lead + value.shape[1:], dtype=value.dtype)


def _store(out: GuideDraws, batch: GuideDraws, start: int, n: int, chain: int) -> None:
    """Copy one batch into the output arrays at draws ``start .. start + n`` (of ``chain``)."""
    index: tuple[Any, ...] = (slice(start, start + n),)
    if out.num_chains is not None:
        index = (chain,) + index
    for group in DRAWN_GROUPS:
        target, values = out.group(group), batch.group(group)
        if set(values) != set(target):
            changed = sorted(set(values) ^ set(target))
            raise ValueError(
                f"site(s) {changed} appear in some batches of draws and not in others ({group}): the model's or "
                "guide's sites depend on the draws (stochastic control flow); to_inference_data needs the same "
                "sites in every draw"
            )
        for name, value in values.items():
            shape = target[name].shape[len(index) :]
            if value.shape[1:] != shape:
                raise ValueError(
                    f"site '{name}' has shape {value.shape[1:]} per draw in one batch and {shape} in another "
                    f"({group}): its shape depends on the draws; to_inference_data needs one shape"
                )
            target[name][index] = value
    for name, value in batch.observed_data.items():
        if not np.array_equal(value, out.observed_data[name], equal_nan=value.dtype.kind == "f"):
            raise ValueError(
                f"observed site '{name}' holds other data in another batch of draws: a subsampled plate "
                "(subsample_size) draws another minibatch per trace; pass the full data without subsampling"
            )


def _plate_names(site: Any) -> dict[int, str]:
    return {frame.dim: frame.name for frame in site["cond_indep_stack"] if frame.vectorized and frame.dim is not None}


def _shape_draws(name: str, value: Any, site: Any, S: int, mpn: int, event_dim: int) -> tuple[np.ndarray, list[str]]:
    """``value`` with the sample plate at dim ``-(mpn + 1 + event_dim)`` → ``(S, *kept, *event)``."""
    value = torch.as_tensor(value)
    needed = mpn + 1 + event_dim
    if value.dim() < needed:
        value = value.reshape((1,) * (needed - value.dim()) + value.shape)
    elif value.dim() > needed:
        raise ValueError(
            f"site '{name}' has shape {tuple(value.shape)}: batch dimensions left of the {mpn} plate dimension(s) "
            "and the sample plate; pass the model's max_plate_nesting"
        )
    value = value.expand((S,) + value.shape[1:])
    plates = _plate_names(site)
    keep, names, k = [0], [], 0
    for j in range(mpn):
        dim = -(mpn - j)
        size = value.shape[1 + j]
        if dim in plates:
            keep.append(1 + j)
            names.append(plates[dim])
        elif size > 1:
            keep.append(1 + j)
            names.append(f"{name}_dim_{k}")
            k += 1
    for i in range(event_dim):
        keep.append(1 + mpn + i)
        names.append(f"{name}_dim_{k}")
        k += 1
    squeeze = tuple(d for d in range(1, 1 + mpn) if d not in keep)
    if squeeze:
        value = value.squeeze(squeeze)
    return to_numpy(value), names


def _shape_observed(value: Any, site: Any, mpn: int, event_dim: int) -> np.ndarray:
    """The observed value, its batch dims aligned with the plates → ``(*kept, *event)``."""
    value = torch.as_tensor(value)
    needed = mpn + event_dim
    if value.dim() < needed:
        value = value.reshape((1,) * (needed - value.dim()) + value.shape)
    elif value.dim() > needed:
        # data broadcast to the sample plate (identical along it): keep one copy
        value = value[(0,) * (value.dim() - needed)]
    plates = _plate_names(site)
    keep = [j for j in range(mpn) if -(mpn - j) in plates or value.shape[j] > 1]
    keep += [mpn + i for i in range(event_dim)]
    squeeze = tuple(d for d in range(mpn) if d not in keep)
    if squeeze:
        value = value.squeeze(squeeze)
    return to_numpy(value)


def to_numpy(value: Any) -> np.ndarray:
    """A tensor (detached, on the CPU) or array-like as a NumPy array."""
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)
