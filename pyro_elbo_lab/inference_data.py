# SPDX-License-Identifier: Apache-2.0
"""
The converter: a variational fit as ArviZ data.

``az.from_pyro`` reads MCMC internals and does not apply to SVI. :func:`to_inference_data`
draws from the guide in vectorised batches (:func:`pyro_elbo_lab.draws.draw_guide`)
and builds the groups ArviZ's diagnostics read: ``posterior`` (guide draws),
``log_likelihood`` (pointwise, so ``az.loo`` works), ``observed_data``,
``constant_data``, ``posterior_predictive`` on request, ``sample_stats`` with each draw's
:math:`\\log p(x, z_s)`, :math:`\\log q(z_s)` and log importance weight (so PSIS
diagnostics and importance-corrected estimates can be computed from the file alone),
and the optimisation history in its own group, ``optimization_history``, with a ``step``
dimension. :func:`from_svi_result` does the same for every chain of an
:class:`~pyro_elbo_lab.SVIResult`.

The result is built once as an :class:`xarray.DataTree`: ArviZ 1.x gets it as is, ArviZ
0.2x as an ``InferenceData`` (:func:`pyro_elbo_lab.arviz_compat.finalize`). This module
calls ArviZ only through :mod:`pyro_elbo_lab.arviz_compat`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import arviz_compat
from .checks import check_int, check_model_kwargs
from .draws import GuideDraws, draw_guide, to_numpy

if TYPE_CHECKING:
    import xarray as xr

    from .diagnostics.moments import GuideMoments

__all__ = [
    "HISTORY_GROUP",
    "MOMENTS_GROUP",
    "from_svi_result",
    "history_to_dataset",
    "moments_to_dataset",
    "to_inference_data",
]

#: Name of the group holding the optimisation history.
HISTORY_GROUP = "optimization_history"

#: Name of the group holding the guide's moments against the PSIS-corrected ones.
MOMENTS_GROUP = "guide_moments"

_GROUPS_DOC = """
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
    - ``optimization_history``: the history (see :func:`history_to_dataset`) with dims
      ``(chain, step)``, per-site terms as ``<term>_per_site`` with a ``site`` dimension;
      from an ``SVIResult``, per chain ``converged``, ``convergence_reason`` and
      ``stop_reason``.
    - ``guide_moments``: per chain and posterior element, the guide's mean and sd beside
      the PSIS-corrected ones with their MCSE, the estimated standardised mean error and
      sd ratio where k̂ ≤ the threshold, and the verdicts (see :func:`moments_to_dataset`),
      computed from the ``posterior`` draws and their log importance weights.
