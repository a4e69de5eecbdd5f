# SPDX-License-Identifier: Apache-2.0
"""
Plots of a variational fit, drawn from data (a history DataFrame, an
:class:`~pyro_elbo_lab.SVIResult`, the output of :func:`~pyro_elbo_lab.to_inference_data` (an ``InferenceData`` or
``DataTree``) or a table), never from a model.

Every function returns the matplotlib :class:`~matplotlib.axes.Axes` it drew on, with a
title, axis labels with units (nats) and a legend. For the posterior itself use ArviZ's
plots on :func:`~pyro_elbo_lab.from_svi_result`'s output (``az.plot_trace``,
``az.plot_forest``; ``az.plot_posterior`` on ArviZ 0.2x).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import arviz_compat
from .diagnostics.psis import (
    IS_RELIABLE,
    IS_UNCHECKED,
    IS_UNRELIABLE,
    IS_USABLE,
    PARETO_K_GOOD,
    chain_log_weights,
    pareto_k_threshold,
    psis_diagnostics,
    verdict,
)

__all__ = ["plot_decomposition", "plot_kl_per_site", "plot_rate_distortion", "plot_pareto_k"]

_VERDICT_COLORS = {IS_RELIABLE: "C2", IS_USABLE: "C1", IS_UNRELIABLE: "C3", IS_UNCHECKED: "grey"}

_TERM_LABELS = {
    "elbo": "ELBO",
    "reconstruction": "reconstruction E[log p(x|z)]",
    "kl": "KL(q(z) || p(z))",
    "entropy": "entropy H[q]",
    "objective": "objective",
    "cross_entropy": "cross-entropy",
    "expected_log_joint": "E[log p(x, z)]",
    "loss": "loss",
}


if TYPE_CHECKING:
    import matplotlib.axes
    import pandas as pd


def _axes(ax: Any) -> matplotlib.axes.Axes:
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots()
        return ax
    from matplotlib.axes import Axes

    if not isinstance(ax, Axes):
        raise ValueError(
            f"ax must be a matplotlib Axes or None, got {type(ax).__name__} {ax!r}; "
            "pass e.g. `fig, ax = plt.subplots()` then ax=ax, or leave ax=None for a new figure"
        )
    return ax


def _history(data: Any) -> pd.DataFrame:
    """A history DataFrame from an SVIResult, a DataFrame or an InferenceData."""
    import pandas as pd

    if hasattr(data, "history") and isinstance(data.history, pd.DataFrame):
        return data.history
    if isinstance(data, pd.DataFrame):
        return data
    if _is_result(data) and "optimization_history" in arviz_compat.groups(data):
        ds = arviz_compat.group(data, "optimization_history")
        frame = ds[[v for v in ds.data_vars if "site" not in ds[v].dims]].to_dataframe().reset_index()
        for key in ds.data_vars:
            var = str(key)
            if "site" in ds[var].dims:
                term = var[: -len("_per_site")] if var.endswith("_per_site") else var
                for site in ds["site"].values:
                    frame[f"{term}/{site}"] = ds[var].sel(site=site).values.reshape(-1)
        return frame.dropna(subset=["loss"]) if "loss" in frame else frame
    raise ValueError(
        f"expected an SVIResult, its history DataFrame or an InferenceData with an optimization_history group, "
        f"got {type(data).__name__}"
    )


def _is_result(data: Any) -> bool:
    """Whether ``data`` is the converter's output (checked without importing ArviZ for a table)."""
    import pandas as pd

    if isinstance(data, (pd.DataFrame, dict, list, tuple, np.ndarray)) or hasattr(data, "history"):
        return False
    return arviz_compat.is_inference_data(data)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) == 0:
        return values
    import pandas as pd

    return pd.Series(values).rolling(window, min_periods=1).mean().to_numpy()


def _check_window(smooth: Any) -> int:
    if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 1:
        raise ValueError(f"smooth must be a positive integer window of steps, got {smooth!r}")
    return smooth


