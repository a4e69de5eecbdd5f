# SPDX-License-Identifier: Apache-2.0
"""
The demos' figures, drawn for a statistician: axes labelled with units, legends outside the
data, exact references marked, where each fit stopped marked, scales that suit the quantity
(τ, a scale parameter, on a log axis).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from ..runner import SVIResult
    from .eight_schools import EightSchools
    from .vae import DigitsVAE, VAEStudy

__all__ = [
    "eight_schools_decomposition",
    "eight_schools_posterior",
    "interval",
    "vae_decomposition",
    "vae_images",
    "vae_rate_distortion",
]

#: Central posterior interval drawn in the posterior plots.
INTERVAL = 0.9
#: Where a fit stopped: converged / not converged (colours unused by the term lines C0-C3).
STOP_COLOUR = {True: "black", False: "magenta"}


def interval(draws: Any, prob: float = INTERVAL) -> tuple[float, float, float]:
    """``(mean, lower, upper)`` of draws: the mean and the central ``prob`` interval."""
    x = np.asarray(draws, dtype=float).ravel()
    lo, hi = np.quantile(x, [(1 - prob) / 2, (1 + prob) / 2])
    return float(x.mean()), float(lo), float(hi)


def eight_schools_decomposition(plt: Any, study: EightSchools, path: str) -> None:
    """
    One panel per fit: ELBO, reconstruction, KL and entropy over training (nats, rolling
    mean), the exact log p(y), and a vertical line where the fit stopped (converged, or the
    cap). The y axis shows the part of the run after the first 5% of steps, so the early
    transient does not flatten the rest.
    """
    from .. import plots

    fits = study.fits
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    smooth = max(1, study.num_steps // 100)
    for i, (ax, f) in enumerate(zip(axes.flat, fits)):
        history = f.result.history
        plots.plot_decomposition(
            f.result, ax=ax, terms=("elbo", "reconstruction", "kl", "entropy"), beta=False, smooth=smooth
        )
        ax.get_legend().remove()
        ax.axhline(study.exact.log_evidence, color="black", linestyle=":", linewidth=1, label="exact log p(y)")
        stop = int(history["step"].iloc[-1])
        ax.axvline(stop, color=STOP_COLOUR[f.converged], linestyle="--", linewidth=1.4, label=f.status)
        status = f.status.replace("not converged", "NOT CONVERGED")
        ax.set_title(f"{f.name}: {status}", fontsize=10)
        ax.set_ylabel("nats")
        ax.set_xlabel("step" if i >= 2 else "")
        # frame the run after its first 5% (smoothed), with the exact log p(y) in view
        skip = max(1, len(history) // 20)
        lines = [line.get_ydata()[skip:] for line in ax.get_lines() if len(np.atleast_1d(line.get_ydata())) > skip]
        values = np.concatenate([np.asarray(v, dtype=float) for v in lines] + [[study.exact.log_evidence]])
        values = values[np.isfinite(values)]
        lo, hi = float(values.min()), float(values.max())
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlim(0, max(study.num_steps, stop) * 1.02)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    keep = [(h, lab) for h, lab in zip(handles, labels) if not lab.startswith(("converged", "not converged"))]
    keep.append((plt.Line2D([], [], color=STOP_COLOUR[True], linestyle="--"), "where the fit stopped: converged"))
    keep.append(
        (
            plt.Line2D([], [], color=STOP_COLOUR[False], linestyle="--"),
            "where the fit stopped: not converged (step cap)",
        )
    )
    fig.legend(*zip(*keep), loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(f"ELBO decomposition over training (nats; rolling mean of {smooth} steps)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def eight_schools_posterior(plt: Any, study: EightSchools, path: str) -> None:
    """
    Posterior means and central 90% intervals of μ, τ (log axis) and each school's θ, for
    NUTS and every fit, with the exact (quadrature) posterior mean and 90% interval of μ and
    τ marked and the observed effects y_j shown. Fits that did not converge are labelled.
    """
    from .. import arviz_compat
    from ..datasets import EIGHT_SCHOOLS_NAMES, EIGHT_SCHOOLS_Y
    from .eight_schools_exact import exact_intervals

    nuts = arviz_compat.load_arviz_data("non_centered_eight").posterior
    methods = [("NUTS (reference)", nuts, "black", "s")]
    markers = ["o", "D", "^", "v"]
    for i, f in enumerate(study.fits):
        label = f.name + ("" if f.converged else " — NOT CONVERGED")
        methods.append((label, f.idata.posterior, f"C{i}", markers[i % 4]))
    exact = study.exact
    ci = exact_intervals(INTERVAL)

    fig = plt.figure(figsize=(13, 6.2))
    grid = fig.add_gridspec(2, 2, width_ratios=(1, 1.25), hspace=0.55, wspace=0.5)
    ax_mu, ax_tau, ax_theta = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[:, 1])
    ypos = np.arange(len(methods))[::-1]
    for ax, var, ref_mean, ref_ci, unit in (
        (ax_mu, "mu", exact.mu_mean, ci["mu"], "μ, population mean effect (SAT-V points)"),
        (ax_tau, "tau", exact.tau_mean, ci["tau"], "τ, between-school sd (SAT-V points, log scale)"),
    ):
        ax.axvspan(*ref_ci, color="0.88", zorder=0)
        ax.axvline(ref_mean, color="0.3", linestyle=":", zorder=1)
        for y0, (_, post, colour, marker) in zip(ypos, methods):
            mean, lo, hi = interval(post[var].values)
            ax.plot([lo, hi], [y0, y0], color=colour, linewidth=2)
            ax.plot(mean, y0, marker=marker, color=colour, markersize=6, linestyle="none")
        ax.set_yticks(ypos, [m[0] for m in methods], fontsize=8)
        ax.set_ylim(-0.7, len(methods) - 0.3)
        ax.set_xlabel(unit)
    ax_tau.set_xscale("log")
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    ax_tau.xaxis.set_major_locator(FixedLocator([0.1, 0.3, 1, 3, 10, 30]))
    ax_tau.xaxis.set_major_formatter(ScalarFormatter())
    ax_tau.xaxis.set_minor_formatter(NullFormatter())
    ax_mu.set_title("μ: mean and 90% interval; exact mean (dotted) and 90% interval (grey)", fontsize=9)
    ax_tau.set_title("τ: mean and 90% interval; exact mean (dotted) and 90% interval (grey)", fontsize=9)

    schools = list(EIGHT_SCHOOLS_NAMES)
    offsets = np.linspace(0.3, -0.3, len(methods))  # the order of the μ and τ panels, top to bottom
    base = np.arange(len(schools))[::-1]
    for off, (label, post, colour, marker) in zip(offsets, methods):
        theta = post["theta"].values.reshape(-1, len(schools))
        for j in range(len(schools)):
            mean, lo, hi = interval(theta[:, j])
            ax_theta.plot([lo, hi], [base[j] + off] * 2, color=colour, linewidth=1.5)
            ax_theta.plot(
                mean,
                base[j] + off,
                marker=marker,
                color=colour,
                markersize=4,
                linestyle="none",
                label=label if j == 0 else None,
            )
    ax_theta.plot(
        EIGHT_SCHOOLS_Y,
        base,
        marker="x",
        color="tab:brown",
        markersize=8,
        linestyle="none",
        label="observed effect y_j (± its standard error σ_j not shown)",
    )
    ax_theta.set_yticks(base, schools)
    ax_theta.set_xlabel("θ_j, school's true effect (SAT-V points)")
    ax_theta.set_title("θ_j: mean and 90% interval per school", fontsize=9)
    ax_theta.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.suptitle(
        "Eight schools: posterior of each guide against NUTS and the exact (quadrature) posterior", fontsize=11
    )
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------------------
# the β-VAE demo
# ----------------------------------------------------------------------------------------


ROW_LABELS = (
    "held-out images",
    "reconstructions\n(decoder mean at\nthe encoder mean)",
    "samples from the prior\n(decoder mean\nat z ~ N(0, I))",
)


def image_grid(plt: Any, rows: Sequence[np.ndarray], row_labels: Sequence[str], title: str, path: str) -> None:
    """Rows of 8×8 images (pixel probabilities in [0, 1]), each row labelled on its left."""
    num_rows, cols = len(rows), max(r.shape[0] for r in rows)
    fig, axes = plt.subplots(num_rows, cols, figsize=(1.9 + cols * 0.8, num_rows * 0.95 + 0.5), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        for i in range(cols):
            ax = axes[r, i]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if i < images.shape[0]:
                ax.imshow(images[i].reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8, labelpad=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def per_image(result: SVIResult, num_data: int) -> pd.DataFrame:
    """The history with the ELBO and its terms divided by the training-set size: nats per image."""
    history = result.history.copy()
    for column in ("loss", "elbo", "reconstruction", "kl", "entropy", "cross_entropy", "expected_log_joint"):
        if column in history.columns:
            history[column] = history[column] / num_data
    return history


def vae_decomposition(plt: Any, study: VAEStudy, path: str, converged: dict | None = None) -> None:
    """
    One panel per KL weighting: ELBO, reconstruction and KL over training in nats per
    training image (the runner's history is for the whole training set), β on a second axis.
    """
    from .. import plots

    converged_by_name = converged or {}
    num_data = study.extra.get("num_train", 1497)
    fig, axes = plt.subplots(1, len(study.configs), figsize=(4.2 * len(study.configs), 3.9), sharey=True)
    smooth = max(1, study.num_steps // 50)
    for ax, config in zip(axes, study.configs):
        plots.plot_decomposition(
            per_image(study.results[config.name], num_data),
            ax=ax,
            terms=("elbo", "reconstruction", "kl"),
            smooth=smooth,
        )
        converged = converged_by_name.get(config.name, True)
        ax.set_title(config.label + ("" if converged else "\n(NOT CONVERGED)"), fontsize=10)
        ax.set_ylabel("nats per training image")
        if ax is not axes[-1]:
            ax.get_legend().remove()
        else:
            handles, labels = ax.get_legend_handles_labels()
            if ax.beta_axis is not None:
                h2, l2 = ax.beta_axis.get_legend_handles_labels()
                handles, labels = handles + h2, labels + l2
            ax.get_legend().remove()
            ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.2, 1.0), fontsize=8, frameon=False)
        if ax.beta_axis is not None and ax is not axes[-1]:
            ax.beta_axis.set_ylabel("")
    rolling = f"; rolling mean of {smooth} steps" if smooth > 1 else ""
    fig.suptitle(
        f"ELBO decomposition over training (training minibatches, nats per image{rolling}); β on the right axis",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def vae_rate_distortion(plt: Any, study: VAEStudy, path: str) -> None:
    """One point per KL weighting (not joined), ± 1 Monte Carlo se, and the best R + D line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    markers = ["o", "s", "^", "D"]
    points = []
    for i, config in enumerate(study.configs):
        rd = study.evaluations[config.name]["rate_distortion"]
        points.append((rd.rate, rd.distortion))
        # one separate point per method, ± 1 Monte Carlo standard error: methods are not joined by a line
        ax.errorbar(
            [rd.rate],
            [rd.distortion],
            xerr=[getattr(rd, "rate_stderr", 0.0) or 0.0],
            yerr=[getattr(rd, "distortion_stderr", 0.0) or 0.0],
            marker=markers[i % 4],
            color=f"C{i}",
            linestyle="none",
            capsize=3,
            markersize=7,
            label=config.label,
        )
    rates, dists = zip(*points)
    best = min(r + d for r, d in points)
    span = max(max(rates) - min(rates), max(dists) - min(dists), 1.0)
    r = np.linspace(max(0.0, min(rates) - 0.3 * span), max(rates) + 0.3 * span, 50)
    ax.plot(
        r,
        best - r,
        color="grey",
        linestyle="--",
        linewidth=1,
        label=f"R + D = {best:.1f} nats (the best held-out -ELBO)",
    )
    ax.set_xlim(r[0], r[-1])
    ax.set_ylim(min(dists) - 0.3 * span, max(dists) + 0.3 * span)
    ax.set_xlabel("rate R = KL(q(z|x) || p(z)) (nats per held-out image)")
    ax.set_ylabel("distortion D = -E_q log p(x|z) (nats per held-out image)")
    ax.set_title("Rate–distortion on held-out images (± 1 Monte Carlo standard error)", fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def vae_images(plt: Any, vae: DigitsVAE, x: torch.Tensor, label: str, path: str) -> None:
    """Held-out images, their reconstructions and prior samples, each row labelled."""
    import torch

    from .vae import TOTAL_COUNT

    with torch.no_grad():
        loc, _ = vae.encode(x)
        recon = torch.sigmoid(vae.decode(loc))
        samples = torch.sigmoid(vae.decode(torch.randn(10, vae.latent_dim, generator=torch.Generator().manual_seed(0))))
    rows = [(x / TOTAL_COUNT).numpy(), recon.numpy(), samples.numpy()]
    image_grid(plt, rows, ROW_LABELS, f"{label}: pixel intensity (count / 16; black = 16)", path)