"""


def to_inference_data(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    model_kwargs: dict | None = None,
    num_samples: int = 1000,
    batch_size: int | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    constant_data: Mapping[str, Any] | None = None,
    posterior_predictive: bool = False,
    max_plate_nesting: int | None = None,
    history: Any = None,
) -> Any:
    """
    Draw from a fitted guide (the parameters in Pyro's parameter store) and return the
    fit as ArviZ data: an ``arviz.InferenceData`` on ArviZ 0.2x, an
    :class:`xarray.DataTree` on ArviZ 1.x, with one chain.
    {groups}
    :param model: a Pyro model.
    :param guide: a Pyro guide (fitted).
    :param args: model/guide positional arguments (the full data, not a minibatch).
    :param dict model_kwargs: model/guide keyword arguments (any names, ``dims`` and
        ``num_samples`` included: they go to the model).
    :param int num_samples: draws per chain.
    :param int batch_size: draws per vectorised trace (``>= 1``); ``None``: automatic, as
        :func:`~pyro_elbo_lab.estimate_evidence` (one probing pass; batches of about
        :math:`2^{{24}}` value and log_prob entries). Peak memory is one batch's traces plus
        the output arrays; the draws are independent whatever the batch size.
    :param dict coords: coordinates per dimension name, overriding the defaults.
    :param dict dims: ``{{variable: [dim names]}}`` (dims after ``chain, draw``; for an
        observed site its plate dims, shared by ``log_likelihood``, ``observed_data`` and
        ``posterior_predictive``), overriding the plate names; trailing dims left
        unnamed get ArviZ's default names.
    :param dict constant_data: the ``constant_data`` group.
    :param bool posterior_predictive: add the ``posterior_predictive`` group.
    :param int max_plate_nesting: the model's plate depth; guessed when None.
    :param history: an :class:`~pyro_elbo_lab.SVIResult` or a history DataFrame for the
        ``optimization_history`` group.
    :rtype: arviz.InferenceData or xarray.DataTree
    :raises ValueError: for a bad ``num_samples``, ``batch_size`` or ``model_kwargs``, ``dims`` naming more
        dimensions than a variable has, a model without sample sites, a site with batch
        dimensions left of its plates (pass ``max_plate_nesting``), or a ``history`` that
        is not an ``SVIResult`` or history DataFrame.

    References

    [1] `ArviZ a unified library for exploratory analysis of Bayesian models in Python`,
        Ravin Kumar, Colin Carroll, Ari Hartikainen, Osvaldo Martin (2019)

    [2] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew
        Gelman, Yuling Yao, Jonah Gabry (2024)
    """
    kwargs = check_model_kwargs(model_kwargs)
    check_int("num_samples", num_samples, 1, hint="the number of draws from the guide")
    check_int("batch_size", batch_size, 1, allow_none=True, hint="the number of draws per vectorised trace")
    draws = draw_guide(
        model,
        guide,
        args,
        kwargs,
        num_samples=num_samples,
        batch_size=batch_size,
        max_plate_nesting=max_plate_nesting,
        posterior_predictive=posterior_predictive,
    )
    return _build(draws, coords, dims, constant_data, posterior_predictive, history)


def from_svi_result(
    result: Any,
    *args: Any,
    model_kwargs: dict | None = None,
    num_samples: int = 1000,
    batch_size: int | None = None,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
    constant_data: Mapping[str, Any] | None = None,
    posterior_predictive: bool = False,
    max_plate_nesting: int | None = None,
    history: Any = None,
) -> Any:
    """
    An :class:`~pyro_elbo_lab.SVIResult` as ArviZ data: each runner chain's guide, with
    that chain's final parameters (:meth:`~pyro_elbo_lab.SVIResult.use_params`), gives
    one ArviZ chain of ``num_samples`` draws; the run's history is the
    ``optimization_history`` group. Groups as :func:`to_inference_data`. The
    ``(chain, draw, ...)`` arrays are allocated once and each chain's draws written into
    them: peak memory is one batch's traces plus the output.

    Reads only the result's public data: ``model``, ``guide``, ``num_chains``,
    ``use_params(chain)``, ``args``, ``model_kwargs`` and ``history``.

    :param result: a fitted :class:`~pyro_elbo_lab.SVIResult`.
    :param args: the model's positional data; default the run's own (``result.args``;
        after a minibatch run there is none: pass the full data).
    :param dict model_kwargs: the model's keyword data; default the run's own
        (``result.model_kwargs``).
    :param num_samples: and the other options: as :func:`to_inference_data`;
        ``history`` defaults to ``result``'s.
    :rtype: arviz.InferenceData or xarray.DataTree
    :raises ValueError: after a minibatch run without data given; and as
        :func:`to_inference_data`.
    """
    if model_kwargs is None:
        model_kwargs = result.model_kwargs
    kwargs = check_model_kwargs(model_kwargs)
    if not args:
        if result.args is None:
            raise ValueError(
                "this result was fitted on minibatches, so it has no data of its own: pass the full data, "
                "e.g. from_svi_result(result, x_full)"
            )
        args = tuple(result.args)
    check_int("num_samples", num_samples, 1, hint="the number of draws per chain")
    check_int("batch_size", batch_size, 1, allow_none=True, hint="the number of draws per vectorised trace")
    # every chain's arrays (chains, S, ...) allocated once, each chain's draws written into its slice
    draws = GuideDraws(num_chains=result.num_chains)
    for chain in range(result.num_chains):  # each chain's own final parameters
        with result.use_params(chain):
            draw_guide(
                result.model,
                result.guide,
                args,
                kwargs,
                num_samples=num_samples,
                batch_size=batch_size,
                max_plate_nesting=max_plate_nesting,
                posterior_predictive=posterior_predictive,
                out=draws,
                chain=chain,
            )
    return _build(draws, coords, dims, constant_data, posterior_predictive, result if history is None else history)


if to_inference_data.__doc__:  # None under python -OO
    to_inference_data.__doc__ = to_inference_data.__doc__.format(groups=_GROUPS_DOC)


def _build(
    draws: GuideDraws,
    coords: Mapping[str, Any] | None,
    dims: Mapping[str, list[str]] | None,
    constant_data: Mapping[str, Any] | None,
    posterior_predictive: bool,
    history: Any,
) -> Any:
    """One DataTree from the draws (one chain, or every chain's arrays), then the installed ArviZ's type."""

    def stack(group: str) -> dict[str, np.ndarray]:
        if draws.num_chains is None:  # a view with the chain dim in front, no copy
            return {name: value[np.newaxis] for name, value in draws.group(group).items()}
        return dict(draws.group(group))  # (chains, S, ...) already: no copy

    lead = 1 if draws.num_chains is None else 2  # the draw dim, or the chain and draw dims
    all_dims = dict(draws.dims)
    known = set(draws.dims) | set(constant_data or {})
    unknown = sorted(set(dims or {}) - known, key=str)
    if unknown:
        raise ValueError(
            f"dims names {unknown!r}, which are not sample sites of the model nor constant_data "
            f"keys; the sites are {sorted(draws.dims)!r}: key dims by one of these names"
        )
    for name, names in (dims or {}).items():
        all_dims[name] = list(names)
    for group in ("posterior", "log_likelihood", "posterior_predictive"):
        for name, value in draws.group(group).items():
            ndim = value.ndim - lead  # after the (chain and) draw dims
            if name in all_dims and len(all_dims[name]) > ndim:
                raise ValueError(
                    f"dims[{name!r}] = {all_dims[name]!r} names {len(all_dims[name])} dimensions, but '{name}' has "
                    f"{ndim} after (chain, draw) (shape {value.shape[lead:]}) in {group}; give at most one name per "
                    "dimension (unnamed trailing dimensions get ArviZ's default names)"
                )
    groups = {
        "posterior": stack("posterior"),
        "log_likelihood": stack("log_likelihood"),
        "sample_stats": stack("sample_stats"),
        "observed_data": draws.observed_data,
        "constant_data": {k: to_numpy(v) for k, v in (constant_data or {}).items()},
    }
    if posterior_predictive:
        groups["posterior_predictive"] = stack("posterior_predictive")
    tree = arviz_compat.from_dict(groups, coords=coords, dims=all_dims)
    _name_event_dims(tree, all_dims)
    import xarray as xr

    from .diagnostics.moments import moments_from_inference_data

    if groups["posterior"]:  # a model without latent sites has no moments
        tree[MOMENTS_GROUP] = xr.DataTree(moments_to_dataset(moments_from_inference_data(tree)))
    if history is not None:
        tree[HISTORY_GROUP] = xr.DataTree(history_to_dataset(history))
    return arviz_compat.finalize(tree)


def _name_event_dims(tree: xr.DataTree, dims: Mapping[str, list[str]]) -> None:
    """
    The observed data's event dims (left unnamed: ``log_likelihood`` shares the plate
    dims but has no event dims) as ``<site>_dim_<position>`` on both ArviZ generations
    (ArviZ 1.x would count only the unnamed dims).
    """
    import xarray as xr

    for group, skip in (("observed_data", 0), ("posterior_predictive", 2)):
        if group not in tree.children:
            continue
        dataset = tree[group].to_dataset()
        renames = {}
        for key, variable in dataset.data_vars.items():
            name = str(key)
            named = len(dims.get(name, ()))
            for position, dim_key in enumerate(variable.dims[skip:]):
                dim = str(dim_key)
                wanted = f"{name}_dim_{position}"
                if position >= named and dim != wanted and dim.startswith(f"{name}_dim_"):
                    renames[dim] = wanted
        if renames:
            tree[group] = xr.DataTree(dataset.rename(renames))


def history_to_dataset(history: Any) -> xr.Dataset:
    """
    The optimisation history as an :class:`xarray.Dataset` with dims ``(chain, step)``.

    Totals (``loss``, ``elbo``, ``kl``, ...) become ``(chain, step)`` variables; per-site
    columns ``"<term>/<site>"`` become ``<term>_per_site`` with dims
    ``(chain, step, site)`` (NaN where a term does not apply to a site). Chains of
    different lengths are padded with NaN; non-numeric columns become NaN. From an
    ``SVIResult`` with per-chain convergence evidence (``result.convergence``), two
    ``(chain,)`` variables ``converged`` (1.0 / 0.0; NaN, "not recorded", where a chain's
    entry is None) and ``convergence_reason`` (string);
    with ``result.stop_reasons``, ``stop_reason`` (string).

    :param history: an :class:`~pyro_elbo_lab.SVIResult` or its ``history`` DataFrame.
    :rtype: xarray.Dataset
    :raises ValueError: if ``history`` is neither (or has no ``step`` column).
    """
    import pandas as pd

    frame = getattr(history, "history", history)
    if not isinstance(frame, pd.DataFrame) or "step" not in frame.columns:
        raise ValueError(
            f"history must be an SVIResult or its history DataFrame (with a 'step' column), got {type(history)}"
        )
    frame = frame.assign(chain=frame["chain"] if "chain" in frame.columns else 0).set_index(["chain", "step"])
    frame = frame.apply(lambda column: pd.to_numeric(column, errors="coerce")).astype("float64")
    per_site = [c for c in frame.columns if "/" in c]
    # to_xarray unstacks the (chain, step) index onto the full grid: missing steps are NaN
    dataset = frame.drop(columns=per_site).to_xarray()
    if per_site:
        sites = frame[per_site]
        sites.columns = pd.MultiIndex.from_tuples(
            [(term + "_per_site", site) for term, site in (c.split("/", 1) for c in per_site)], names=[None, "site"]
        )
        long = sites.stack("site", future_stack=True).sort_index()
        dataset = dataset.merge(long.to_xarray())
        dataset["site"] = dataset["site"].astype(str)
    dataset = dataset.assign_coords(chain=dataset["chain"].astype("int64"), step=dataset["step"].astype("int64"))
    dataset.attrs.update(units="nats", description="SVI optimisation history")
    chains = dataset.sizes["chain"]
    convergence = list(getattr(history, "convergence", None) or [])
    stop_reasons = list(getattr(history, "stop_reasons", None) or [])
    if len(convergence) == chains:
        # a chain with no convergence entry (None) is NaN, "not recorded", never 0.0 "not converged"
        flags = [np.nan if (c or {}).get("converged") is None else float(bool(c["converged"])) for c in convergence]
        dataset["converged"] = ("chain", np.array(flags, dtype=float))
        dataset["convergence_reason"] = ("chain", np.array([str((c or {}).get("reason", "")) for c in convergence]))
    if len(stop_reasons) == chains:
        dataset["stop_reason"] = ("chain", np.array([str(r) for r in stop_reasons]))
    return dataset


def moments_to_dataset(reports: Sequence[GuideMoments]) -> xr.Dataset:
    """
    The ``guide_moments`` group: the :class:`~pyro_elbo_lab.GuideMoments` of each chain as
    an :class:`xarray.Dataset` that round-trips through netCDF on both ArviZ generations.

    Dims ``(chain, element)``; coordinate ``element`` (names as ArviZ's summary rows,
    ``"theta[Choate]"``) with ``site`` beside it. Variables (units of each element;
    ``mean_error`` in posterior sds): ``guide_mean``, ``guide_sd``, ``psis_mean``,
    ``psis_sd`` and their ``*_mcse``; ``mean_error``, ``sd_ratio`` and their MCSE (NaN
    where k̂ is above the threshold); ``status`` per element (accurate / inaccurate /
    uncertain / unknown). Per chain: ``pareto_k``, ``k_threshold``,
    ``importance_sampling`` (the :func:`~pyro_elbo_lab.diagnostics.psis.verdict` word)
    and ``accuracy`` (:meth:`~pyro_elbo_lab.GuideMoments.accuracy`). Attributes: the
    tolerances and the number of draws.

    :param list reports: one :class:`~pyro_elbo_lab.GuideMoments` per chain, same elements.
    :rtype: xarray.Dataset
    """
    import xarray as xr

    from .diagnostics.moments import MEAN_ERROR_TOL, MOMENT_FIELDS, SD_RATIO_TOL
    from .diagnostics.psis import verdict

    first = reports[0]
    dims = ("chain", "element")
    data: dict[str, tuple[Any, np.ndarray]] = {
        name: (dims, np.stack([np.asarray(getattr(r, name), dtype="float64") for r in reports]))
        for name in MOMENT_FIELDS
    }
    data["status"] = (dims, np.array([r.element_status() for r in reports], dtype=str).reshape(len(reports), -1))
    data["pareto_k"] = ("chain", np.array([r.pareto_k for r in reports], dtype="float64"))
    data["k_threshold"] = ("chain", np.array([r.k_threshold for r in reports], dtype="float64"))
    data["importance_sampling"] = ("chain", np.array([verdict(r.pareto_k, r.num_samples) for r in reports]))
    data["accuracy"] = ("chain", np.array([r.accuracy() for r in reports]))
    dataset = xr.Dataset(
        data,
        coords={
            "chain": np.arange(len(reports)),
            "element": np.array(first.names, dtype=str),
            "site": ("element", np.array(first.sites, dtype=str)),
        },
    )
    dataset.attrs.update(
        mean_error_tol=MEAN_ERROR_TOL,
        sd_ratio_tol=SD_RATIO_TOL,
        num_samples=int(first.num_samples),
        description="the guide's moments against the PSIS-corrected posterior moments (Pareto-smoothed "
        "self-normalised importance sampling); mean_error in posterior sds",
    )
    return dataset