_DEFAULT_TERMS = ("elbo", "reconstruction", "kl", "entropy")


def plot_decomposition(
    data: Any,
    ax: matplotlib.axes.Axes | None = None,
    *,
    terms: Sequence[str] = _DEFAULT_TERMS,
    beta: bool = True,
    smooth: int = 1,
    chain: int | None = None,
) -> matplotlib.axes.Axes:
    """
    The ELBO and its decomposition over training, in nats, with β on a second axis.

    :param data: an :class:`~pyro_elbo_lab.SVIResult`, its ``history`` DataFrame or an
        InferenceData with an ``optimization_history`` group.
    :param matplotlib.axes.Axes ax: axes to draw on (a new figure when None).
    :param terms: history columns to draw (for plain Pyro losses only ``loss`` exists
        and is drawn instead).
    :param bool beta: draw β on a twin axis (unitless), and the capacity, when
        recorded, on the main axis (nats).
    :param int smooth: rolling-mean window in steps, to see through Monte Carlo noise.
    :param int chain: which chain (default all, one line style per chain).
    :returns: the primary axes; the β axis is ``ax.beta_axis`` (None without β).
    :rtype: matplotlib.axes.Axes
    :raises ValueError: if ``terms`` (given explicitly) names a column the history lacks,
        none of the default terms is in the history, ``chain`` is not a chain of the
        history, or ``ax`` is not a matplotlib Axes.
    """
    frame = _history(data)
    smooth = _check_window(smooth)
    if isinstance(terms, str):
        terms = [terms]
    if terms is not _DEFAULT_TERMS:
        missing = [t for t in terms if t not in frame.columns]
        if missing:
            available = [c for c in frame.columns if c not in ("step", "chain")]
            raise ValueError(f"terms={list(terms)!r}: {missing!r} not in the history; available terms: {available!r}")
    present = [t for t in terms if t in frame.columns]
    if not present:
        if "loss" not in frame.columns:
            raise ValueError(f"none of terms={list(terms)} is in the history (columns: {list(frame.columns)})")
        present = ["loss"]
    ax = _axes(ax)
    chains = _chains(frame, chain)
    styles = ["-", "--", ":", "-."]
    for i, (c, rows) in enumerate(chains):
        suffix = f" (chain {c})" if len(chains) > 1 else ""
        for j, term in enumerate(present):
            ax.plot(
                rows["step"].to_numpy(),
                _smooth(rows[term].to_numpy(dtype=float), smooth),
                color=f"C{j}",
                linestyle=styles[i % len(styles)],
                label=_TERM_LABELS.get(term, term) + suffix,
            )
    ax.set_xlabel("step")
    ax.set_ylabel("nats")
    ax.set_title("ELBO decomposition over training" + (f" (rolling mean of {smooth} steps)" if smooth > 1 else ""))
    ax.beta_axis = None  # type: ignore[attr-defined]  # documented attribute on the returned Axes
    if beta and "beta" in frame.columns:
        _, rows = chains[0]
        if "capacity" in frame.columns:
            # the capacity is in nats: on the main axis, whose limits then include it
            ax.plot(
                rows["step"].to_numpy(),
                rows["capacity"].to_numpy(dtype=float),
                color="grey",
                linestyle=":",
                label="capacity C (nats)",
            )
    handles, labels = ax.get_legend_handles_labels()
    if beta and "beta" in frame.columns:
        twin = ax.twinx()
        twin.plot(rows["step"].to_numpy(), rows["beta"].to_numpy(dtype=float), color="black", alpha=0.6, label="β")
        top = float(np.nanmax(rows["beta"].to_numpy(dtype=float))) if len(rows) else 1.0
        twin.set_ylim(0.0, 1.05 * max(top, 1e-12))  # β from 0: a constant β reads as constant
        twin.set_ylabel("β (unitless)")
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
        ax.beta_axis = twin  # type: ignore[attr-defined]
    ax.legend(handles, labels, loc="best", fontsize="small")
    return ax


