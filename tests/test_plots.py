# SPDX-License-Identifier: Apache-2.0
"""Plots run headless (Agg), return axes with a title, labelled axes (units) and a legend."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo_lab import BetaELBO, SVIRunner, arviz_compat, from_svi_result, plots, summarize, to_inference_data
from pyro_elbo_lab.runner import Evaluation
from pyro_elbo_lab.schedules import LinearWarmup

N = 12


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def model(x):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(a + b, 1.0), obs=x)


def guide(x):
    for name in ("a", "b"):
        loc = pyro.param(f"{name}_loc", torch.tensor(0.0))
        scale = pyro.param(f"{name}_scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample(name, dist.Normal(loc, scale))


@pytest.fixture(scope="module")
def fitted():
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = torch.linspace(0.0, 2.0, N)
    runner = SVIRunner(
        model,
        guide,
        pyro.optim.Adam({"lr": 0.05}),
        BetaELBO(beta=LinearWarmup(20, start=0.1)),
        progress_bar=False,
        num_chains=2,
        seed=0,
        evaluation=Evaluation(every=20, num_samples=200),
    )
    result = runner.run(x, num_steps=40)
    idata = from_svi_result(result, num_samples=100)
    return result, idata


def assert_labelled(ax, units=True):
    assert ax.get_title()
    assert ax.get_xlabel() and ax.get_ylabel()
    if units:
        assert "nats" in ax.get_ylabel() or "nats" in ax.get_xlabel()
    assert ax.get_legend() is not None and len(ax.get_legend().get_texts()) > 0


def test_backend_is_headless():
    assert matplotlib.get_backend().lower() == "agg"


def test_plot_decomposition(fitted):
    result, idata = fitted
    ax = plots.plot_decomposition(result, smooth=5)
    assert_labelled(ax)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "ELBO (chain 0)" in labels and "β" in labels
    assert "β" in ax.beta_axis.get_ylabel()
    # the drawn line is the (smoothed) history
    line = ax.get_lines()[0]
    expected = result.chain_history(0)["elbo"].rolling(5, min_periods=1).mean().to_numpy()
    assert np.allclose(line.get_ydata(), expected)
    beta = ax.beta_axis.get_lines()[0].get_ydata()
    assert beta[0] == pytest.approx(0.1) and beta[-1] == pytest.approx(1.0)
    # the same plot from the InferenceData's optimization_history group
    ax2 = plots.plot_decomposition(idata, chain=1)
    assert np.allclose(ax2.get_lines()[0].get_ydata(), result.chain_history(1)["elbo"].to_numpy())


def test_plot_kl_per_site(fitted):
    result, _ = fitted
    ax = plots.plot_kl_per_site(result, smooth=3, chain=1)
    assert_labelled(ax)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "total KL"]
    with pytest.raises(ValueError, match="per-site KL"):
        plots.plot_kl_per_site(pd.DataFrame({"step": [0], "loss": [1.0]}))


def test_plot_rate_distortion():
    frame = pd.DataFrame({"beta": [4.0, 1.0, 0.25], "rate": [1.0, 3.0, 6.0], "distortion": [9.0, 5.0, 4.5]})
    ax = plots.plot_rate_distortion(frame)
    assert_labelled(ax)
    assert len(ax.texts) == 3  # one β annotation per point
    # points sorted by β; the best -ELBO = min(R + D) = 8 line
    assert np.array_equal(ax.get_lines()[0].get_xdata(), [6.0, 3.0, 1.0])
    assert "8 nats" in ax.get_legend().get_texts()[1].get_text()
    with pytest.raises(ValueError, match="distortion"):
        plots.plot_rate_distortion({"rate": [1.0]})


def test_plot_rate_distortion_from_diagnostics():
    from pyro_elbo_lab import RateDistortion

    points = [
        RateDistortion(rate=r, distortion=d, rate_stderr=0.1, distortion_stderr=0.2, beta=b)
        for b, r, d in [(2.0, 1.0, 6.0), (0.5, 4.0, 3.0)]
    ]
    ax = plots.plot_rate_distortion(points)
    assert_labelled(ax)
    assert any("standard error" in t.get_text() for t in ax.get_legend().get_texts())


def test_plot_pareto_k(fitted):
    result, idata = fitted
    ax = plots.plot_pareto_k(idata)
    assert_labelled(ax, units=False)
    heights = [p.get_height() for p in ax.patches]
    # each bar is ArviZ's own k̂ of that chain's log importance weights (psis_diagnostics wraps
    # ArviZ's psislw with relative efficiency 1: the same computation, 1e-12 for rounding)
    lw = idata.sample_stats["log_importance_weight"].values
    assert heights == pytest.approx([float(arviz_compat.psislw(lw[c])[1]) for c in range(2)], rel=1e-12)
    ax = plots.plot_pareto_k(result)  # k̂ over training from the evaluation rows
    assert_labelled(ax, units=False)
    assert ax.get_lines()[0].get_xdata().tolist() == [19, 39]
    ax = plots.plot_pareto_k({"fit A": 0.3, "fit B": 0.9})
    assert [p.get_height() for p in ax.patches] == [0.3, 0.9]
    with pytest.raises(ValueError, match=r"evaluation=Evaluation\(every=N\)"):
        plots.plot_pareto_k(pd.DataFrame({"step": [0], "loss": [1.0]}))


def test_plot_pareto_k_colours_follow_the_verdict():
    # regression: k̂ = -inf (constant weights: the guide is exact) was drawn as a red "bad"
    # bar and NaN (too few draws) as red; the colours are those of EvidenceEstimate.verdict
    from matplotlib.colors import to_rgba

    from pyro_elbo_lab.diagnostics.psis import PARETO_K_BAD, PARETO_K_GOOD

    ks = {"exact": -np.inf, "few draws": np.nan, "good": 0.3, "ok": 0.6, "bad": 0.9}
    ax = plots.plot_pareto_k(ks)
    colours = [p.get_facecolor() for p in ax.patches]
    assert colours == [to_rgba(c) for c in ("C2", "grey", "C2", "C1", "C3")]
    assert [p.get_height() for p in ax.patches] == [0.0, 0.0, 0.3, 0.6, 0.9]
    assert sorted(line.get_ydata()[0] for line in ax.get_lines()) == [PARETO_K_GOOD, PARETO_K_BAD]


def test_plot_decomposition_draws_the_capacity_in_nats():
    # regression: the capacity (nats) was drawn on the β axis, whose limits come from β
    # alone, so a capacity of 25 nats was off the plot
    frame = pd.DataFrame(
        {
            "step": range(5),
            "elbo": [-30.0, -20.0, -15.0, -12.0, -11.0],
            "beta": [0.5] * 5,
            "capacity": [0.0, 5.0, 10.0, 20.0, 25.0],
        }
    )
    ax = plots.plot_decomposition(frame)
    capacity = [line for line in ax.get_lines() if line.get_label() == "capacity C (nats)"]
    assert len(capacity) == 1 and capacity[0].get_ydata().tolist() == [0.0, 5.0, 10.0, 20.0, 25.0]
    lo, hi = ax.get_ylim()
    assert lo <= -30.0 and hi >= 25.0  # ELBO and capacity both inside the nats axis
    assert "capacity C (nats)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert all(line.get_label() != "capacity C (nats)" for line in ax.beta_axis.get_lines())


@pytest.mark.skipif(arviz_compat.generation() >= 1, reason="ArviZ 0.2x plotting API")
def test_arviz_plots_work_on_the_inference_data(fitted):
    import arviz as az

    _, idata = fitted
    assert az.plot_trace(idata, var_names=["a", "b"]).shape == (2, 2)
    assert len(np.atleast_1d(az.plot_posterior(idata, var_names=["a"]))) == 1
    assert len(az.plot_forest(idata, var_names=["a", "b"])) == 1


def test_summary_runs_with_chains(fitted):
    result, idata = fitted
    summary = summarize(idata)
    assert list(summary.vi.index) == [0, 1]
    assert {"elbo", "kl", "log_evidence", "gap", "pareto_k", "verdict", "ess", "r_hat"} <= set(summary.vi.columns)
    assert np.isfinite(summary.posterior.loc["a", "r_hat"])
    assert "<h4>" in summary._repr_html_()


def test_rate_distortion_labels_and_limits_frame_the_points():
    """β given as labels (schedules) annotates with the label; the axes frame the fits."""
    import pandas as pd

    frame = pd.DataFrame(
        {"rate": [1.0, 5.0, 9.0], "distortion": [50.0, 40.0, 38.0], "beta": ["β = 4", "warm-up", "β = 1"]}
    )
    ax = plots.plot_rate_distortion(frame)
    assert sorted(t.get_text() for t in ax.texts) == ["warm-up", "β = 1", "β = 4"]
    # 15% padding of the points' range: rate 1..9 -> (-0.2, 10.2), distortion 38..50 -> (36.2, 51.8)
    assert ax.get_xlim() == pytest.approx((-0.2, 10.2))
    assert ax.get_ylim() == pytest.approx((36.2, 51.8))


def test_forest_plot_of_several_fits(fitted):
    # regression (ArviZ 1.x): fits with other chain / draw counts were NaN-padded and drawn empty
    _, idata = fitted
    other = to_inference_data(model, guide, torch.linspace(0.0, 2.0, N), num_samples=30)  # 1 chain x 30 draws
    fig = arviz_compat.plot_forest({"fit": idata, "other": other}, var_names=["a", "b"], ci_prob=0.9)
    labels = {t.get_text().strip() for ax in fig.axes for t in list(ax.texts) + list(ax.get_yticklabels())}
    assert {"a", "b"} <= labels
    # the intervals are drawn: the forest's x axis spans the draws (an empty axis keeps (0, 1))
    draws = np.concatenate([arviz_compat.group(d, "posterior")[v].values.ravel() for d in (idata, other) for v in "ab"])
    spans = [ax.get_xlim() for ax in fig.axes if ax.get_xlim() != (0.0, 1.0)]
    assert len(spans) == 1
    lo, hi = spans[0]
    assert lo < np.quantile(draws, 0.5) < hi


def test_plot_arguments_are_checked(fitted):
    result, idata = fitted
    one_chain = result.chain_history(0).drop(columns=["chain"], errors="ignore")
    with pytest.raises(ValueError, match=r"terms=\['nope'\].*available terms: \[.*'elbo'"):
        plots.plot_decomposition(result, terms=["nope"])
    with pytest.raises(ValueError, match=r"chain=5.*2 chain\(s\), numbered \[0, 1\]"):
        plots.plot_decomposition(result, chain=5)
    with pytest.raises(ValueError, match=r"chain=5.*1 chain\(s\), numbered \[0\]"):
        plots.plot_decomposition(one_chain, chain=5)
    with pytest.raises(ValueError, match=r"chain=1.*1 chain\(s\)"):
        plots.plot_kl_per_site(one_chain, chain=1)
    with pytest.raises(ValueError, match=r"ax must be a matplotlib Axes.*str 'x'"):
        plots.plot_decomposition(result, ax="x")
    with pytest.raises(ValueError, match=r"file name \('file.nc'\).*arviz_compat.from_netcdf"):
        plots.plot_pareto_k("file.nc")
    # the checks accept what is valid: chain 0 of the one-chain history is its only line
    ax = plots.plot_decomposition(one_chain, chain=0, terms=["elbo"], beta=False)
    assert np.allclose(ax.get_lines()[0].get_ydata(), result.chain_history(0)["elbo"].to_numpy())
