# SPDX-License-Identifier: Apache-2.0
"""
ArviZ :class:`~arviz.InferenceData` for variational fits.

``az.from_pyro`` reads MCMC internals and does not apply to SVI. :func:`to_inference_data`
draws from the guide in one vectorised pass (:func:`~pyro_elbo_lab.diagnostics.traces.vectorized_traces`)
and builds the groups ArviZ's diagnostics read: ``posterior`` (guide draws),
``log_likelihood`` (pointwise, so ``az.loo`` / ``az.waic`` work), ``observed_data``,
``constant_data``, ``posterior_predictive`` on request, ``sample_stats`` with each draw's
:math:`\\log p(x, z_s)`, :math:`\\log q(z_s)` and log importance weight (so PSIS
diagnostics and importance-corrected estimates can be computed from the file alone),
and the optimisation history of an :class:`~pyro_elbo_lab.SVIResult` in its own group,
``optimization_history``, with a ``step`` dimension.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch

import pyro
import pyro.poutine as poutine
from pyro.distributions.util import scale_and_mask

from .diagnostics.evidence import _verdict

__all__ = ["to_inference_data", "history_to_dataset", "summarize", "HISTORY_GROUP"]

#: Name of the InferenceData group holding the optimisation history.
HISTORY_GROUP = "optimization_history"

# options of to_inference_data, told apart from model keyword arguments by SVIResult
_OPTION_NAMES = ("coords", "dims", "constant_data", "posterior_predictive", "max_plate_nesting", "history")


def to_inference_data(
    model,
    guide,
    *args,
    num_samples: int = 1000,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    constant_data: Mapping[str, Any] | None = None,
    posterior_predictive: bool = False,
    max_plate_nesting: int | None = None,
    history=None,
    _result=None,
    **kwargs,
):
    """
    Draw from a fitted guide and return an :class:`arviz.InferenceData`.

    Groups:

    - ``posterior``: the guide's draws of every latent site of the model (and
      ``pyro.deterministic`` sites), dims ``(chain, draw, *plates, *event)``; plate
      dimensions are named after their plates, others ``<site>_dim_<i>``.
    - ``log_likelihood``: per observed site, the pointwise :math:`\\log p(x_i \\mid z_s)`
      (unscaled: no subsampling scale or ``poutine.scale``; masked: a data point
      masked out by ``poutine.mask`` or the site's ``mask`` contributes 0, as in the
      model's ``log_prob``), dims ``(chain, draw, *plates)``; event dims of the
      observation are summed (one value per data point).
    - ``observed_data``: the observed values; ``constant_data``: as given.
    - ``posterior_predictive`` (``posterior_predictive=True``): replicated data from the
      model with the observed sites resampled, for the same draws.
    - ``sample_stats``: per draw ``log_joint`` :math:`\\log p(x, z_s)` (also as ``lp``),
      ``log_guide`` :math:`\\log q(z_s)` and ``log_importance_weight``
      :math:`\\log w_s = \\log p(x, z_s) - \\log q(z_s)`, in nats with Pyro's data
      scaling.
    - ``optimization_history``: ``history`` (an :class:`~pyro_elbo_lab.SVIResult` or its
      history DataFrame) with dims ``(chain, step)``, per-site terms as
      ``<term>_per_site`` with a ``site`` dimension.

    The draws use the parameters in Pyro's parameter store (for an ``SVIResult``,
    each chain's parameters in turn).

    :param model: a Pyro model.
    :param guide: a Pyro guide (fitted).
    :param args: model/guide arguments (the full data, not a minibatch).
    :param int num_samples: draws per chain.
    :param dict coords: coordinates per dimension name, overriding the defaults.
    :param dict dims: ``{variable: [dim names]}`` (dims after ``chain, draw``; for an
        observed site its plate dims, shared by ``log_likelihood``, ``observed_data`` and
        ``posterior_predictive``), overriding the plate names; trailing dims left
        unnamed get ArviZ's default names.
    :param dict constant_data: the ``constant_data`` group.
    :param bool posterior_predictive: add the ``posterior_predictive`` group.
    :param int max_plate_nesting: the model's plate depth; guessed when None.
    :param history: an :class:`~pyro_elbo_lab.SVIResult` or a history DataFrame.
    :param kwargs: model/guide keyword arguments.
    :rtype: arviz.InferenceData
    :raises ValueError: for a bad ``num_samples``, ``dims`` naming more dimensions than
        a variable has, a model without sample sites, a site with batch dimensions left
        of its plates (pass ``max_plate_nesting``), or a ``history`` that is not an
        ``SVIResult`` or history DataFrame.

    References

    [1] `ArviZ a unified library for exploratory analysis of Bayesian models in Python`,
        Ravin Kumar, Colin Carroll, Ari Hartikainen, Osvaldo Martin (2019)

    [2] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew
        Gelman, Yuling Yao, Jonah Gabry (2024)
    """
    import arviz as az

    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if _result is not None and history is None:
        history = _result

    if _result is not None:  # each chain's own final parameters, whatever the store holds now
        draws = []
        for chain in range(_result.num_chains):
            with _result.use_params(chain):
                draws.append(_draw(model, guide, args, kwargs, num_samples, max_plate_nesting, posterior_predictive))
    else:
        draws = [_draw(model, guide, args, kwargs, num_samples, max_plate_nesting, posterior_predictive)]

    first = draws[0]

    def stack(group):
        return {name: np.stack([d[group][name] for d in draws]) for name in first[group]}

    all_dims = dict(first["dims"])
    if dims:
        for name, names in dims.items():
            all_dims[name] = list(names)
    for group in ("posterior", "log_likelihood", "posterior_predictive"):
        for name, value in first[group].items():
            ndim = value.ndim - 1  # after the draw dim
            if name in all_dims and len(all_dims[name]) > ndim:
                raise ValueError(
                    f"dims[{name!r}] = {all_dims[name]!r} names {len(all_dims[name])} dimensions, but '{name}' has "
                    f"{ndim} after (chain, draw) (shape {value.shape[1:]}) in {group}; give at most one name per "
                    "dimension (unnamed trailing dimensions get ArviZ's default names)"
                )
    groups = {
        "posterior": stack("posterior"),
        "log_likelihood": stack("log_likelihood") or None,
        "sample_stats": stack("sample_stats"),
        "observed_data": first["observed_data"] or None,
        "constant_data": {k: _to_numpy(v) for k, v in constant_data.items()} if constant_data else None,
    }
    if posterior_predictive:
        groups["posterior_predictive"] = stack("posterior_predictive")
    idata = az.from_dict(**groups, coords=dict(coords or {}), dims=all_dims)
    if history is not None:
        idata.add_groups({HISTORY_GROUP: history_to_dataset(history)})
    return idata


def history_to_dataset(history):
    """
    The optimisation history as an :class:`xarray.Dataset` with dims ``(chain, step)``.

    Totals (``loss``, ``elbo``, ``kl``, ...) become ``(chain, step)`` variables; per-site
    columns ``"<term>/<site>"`` become ``<term>_per_site`` with dims
    ``(chain, step, site)`` (NaN where a term does not apply to a site). Chains of
    different lengths are padded with NaN.

    :param history: an :class:`~pyro_elbo_lab.SVIResult` or its ``history`` DataFrame.
    :rtype: xarray.Dataset
    """
    import pandas as pd
    import xarray as xr

    frame = getattr(history, "history", history)
    if not isinstance(frame, pd.DataFrame) or "step" not in frame.columns:
        raise ValueError(f"history must be an SVIResult or its history DataFrame (with a 'step' column), got {type(history)}")
    frame = frame.copy()
    if "chain" not in frame.columns:
        frame["chain"] = 0
    chains = sorted(frame["chain"].unique().tolist())
    steps = sorted(frame["step"].unique().tolist())
    frame = frame.set_index(["chain", "step"])
    full = pd.MultiIndex.from_product([chains, steps], names=["chain", "step"])
    frame = frame.reindex(full)

    per_site: dict[str, dict[str, str]] = {}
    totals = []
    for column in frame.columns:
        if "/" in column:
            term, site = column.split("/", 1)
            per_site.setdefault(term, {})[site] = column
        else:
            totals.append(column)
    sites = sorted({s for cols in per_site.values() for s in cols})
    shape = (len(chains), len(steps))
    data_vars = {}
    for column in totals:
        values = frame[column].to_numpy()
        if values.dtype == object or values.dtype == bool:
            values = pd.to_numeric(frame[column].astype("float64"), errors="coerce").to_numpy()
        data_vars[column] = (("chain", "step"), values.astype("float64").reshape(shape))
    for term, columns in per_site.items():
        values = np.full(shape + (len(sites),), np.nan)
        for j, site in enumerate(sites):
            if site in columns:
                values[..., j] = frame[columns[site]].to_numpy(dtype="float64").reshape(shape)
        data_vars[f"{term}_per_site"] = (("chain", "step", "site"), values)
    coords = {"chain": np.asarray(chains, dtype="int64"), "step": np.asarray(steps, dtype="int64")}
    if sites:
        coords["site"] = np.asarray(sites, dtype=str)
    return xr.Dataset(data_vars, coords=coords, attrs={"units": "nats", "description": "SVI optimisation history"})


# ------------------------------------------------------------------------------------------
# draws


def _draw(model, guide, args, kwargs, num_samples, max_plate_nesting, posterior_predictive) -> dict:
    from .diagnostics.traces import SAMPLE_PLATE, log_joint_and_guide, vectorized_traces

    S = num_samples
    with torch.no_grad():
        traces = vectorized_traces(model, guide, args, kwargs, S, max_plate_nesting)
        mpn = traces.max_plate_nesting
        log_p, log_q = log_joint_and_guide(traces)
        predictive = None
        if posterior_predictive:
            plate = pyro.plate(SAMPLE_PLATE, S, dim=-(mpn + 1))
            with poutine.block(), plate:
                predictive = poutine.trace(
                    poutine.uncondition(poutine.replay(model, trace=traces.guide_trace))
                ).get_trace(*args, **kwargs)

    out: dict[str, dict] = {
        "posterior": {},
        "log_likelihood": {},
        "observed_data": {},
        "posterior_predictive": {},
        "sample_stats": {},
        "dims": {},
    }
    dims = out["dims"]
    for name, site in traces.model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        deterministic = site["infer"].get("_deterministic", False)
        event_dim = site["fn"].event_dim
        if deterministic:
            # pyro.deterministic's Delta counts every dim of the value as an event dim;
            # the value is batched over the sample plate like the latents it comes from
            event_dim = max(0, torch.as_tensor(site["value"]).dim() - (mpn + 1))
        if not site["is_observed"] or deterministic:
            value, names = _shape_draws(name, site["value"], site, S, mpn, event_dim)
            out["posterior"][name] = value
            dims[name] = names
            continue
        # the site's mask applies (masked points contribute 0), its scale does not
        ll = scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])
        ll, ll_names = _shape_draws(name, ll, site, S, mpn, 0)
        out["log_likelihood"][name] = ll
        observed, _ = _shape_observed(name, site["value"], site, mpn, event_dim)
        out["observed_data"][name] = observed
        # the data, its replicas and the pointwise log-likelihood share the plate dims;
        # the data's event dims come after them and get ArviZ's default names
        dims[name] = ll_names
        if predictive is not None:
            replica = predictive.nodes[name]
            value, _ = _shape_draws(name, replica["value"], replica, S, mpn, event_dim)
            out["posterior_predictive"][name] = value
    if not out["posterior"] and not out["log_likelihood"]:
        raise ValueError("the model has no sample sites: there is nothing to draw")
    log_p = log_p.detach().cpu().numpy().astype("float64")
    log_q = log_q.detach().cpu().numpy().astype("float64")
    out["sample_stats"] = {
        "log_joint": log_p,
        "lp": log_p,
        "log_guide": log_q,
        "log_importance_weight": log_p - log_q,
    }
    return out


def _plate_names(name: str, site, mpn: int) -> dict[int, str]:
    return {frame.dim: frame.name for frame in site["cond_indep_stack"] if frame.vectorized and frame.dim is not None}


def _shape_draws(name, value, site, S, mpn, event_dim):
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
    plates = _plate_names(name, site, mpn)
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
    return _to_numpy(value), names


def _shape_observed(name, value, site, mpn, event_dim):
    """The observed value, its batch dims aligned with the plates → ``(*kept, *event)``."""
    value = torch.as_tensor(value)
    needed = mpn + event_dim
    if value.dim() < needed:
        value = value.reshape((1,) * (needed - value.dim()) + value.shape)
    elif value.dim() > needed:
        # data broadcast to the sample plate (identical along it): keep one copy
        value = value[(0,) * (value.dim() - needed)]
    plates = _plate_names(name, site, mpn)
    keep, names, k = [], [], 0
    for j in range(mpn):
        dim = -(mpn - j)
        if dim in plates:
            keep.append(j)
            names.append(plates[dim])
        elif value.shape[j] > 1:
            keep.append(j)
            names.append(f"{name}_dim_{k}")
            k += 1
    for i in range(event_dim):
        keep.append(mpn + i)
        names.append(f"{name}_dim_{k}")
        k += 1
    squeeze = tuple(d for d in range(mpn) if d not in keep)
    if squeeze:
        value = value.squeeze(squeeze)
    return _to_numpy(value), names


def _to_numpy(value) -> np.ndarray:
    if torch.is_tensor(value):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# ------------------------------------------------------------------------------------------
# summary


def _is_weights(idata, chain: int) -> np.ndarray:
    return np.asarray(idata.sample_stats["log_importance_weight"].isel(chain=chain).values, dtype="float64")


def _psis(log_weights) -> tuple[np.ndarray, float]:
    """
    Pareto-smoothed log weights and k̂ of one chain, with
    :func:`pyro_elbo_lab.diagnostics.evidence.psis_diagnostics` (``az.psislw``; k̂ =
    -inf for constant weights, NaN below 21 draws; no warnings: k̂ is reported).
    """
    from .diagnostics.evidence import psis_diagnostics

    smoothed, k = psis_diagnostics(torch.as_tensor(np.asarray(log_weights, dtype="float64")))
    return smoothed.numpy(), float(k)


def importance_diagnostics(log_weights: np.ndarray) -> dict[str, float]:
    """
    Importance-sampling diagnostics from one chain's log weights
    :math:`\\log w_s = \\log p(x, z_s) - \\log q(z_s)`, in nats.

    The same estimates as :func:`pyro_elbo_lab.estimate_evidence` with ``psis=True``,
    which is what :class:`~pyro_elbo_lab.SVIRunner`'s ``evaluate_every`` records
    (``eval_log_evidence``, ...): ``log_evidence``, its standard error and ``ess`` come
    from the Pareto-smoothed weights :math:`\\tilde w_s`, ``elbo`` from the raw ones.

    :param numpy.ndarray log_weights: shape ``(S,)``.
    :returns: ``log_evidence`` :math:`\\log \\frac1S \\sum_s \\tilde w_s` (PSIS-smoothed),
        its delta-method ``log_evidence_stderr``
        :math:`\\mathrm{sd}(\\tilde w) / (\\sqrt{S}\\,\\bar{\\tilde w})`, ``elbo``
        :math:`\\frac1S \\sum_s \\log w_s` (raw), ``gap`` (``log_evidence - elbo``, an
        estimate of :math:`\\mathrm{KL}(q \\| p(z \\mid x))`), ``pareto_k`` (from
        ``az.psislw``; ``-inf`` for constant weights, NaN below 21 draws), ``ess``
        :math:`1 / \\sum_s \\bar{\\tilde w}_s^2` of the smoothed normalised weights.
    :rtype: dict

    References

    [1] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew
        Gelman, Yuling Yao, Jonah Gabry (2024)

    [2] `Yes, but Did It Work?: Evaluating Variational Inference`, Yuling Yao, Aki
        Vehtari, Daniel Simpson, Andrew Gelman (2018)
    """
    from .diagnostics.evidence import _importance_stats, psis_diagnostics

    lw = torch.as_tensor(np.asarray(log_weights, dtype="float64"))
    smoothed, k = psis_diagnostics(lw)
    log_evidence, stderr, ess = (float(v) for v in _importance_stats(smoothed))
    elbo = float(lw.mean())
    return {
        "log_evidence": log_evidence,
        "log_evidence_stderr": stderr,
        "elbo": elbo,
        "gap": log_evidence - elbo,
        "pareto_k": float(k),
        "ess": ess,
    }


def psis_means(idata):
    """
    PSIS-corrected posterior means: per chain the self-normalised importance-sampling
    estimate :math:`\\sum_s \\bar{\\tilde w}_s z_s` with the Pareto-smoothed,
    normalised weights of ``sample_stats.log_importance_weight``, averaged over chains.
    Reliable where k̂ ≤ 0.7 (see :func:`importance_diagnostics`).

    :param arviz.InferenceData idata: from :func:`to_inference_data`, with posterior
        variables of shape ``(chain, draw, ...)``.
    :returns: the posterior group's variables without the ``chain`` and ``draw`` dims,
        in the units of each variable.
    :rtype: xarray.Dataset

    References

    [1] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew
        Gelman, Yuling Yao, Jonah Gabry (2024)
    """
    import xarray as xr

    post = idata.posterior
    chains = []
    for c in range(post.sizes["chain"]):
        smoothed, _ = _psis(_is_weights(idata, c))
        w = np.exp(smoothed - smoothed.max())
        w = xr.DataArray(w / w.sum(), dims=["draw"], coords={"draw": post["draw"].values})
        chains.append((post.isel(chain=c) * w).sum("draw"))
    return sum(chains[1:], chains[0]) / len(chains)


def summarize(idata, history=None, last: int = 50):
    """
    The report behind :meth:`pyro_elbo_lab.SVIResult.summary`, from an InferenceData
    made by :func:`to_inference_data` (and optionally the history).

    ``posterior``: ``az.summary`` of the guide's draws (``kind="all"`` with several
    chains, so with :math:`\\hat R` and ESS; ``"stats"`` with one) with a ``psis_mean``
    column (:func:`psis_means`) beside the raw ``mean``. ``vi``: one row per chain with
    the history's ``elbo``, ``reconstruction``, ``kl``, ``entropy`` (or ``loss``)
    averaged over its last ``last`` steps, the :func:`importance_diagnostics` of the
    chain's log weights (``log_evidence`` and its standard error and ``ess``
    PSIS-smoothed, as the runner's ``eval_*`` columns; ``gap``; ``pareto_k``), the
    ``verdict`` of k̂ (``"good"``, ``"ok"``, ``"bad"``, ``"unknown"``) and the largest
    posterior :math:`\\hat R` (NaN for one chain). Values in nats.

    :param arviz.InferenceData idata: from :func:`to_inference_data`.
    :param history: an :class:`~pyro_elbo_lab.SVIResult` or its history DataFrame.
    :param int last: steps averaged for the ELBO terms.
    :rtype: pyro_elbo_lab.runner.SVISummary
    :raises ValueError: if ``last`` is not a positive integer.

    References

    [1] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew
        Gelman, Yuling Yao, Jonah Gabry (2024)

    [2] `Rank-normalization, folding, and localization: An improved R-hat for assessing
        convergence of MCMC`, Aki Vehtari, Andrew Gelman, Daniel Simpson, Bob Carpenter,
        Paul-Christian Bürkner (2021)
    """
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise ValueError(f"last must be a positive integer number of steps, got {last!r}")
    import arviz as az
    import pandas as pd
    from arviz.labels import BaseLabeller
    from arviz.sel_utils import xarray_var_iter

    from .runner import SVISummary

    num_chains = idata.posterior.sizes["chain"]
    posterior = az.summary(idata, kind="all") if num_chains > 1 else az.summary(idata, kind="stats")
    means = psis_means(idata)
    labeller = BaseLabeller()
    corrected = {
        labeller.make_label_flat(var, sel, isel): float(values)
        for var, sel, isel, values in xarray_var_iter(means, combined=True)
    }
    posterior.insert(posterior.columns.get_loc("mean") + 1, "psis_mean", [corrected.get(i, np.nan) for i in posterior.index])
    r_hat = float(posterior["r_hat"].max()) if "r_hat" in posterior.columns else math.nan

    frame = getattr(history, "history", history)
    rows = []
    for c in range(num_chains):
        row: dict[str, Any] = {"chain": c}
        if frame is not None and len(frame):
            h = frame[frame["chain"] == c] if "chain" in frame.columns else frame
            tail = h.tail(last)
            for column in ("elbo", "reconstruction", "kl", "entropy"):
                if column in tail.columns:
                    row[column] = float(tail[column].mean())
            if "elbo" not in row and "loss" in tail.columns:
                row["loss"] = float(tail["loss"].mean())
        diag = importance_diagnostics(_is_weights(idata, c))
        row.update({k: diag[k] for k in ("log_evidence", "log_evidence_stderr", "gap", "pareto_k")})
        row["verdict"] = _verdict(diag["pareto_k"])
        row["ess"] = diag["ess"]
        row["r_hat"] = r_hat
        rows.append(row)
    vi = pd.DataFrame(rows).set_index("chain")
    return SVISummary(posterior=posterior, vi=vi)