def plot_kl_per_site(
    data: Any, ax: matplotlib.axes.Axes | None = None, *, smooth: int = 1, chain: int = 0
) -> matplotlib.axes.Axes:
    """
    The KL of each latent site over training, stacked, in nats: which sites carry the
    information (and which collapsed).

    :param data: an :class:`~pyro_elbo_lab.SVIResult`, its history DataFrame or an
        InferenceData with an ``optimization_history`` group.
    :param matplotlib.axes.Axes ax: axes to draw on.
    :param int smooth: rolling-mean window in steps (single-step Monte Carlo KL
        estimates can be negative).
    :param int chain: which chain.
    :rtype: matplotlib.axes.Axes
    :raises ValueError: if the history has no per-site KL (``"kl/<site>"``) columns.
    """
    frame = _history(data)
    smooth = _check_window(smooth)
    columns = [c for c in frame.columns if c.startswith("kl/")]
    if not columns:
        raise ValueError(
            "the history has no per-site KL columns 'kl/<site>': fit with a loss that records ELBOTerms "
            "(BetaELBO, BetaMeanFieldELBO)"
        )
    ((_, rows),) = _chains(frame, chain)
    ax = _axes(ax)
    steps = rows["step"].to_numpy()
    values = [_smooth(rows[c].to_numpy(dtype=float), smooth) for c in columns]
    ax.stackplot(steps, *values, labels=[c[len("kl/") :] for c in columns], alpha=0.8)
    if "kl" in rows.columns:
        ax.plot(steps, _smooth(rows["kl"].to_numpy(dtype=float), smooth), color="black", linewidth=1, label="total KL")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(q || p) (nats)")
    ax.set_title("KL per latent site over training")
    ax.legend(title="site", loc="best", fontsize="small")
    return ax


def plot_rate_distortion(
    data: Any, ax: matplotlib.axes.Axes | None = None, *, annotate: bool = True
) -> matplotlib.axes.Axes:
    """
    The rate–distortion curve: rate :math:`R = \\mathrm{KL}(q(z \\mid x) \\| p(z))`
    against distortion :math:`D = -\\mathbb{E}_q[\\log p(x \\mid z)]`, in nats, one point
    per fit (e.g. per β), with the :math:`R + D = -\\mathrm{ELBO}` lines of the best fit.

    :param data: a table with columns ``rate``, ``distortion`` and optionally ``beta``,
        ``rate_stderr``, ``distortion_stderr`` (error bars): a :class:`pandas.DataFrame`
        (e.g. from a β sweep), a dict of columns, or one or a list of
        :class:`~pyro_elbo_lab.RateDistortion`.
    :param matplotlib.axes.Axes ax: axes to draw on.
    :param bool annotate: label points with their β.
    :rtype: matplotlib.axes.Axes
    :raises ValueError: if ``rate`` or ``distortion`` is missing.

    References

    [1] `Fixing a Broken ELBO`, Alexander A. Alemi, Ben Poole, Ian Fischer, Joshua V.
        Dillon, Rif A. Saurous, Kevin Murphy (2018)
    """
    import pandas as pd

    if hasattr(data, "to_dataframe"):
        data = data.to_dataframe()
    elif isinstance(data, (list, tuple)) and data and all(hasattr(d, "to_dataframe") for d in data):
        data = pd.concat([d.to_dataframe() for d in data], ignore_index=True)
    frame = pd.DataFrame(data)
    missing = [c for c in ("rate", "distortion") if c not in frame.columns]
    if missing:
        raise ValueError(
            f"rate–distortion data needs columns 'rate' and 'distortion'; missing {missing} "
            f"(columns: {list(frame.columns)})"
        )
    numeric_beta = "beta" in frame.columns and pd.api.types.is_numeric_dtype(frame["beta"])
    if numeric_beta:
        frame = frame.sort_values("beta")
    ax = _axes(ax)
    if "rate_stderr" in frame.columns and "distortion_stderr" in frame.columns:
        ax.errorbar(
            frame["rate"],
            frame["distortion"],
            xerr=frame["rate_stderr"],
            yerr=frame["distortion_stderr"],
            marker="o",
            color="C0",
            capsize=2,
            label="fits (± 1 standard error)",
        )
    else:
        ax.plot(frame["rate"], frame["distortion"], marker="o", color="C0", label="fits")
    best = frame.iloc[int(np.argmin((frame["rate"] + frame["distortion"]).to_numpy()))]
    total = float(best["rate"] + best["distortion"])
    r = np.linspace(0.0, max(total, float(frame["rate"].max())), 50)
    ax.plot(r, total - r, color="grey", linestyle="--", label=f"R + D = {total:.4g} nats (best -ELBO)")
    if annotate and "beta" in frame.columns:
        for _, row in frame.iterrows():
            label = f"β={row['beta']:.3g}" if numeric_beta else str(row["beta"])
            ax.annotate(
                label, (row["rate"], row["distortion"]), textcoords="offset points", xytext=(4, 4), fontsize="small"
            )
    # frame the fitted points, not the whole R + D line (which would squash them into a corner)
    for column, set_lim in (("rate", ax.set_xlim), ("distortion", ax.set_ylim)):
        values = frame[column].to_numpy(dtype=float)
        err = frame.get(f"{column}_stderr")
        err = np.zeros_like(values) if err is None else np.nan_to_num(err.to_numpy(dtype=float))
        lo, hi = float(np.min(values - err)), float(np.max(values + err))
        pad = 0.15 * (hi - lo) if hi > lo else max(1.0, 0.05 * abs(hi))
        set_lim(lo - pad, hi + pad)
    ax.set_xlabel("rate R = KL(q(z|x) || p(z)) (nats)")
    ax.set_ylabel("distortion D = -E[log p(x|z)] (nats)")
    ax.set_title("Rate–distortion")
    ax.legend(loc="best", fontsize="small")
    return ax


