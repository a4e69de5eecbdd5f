# SPDX-License-Identifier: Apache-2.0
"""
Every call into ArviZ, for both ArviZ generations.

This is the only module of the package that imports :mod:`arviz` (a test walks the
package's source to keep it so). Each function has one branch per generation:

- ArviZ 0.2x (``InferenceData``; Python 3.10+): ``az.psislw``, ``az.from_dict(**groups)``,
  ``az.from_datatree``, ``az.summary``, ``az.loo``, ``az.from_netcdf``.
- ArviZ 1.x (the ArviZverse: ``arviz_base``, ``arviz_stats``, ``arviz_plots``; results are
  :class:`xarray.DataTree`; Python 3.12+): ``arviz_stats`` PSIS on ``-log w``,
  ``arviz_base.from_dict({group: {...}})``, ``loo_approximate_posterior``,
  :func:`xarray.open_datatree`.

The converter (:mod:`pyro_elbo_lab.inference_data`) builds one :class:`xarray.DataTree`;
:func:`finalize` returns it as is on 1.x and as an ``InferenceData`` on 0.2x. The rest of
the package reads results through :func:`groups` and :func:`group`, which accept both.

ArviZ is imported inside the functions, so ``import pyro_elbo_lab`` does not pay for it.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import matplotlib.figure
    import pandas as pd
    import xarray as xr

__all__ = [
    "MIN_PSIS_DRAWS",
    "finalize",
    "from_dict",
    "from_netcdf",
    "generation",
    "group",
    "groups",
    "is_inference_data",
    "load_arviz_data",
    "plot_forest",
    "label_values",
    "loo",
    "loo_approximate_posterior",
    "loo_elpd",
    "psislw",
    "summary",
    "to_netcdf",
    "ess",
    "rhat",
]

#: The fewest draws PSIS accepts, on both generations: ArviZ 1.x refuses fewer than 25
#: (it needs 5 tail draws), ArviZ 0.2x fits nonsense below 21.
MIN_PSIS_DRAWS = 25


def _arviz() -> Any:
    """The installed :mod:`arviz`, typed loosely: the two generations' APIs differ."""
    import arviz

    return arviz


@functools.cache
def generation() -> int:
    """
    The installed ArviZ's major version: ``0`` (0.2x, ``InferenceData``) or ``1`` (1.x,
    ``DataTree``).

    :rtype: int
    """
    import arviz

    return 0 if str(arviz.__version__).startswith("0.") else 1


# -- PSIS -------------------------------------------------------------------------------------


def psislw(log_weights: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """
    Pareto-smoothed importance sampling of log weights along ``axis`` (independent draws,
    relative efficiency 1).

    0.2x: ``az.psislw(log_weights, reff=1)``. 1.x: ``arviz_stats``' ``psislw`` on
    ``-log_weights`` (it takes a log-likelihood, whose negation are the LOO log weights).
    The two fit the generalised Pareto tail with different priors; their k̂ differ by a few
    hundredths (0.769 against 0.777 on one heavy-tailed set of weights). ArviZ's warnings
    are swallowed: k̂ is returned for the caller to report.

    :param numpy.ndarray log_weights: log importance weights in nats, shape ``(..., S, ...)``
        with the ``S`` draws along ``axis``, finite.
    :param int axis: the draw dimension.
    :returns: ``(smoothed, k)``: the smoothed log weights normalised to
        :math:`\\sum_s \\tilde w_s = 1` (nats, same shape as ``log_weights``), and the
        Pareto shape k̂ per set of weights (dimensionless, the shape without ``axis``); NaN
        where the tail cannot be fitted (too few distinct values in it), on both generations.
    :rtype: tuple
    :raises ValueError: if fewer than :data:`MIN_PSIS_DRAWS` draws are given.

    References

    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    """
    lw = np.moveaxis(np.array(log_weights, dtype=np.float64), axis, -1)
    draws = lw.shape[-1] if lw.ndim else 0
    if draws < MIN_PSIS_DRAWS:
        raise ValueError(
            f"PSIS needs at least {MIN_PSIS_DRAWS} draws along axis {axis} to fit the Pareto tail, got "
            f"{draws} (log_weights of shape {np.shape(log_weights)}); draw more samples"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if generation() == 0:
            az = _arviz()

            smoothed, k = az.psislw(lw, reff=1.0)
        else:
            smoothed, k = _psislw_1x(lw)
    smoothed = np.moveaxis(np.asarray(smoothed, dtype=np.float64), -1, axis)
    k = np.asarray(k, dtype=np.float64)
    # a tail that cannot be fitted (ties: too few distinct tail values) is NaN on 1.x, +inf on 0.2x
    return smoothed, np.where(np.isposinf(k), np.nan, k)


def _psislw_1x(lw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """arviz_stats' PSIS along the last axis; a row whose tail is all ties (1.x raises) gets NaN and its
    raw weights normalised."""
    from arviz_stats.base import array_stats

    try:
        return array_stats.psislw(-lw, r_eff=1.0, axis=-1)
    except ValueError as error:
        if "tail values are the same" not in str(error):
            raise
    rows = lw.reshape(-1, lw.shape[-1])
    smoothed, k = np.empty_like(rows), np.empty(rows.shape[0])
    for i, row in enumerate(rows):
        try:
            smoothed[i], k[i] = array_stats.psislw(-row, r_eff=1.0, axis=-1)
        except ValueError as error:
            if "tail values are the same" not in str(error):
                raise
            top = row.max()
            smoothed[i], k[i] = row - top - np.log(np.exp(row - top).sum()), np.nan
    return smoothed.reshape(lw.shape), k.reshape(lw.shape[:-1])


# -- building and reading results ------------------------------------------------------------


def from_dict(
    data: Mapping[str, Mapping[str, np.ndarray]],
    *,
    coords: Mapping[str, Any] | None = None,
    dims: Mapping[str, list[str]] | None = None,
) -> xr.DataTree:
    """
    An :class:`xarray.DataTree` from ``{group: {variable: array}}``, with ArviZ's
    conventions: sample dims ``(chain, draw)`` first in every group except
    ``observed_data`` and ``constant_data``; dims not named in ``dims`` get
    ``<variable>_dim_<i>``; integer coordinates where ``coords`` gives none.

    0.2x: ``az.from_dict(**data).to_datatree()``; 1.x: ``arviz_base.from_dict(data)``.

    :param dict data: arrays per variable per group; empty groups are left out.
    :param dict coords: coordinate values per dimension name.
    :param dict dims: dimension names per variable, after ``(chain, draw)``.
    :rtype: xarray.DataTree
    """
    data = {name: dict(variables) for name, variables in data.items() if variables}
    coords = dict(coords or {})
    dims = {name: list(names) for name, names in (dims or {}).items()}
    if generation() == 0:
        az = _arviz()

        return az.from_dict(**data, coords=coords, dims=dims).to_datatree()
    import arviz_base

    return arviz_base.from_dict(data, coords=coords, dims=dims)


def finalize(tree: xr.DataTree) -> Any:
    """
    The result type of the installed ArviZ: the :class:`xarray.DataTree` itself on 1.x, an
    ``arviz.InferenceData`` (``az.from_datatree``) on 0.2x.
    """
    if generation() == 0:
        az = _arviz()

        return az.from_datatree(tree)
    return tree


def is_inference_data(data: Any) -> bool:
    """Whether ``data`` is a result of the converter (``InferenceData`` or ``DataTree``)."""
    import xarray as xr

    if isinstance(data, xr.DataTree):
        return True
    if generation() == 0:
        az = _arviz()

        return isinstance(data, az.InferenceData)
    return False


def groups(data: Any) -> list[str]:
    """The group names of an ``InferenceData`` or a ``DataTree``."""
    import xarray as xr

    if isinstance(data, xr.DataTree):
        return list(data.children)
    return list(data.groups())


def group(data: Any, name: str) -> xr.Dataset:
    """
    One group as an :class:`xarray.Dataset`, from an ``InferenceData`` or a ``DataTree``.

    :raises ValueError: if ``data`` has no group ``name``.
    """
    import xarray as xr

    if name not in groups(data):
        raise ValueError(f"the data has no '{name}' group (groups: {groups(data)}); build it with to_inference_data")
    value = data[name]
    return value.to_dataset() if isinstance(value, xr.DataTree) else value


def label_values(dataset: xr.Dataset) -> dict[str, float]:
    """
    ``{label: value}`` for every scalar of a dataset without sample dims, labelled as
    ``summary``'s rows are (``"theta[a]"``).
    """
    package = "arviz" if generation() == 0 else "arviz_base"
    labels: Any = importlib.import_module(f"{package}.labels")
    var_iter = importlib.import_module(f"{package}.sel_utils").xarray_var_iter
    labeller = labels.BaseLabeller()
    return {
        labeller.make_label_flat(var, sel, isel): float(values)
        for var, sel, isel, values in var_iter(dataset, combined=True)
    }


# -- statistics ------------------------------------------------------------------------------


def summary(data: Any, *, var_names: list[str] | None = None, diagnostics: bool = True) -> pd.DataFrame:
    """
    ``az.summary`` of the posterior: a :class:`pandas.DataFrame` with ``mean``, ``sd``, an
    interval and, with ``diagnostics``, ``ess_bulk``, ``ess_tail``, ``r_hat``. The
    intervals differ between generations: 0.2x gives the 94% HDI (``hdi_3%``,
    ``hdi_97%``), 1.x the 89% equal-tailed interval (``eti89_lb``, ``eti89_ub``).

    :param data: an ``InferenceData`` or ``DataTree`` with a ``posterior`` group.
    :param list var_names: the posterior variables to summarise (default all).
    :param bool diagnostics: include the convergence diagnostics (needs several chains to
        mean anything).
    :rtype: pandas.DataFrame
    """
    az = _arviz()

    return az.summary(data, var_names=var_names, kind="all" if diagnostics else "stats")


def rhat(data: Any) -> xr.Dataset:
    """``az.rhat`` (rank-normalised split :math:`\\hat R`) of the posterior, per variable."""
    az = _arviz()

    return az.rhat(data)


def ess(data: Any) -> xr.Dataset:
    """``az.ess`` (bulk effective sample size) of the posterior, per variable."""
    az = _arviz()

    return az.ess(data)


def loo(data: Any, *, pointwise: bool = True) -> Any:
    """
    ``az.loo``: PSIS-LOO of the pointwise ``log_likelihood``, which assumes the draws come
    from the posterior. For a variational fit use :func:`loo_approximate_posterior`.

    :returns: ArviZ's ``ELPDData`` (its total through :func:`loo_elpd` on both
        generations; ``pareto_k`` per point).
    """
    az = _arviz()

    return az.loo(data, pointwise=pointwise)


def loo_elpd(result: Any) -> float:
    """The ``elpd`` of an ``ELPDData`` of either generation (``elpd_loo`` on 0.2x)."""
    return float(result.elpd_loo if generation() == 0 else result.elpd)


def loo_approximate_posterior(data: Any) -> tuple[float, np.ndarray, np.ndarray]:
    """
    PSIS-LOO for draws from an approximate posterior :math:`q` (Magnusson et al. 2019):
    the LOO log weights of draw :math:`s` for point :math:`i` are
    :math:`-\\log p(y_i \\mid \\theta_s) + \\log p(y, \\theta_s) - \\log q(\\theta_s)`
    (the importance ratio to the posterior times the usual LOO ratio), smoothed by PSIS,
    and :math:`\\widehat{\\mathrm{elpd}}_i = \\log \\sum_s \\tilde w_{is}\\, p(y_i \\mid \\theta_s)`
    with normalised :math:`\\tilde w`.

    From ``log_likelihood`` and ``sample_stats.log_joint`` / ``log_guide`` (chains
    pooled): ArviZ 1.x's ``az.loo_approximate_posterior(data, log_p=, log_q=)``; on 0.2x,
    which has none, the same computation here around ArviZ's PSIS (the two agree to
    rounding on ArviZ 1.3).

    :param data: a converter result (one observed site in ``log_likelihood``).
    :returns: ``(elpd, elpd_i, pareto_k_i)`` in nats; the pointwise arrays have the
        observed site's shape.
    :rtype: tuple
    :raises ValueError: for no or several observed sites, or fewer than
        :data:`MIN_PSIS_DRAWS` draws.

    References

    - *Leave-One-Out Cross-Validation for Bayesian Model Comparison in Large Data*,
      M. Magnusson, M. R. Andersen, J. Jonasson, A. Vehtari (2020)
    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    """
    log_likelihood = group(data, "log_likelihood")
    names = list(log_likelihood.data_vars)
    if len(names) != 1:
        raise ValueError(f"loo_approximate_posterior needs one observed site in log_likelihood, got {names}")
    stats = group(data, "sample_stats")
    draws = stats.sizes["chain"] * stats.sizes["draw"]
    if draws < MIN_PSIS_DRAWS:
        raise ValueError(
            f"PSIS-LOO needs at least {MIN_PSIS_DRAWS} draws to fit the Pareto tails, got {draws}; draw more"
        )
    if generation() >= 1:
        az = _arviz()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # k̂ is returned for the caller to judge
            result = az.loo_approximate_posterior(
                data, log_p=stats["log_joint"], log_q=stats["log_guide"], pointwise=True
            )
        return float(result.elpd), np.asarray(result.elpd_i), np.asarray(result.pareto_k)
    ll = log_likelihood[names[0]].stack(__sample__=("chain", "draw")).transpose(..., "__sample__").values
    log_ratio = (stats["log_joint"] - stats["log_guide"]).stack(__sample__=("chain", "draw")).values
    smoothed, k = psislw(log_ratio - ll, axis=-1)
    lse = ll + smoothed
    top = lse.max(-1, keepdims=True)
    elpd_i = (top + np.log(np.exp(lse - top).sum(-1, keepdims=True)))[..., 0]
    return float(elpd_i.sum()), elpd_i, k


# -- example data and plots ------------------------------------------------------------------


def load_arviz_data(name: str) -> Any:
    """One of ArviZ's bundled example data sets (``"non_centered_eight"``: NUTS on eight schools)."""
    az = _arviz()

    return az.load_arviz_data(name)


def plot_forest(datasets: Mapping[str, Any], *, var_names: list[str], ci_prob: float = 0.9) -> matplotlib.figure.Figure:
    """
    ArviZ's forest plot of several fits side by side, one row per variable, with
    ``ci_prob`` intervals.

    :param dict datasets: ``{fit name: converter result or ArviZ data}``.
    :returns: the matplotlib figure.
    """
    az = _arviz()
    import xarray as xr

    if generation() == 0:
        axes = az.plot_forest(
            list(datasets.values()),
            model_names=list(datasets),
            var_names=var_names,
            combined=True,
            hdi_prob=ci_prob,
            figsize=(8, 9),
        )
        return np.ravel(axes)[0].figure
    # arviz_plots stacks the fits along a "model" dim: fits with other chain or draw counts
    # would be NaN-padded (and drawn empty), so each gets the same number of pooled draws
    posteriors = {name: group(data, "posterior") for name, data in datasets.items()}
    draws = min(post.sizes["chain"] * post.sizes["draw"] for post in posteriors.values())
    trees = {}
    for name, post in posteriors.items():
        pooled = post.stack(__sample__=("chain", "draw"))
        keep = np.linspace(0, pooled.sizes["__sample__"] - 1, draws).round().astype(int)
        pooled = pooled.isel(__sample__=keep).drop_vars(["__sample__", "chain", "draw"])
        pooled = pooled.rename(__sample__="draw").assign_coords(draw=np.arange(draws)).expand_dims(chain=[0])
        trees[name] = xr.DataTree.from_dict({"posterior": pooled.transpose("chain", "draw", ...)})
    plot = az.plot_forest(trees, var_names=var_names, combined=True, ci_probs=(0.5, ci_prob), backend="matplotlib")
    return plot.viz["figure"].item()


# -- files -----------------------------------------------------------------------------------


def to_netcdf(data: Any, path: str | os.PathLike[str]) -> None:
    """Write a converter result to a netCDF file (every group; 1.x needs ``h5netcdf``)."""
    data.to_netcdf(str(path))


def from_netcdf(path: str | os.PathLike[str]) -> Any:
    """
    Read a file written by :func:`to_netcdf`: ``az.from_netcdf`` on 0.2x,
    :func:`xarray.open_datatree` on 1.x (loaded into memory, file closed).
    """
    if generation() == 0:
        az = _arviz()

        return az.from_netcdf(str(path))
    import xarray as xr

    with xr.open_datatree(str(path)) as tree:
        return tree.load()