def plot_pareto_k(data: Any, ax: matplotlib.axes.Axes | None = None) -> matplotlib.axes.Axes:
    """
    Pareto :math:`\\hat k` of the importance weights :math:`p(x, z_s) / q(z_s)`, with the
    thresholds of Vehtari et al. (:data:`~pyro_elbo_lab.diagnostics.psis.PARETO_K_GOOD`,
    0.5, and :func:`~pyro_elbo_lab.diagnostics.psis.pareto_k_threshold` of the number of
    draws, 0.7 when it is not known or differs between fits). Bars are coloured by the
    verdict of :func:`pyro_elbo_lab.diagnostics.psis.verdict` (about importance sampling,
    not the guide's accuracy): green "IS reliable" (including k̂ = -inf, constant
    weights: drawn as a zero-height bar), orange "IS usable", red "IS unreliable", grey
    "IS unchecked" (k̂ = NaN, too few draws; zero height).

    :param data: one of

        - the output of :func:`~pyro_elbo_lab.to_inference_data`: k̂ per chain,
          from ``sample_stats.log_importance_weight``;
        - an :class:`~pyro_elbo_lab.SVIResult` or history with ``eval_pareto_k`` (fitted
          with ``evaluation=Evaluation(every=N)``): k̂ over training;
        - a mapping ``{label: k̂}`` or a sequence of k̂ values (or of
          :class:`~pyro_elbo_lab.EvidenceEstimate` s).
    :param matplotlib.axes.Axes ax: axes to draw on.
    :rtype: matplotlib.axes.Axes
    :raises ValueError: for data without k̂.

    References

    [1] `Yes, but Did It Work?: Evaluating Variational Inference`, Yuling Yao, Aki
        Vehtari, Daniel Simpson, Andrew Gelman (2018)

    [2] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew
        Gelman, Yuling Yao, Jonah Gabry (2024)
    """
    import os

    import pandas as pd

    if isinstance(data, (str, bytes, os.PathLike)):
        raise ValueError(
            f"plot_pareto_k takes data, not a file name ({data!r}): an InferenceData/DataTree from "
            "to_inference_data, an SVIResult or history with eval_pareto_k, or EvidenceEstimate s / k̂ values; "
            "load a saved file first with pyro_elbo_lab.arviz_compat.from_netcdf(path)"
        )
    ax = _axes(ax)
    over_training = False
    if _is_result(data) and "sample_stats" in arviz_compat.groups(data):
        import torch

        chains = arviz_compat.group(data, "sample_stats")["chain"].values
        labels = [f"chain {int(c)}" for c in chains]
        ks = [float(psis_diagnostics(torch.as_tensor(chain_log_weights(data, i)))[1]) for i in range(len(labels))]
        sizes: list[int | None] = [arviz_compat.group(data, "sample_stats").sizes["draw"]] * len(ks)
    elif isinstance(data, pd.DataFrame) or hasattr(data, "history"):
        frame = _history(data)
        if "eval_pareto_k" not in frame.columns:
            raise ValueError(
                "the history has no 'eval_pareto_k' column: fit with SVIRunner(..., evaluation=Evaluation(every=N))"
            )
        over_training = True
    elif isinstance(data, dict):
        labels, ks = [str(k) for k in data], [_k_of(v) for v in data.values()]
        sizes = [getattr(v, "num_samples", None) for v in data.values()]
    elif isinstance(data, Sequence) or isinstance(data, np.ndarray):
        labels = [str(i) for i in range(len(data))]
        ks = [_k_of(v) for v in data]
        sizes = [getattr(v, "num_samples", None) for v in data]
    else:
        raise ValueError(f"cannot read Pareto k̂ from {type(data).__name__}; see the docstring for what is accepted")

    if over_training:
        for c, rows in _chains(frame, None):
            rows = rows.dropna(subset=["eval_pareto_k"])
            ax.plot(
                rows["step"], rows["eval_pareto_k"], marker="o", label="k̂" + (f" (chain {c})" if c is not None else "")
            )
        ax.set_xlabel("step")
        ax.set_title("Pareto k̂ of the importance weights over training")
    else:
        colors = [_VERDICT_COLORS[verdict(k, n)] for k, n in zip(ks, sizes)]
        heights = [k if math.isfinite(k) else 0.0 for k in ks]  # -inf (exact) and NaN (unknown): no bar
        ax.bar(range(len(ks)), heights, color=colors, label="k̂")
        ax.set_xticks(range(len(ks)))
        ax.set_xticklabels(labels)
        ax.set_xlabel("chain / fit")
        ax.set_title("Pareto k̂ of the importance weights")
    same = None if over_training or len(set(sizes)) != 1 else sizes[0]
    threshold = pareto_k_threshold(same)
    ax.axhline(PARETO_K_GOOD, color="C1", linestyle="--", label=f"{PARETO_K_GOOD} (IS reliable below)")
    ax.axhline(threshold, color="C3", linestyle="--", label=f"{threshold:.2f} (IS unreliable above)")
    ax.set_ylabel("k̂ (unitless)")
    ax.legend(loc="best", fontsize="small")
    return ax


def _k_of(value: Any) -> float:
    """k̂ of an :class:`~pyro_elbo_lab.EvidenceEstimate` (its ``pareto_k``) or of a number."""
    k: Any = getattr(value, "pareto_k", value)
    return float(k)


def _chains(frame: pd.DataFrame, chain: int | None) -> list[tuple[Any, Any]]:
    if chain is not None:
        known = sorted(int(c) for c in frame["chain"].unique()) if "chain" in frame.columns else [0]
        if isinstance(chain, bool) or not isinstance(chain, (int, np.integer)) or int(chain) not in known:
            raise ValueError(
                f"chain={chain!r}, but the history has {len(known)} chain(s), numbered {known}; "
                "pass one of these or chain=None"
            )
    if "chain" not in frame.columns:
        return [(None, frame)]
    if chain is not None:
        return [(chain, frame[frame["chain"] == chain])]
    return [(c, rows) for c, rows in frame.groupby("chain")]
