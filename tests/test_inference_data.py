# SPDX-License-Identifier: Apache-2.0
"""to_inference_data: groups, dims, exact log densities, netCDF round trip, az.loo, summary."""
from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest
import torch

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
from pyro.infer.autoguide import AutoNormal

from pyro_elbo_lab import BetaELBO, SVIRunner, to_inference_data

N = 20
S = 4000


@pytest.fixture
def data():
    return torch.linspace(-1.0, 3.0, N)


def model(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def guide(x):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def exact(x):
    """Posterior mean, sd and log evidence of z ~ N(0, 1), x_i ~ N(z, 1)."""
    n = x.shape[0]
    log_evidence = float(dist.MultivariateNormal(torch.zeros(n), torch.eye(n) + torch.ones(n, n)).log_prob(x))
    return float(x.sum() / (n + 1)), math.sqrt(1.0 / (n + 1)), log_evidence


def set_guide(loc, scale):
    pyro.param("loc", torch.tensor(loc))
    pyro.param("scale", torch.tensor(scale), constraint=dist.constraints.positive)


def test_groups_and_exact_log_densities(data):
    set_guide(0.5, 0.3)
    idata = to_inference_data(model, guide, data, num_samples=500)
    assert set(idata.groups()) == {"posterior", "log_likelihood", "sample_stats", "observed_data"}
    z = torch.as_tensor(idata.posterior["z"].values)
    assert z.shape == (1, 500)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "data")
    assert np.array_equal(idata.observed_data["x"].values, data.numpy())
    # every stored log density equals its closed form at the stored draws
    ll = dist.Normal(z.unsqueeze(-1), 1.0).log_prob(data)
    assert np.allclose(idata.log_likelihood["x"].values, ll.numpy(), rtol=1e-12, atol=1e-12)
    log_joint = dist.Normal(0.0, 1.0).log_prob(z) + ll.sum(-1)
    log_guide = dist.Normal(0.5, 0.3).log_prob(z)
    stats = idata.sample_stats
    assert np.allclose(stats["log_joint"].values, log_joint.numpy(), rtol=1e-12)
    assert np.allclose(stats["lp"].values, log_joint.numpy(), rtol=1e-12)
    assert np.allclose(stats["log_guide"].values, log_guide.numpy(), rtol=1e-12)
    assert np.allclose(stats["log_importance_weight"].values, (log_joint - log_guide).numpy(), rtol=1e-12)
    # drawing does not record gradients or parameters of its own
    assert set(pyro.get_param_store().keys()) == {"loc", "scale"}


def test_evidence_from_the_file_alone(data, tmp_path):
    m, s, log_evidence = exact(data)
    # the exact posterior as guide: every weight is p(x) exactly
    set_guide(m, s)
    idata = to_inference_data(model, guide, data, num_samples=100)
    lw = idata.sample_stats["log_importance_weight"].values
    assert np.allclose(lw, log_evidence, atol=1e-9)
    # a wider, shifted guide: the importance-sampling estimate from the netCDF file, within 5
    # of its delta-method standard errors of the closed form
    pyro.clear_param_store()
    set_guide(m + 0.1, 1.5 * s)
    path = tmp_path / "fit.nc"
    to_inference_data(model, guide, data, num_samples=S).to_netcdf(str(path))
    lw = az.from_netcdf(str(path)).sample_stats["log_importance_weight"].values.reshape(-1)
    w = np.exp(lw - lw.max())
    estimate = lw.max() + np.log(w.mean())
    stderr = w.std() / (math.sqrt(S) * w.mean())
    assert estimate == pytest.approx(log_evidence, abs=5 * stderr)
    _, k = az.psislw(lw.copy())
    assert k < 0.5  # a wider Gaussian proposal has bounded weights


def test_log_likelihood_applies_the_mask(data):
    # regression: the pointwise log-likelihood ignored poutine.mask; a masked-out point
    # contributes 0 to the model's log_prob and so to log_likelihood (and loo/waic)
    keep = torch.arange(N) % 3 != 0

    def masked(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]), poutine.mask(mask=keep):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    set_guide(0.5, 0.3)
    idata = to_inference_data(masked, guide, data, num_samples=50)
    z = torch.as_tensor(idata.posterior["z"].values)
    # closed form at the stored draws, zero where masked (float64 rounding: 1e-12)
    ll = torch.where(keep, dist.Normal(z.unsqueeze(-1), 1.0).log_prob(data), torch.zeros(()))
    assert np.allclose(idata.log_likelihood["x"].values, ll.numpy(), rtol=1e-12, atol=1e-12)
    assert (idata.log_likelihood["x"].values[..., ~keep.numpy()] == 0).all()
    # the pointwise values sum to the log joint minus the prior, as Pyro's masked log_prob
    prior = dist.Normal(0.0, 1.0).log_prob(z).numpy()
    total = idata.log_likelihood["x"].values.sum(-1) + prior
    assert np.allclose(total, idata.sample_stats["log_joint"].values, rtol=1e-12, atol=1e-12)


def hier(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.deterministic("two_mu", 2 * mu)
    pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("groups", 3, dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        with pyro.plate("obs", 4, dim=-2):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def test_dims_from_plates_and_overrides():
    y = torch.arange(12.0).reshape(4, 3) / 6
    g = AutoNormal(hier)
    g(y)
    idata = to_inference_data(
        hier, g, y, num_samples=50, coords={"groups": ["a", "b", "c"]}, dims={"w": ["component"]},
        constant_data={"design": np.ones(3)}, posterior_predictive=True,
    )
    post = idata.posterior
    assert post["mu"].dims == ("chain", "draw")
    assert post["theta"].dims == ("chain", "draw", "groups")
    assert post["w"].dims == ("chain", "draw", "component") and post["w"].shape == (1, 50, 2)
    assert post["groups"].values.tolist() == ["a", "b", "c"]
    assert np.allclose(post["two_mu"].values, 2 * post["mu"].values)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs", "groups")
    assert idata.observed_data["y"].dims == ("obs", "groups")
    assert np.array_equal(idata.observed_data["y"].values, y.numpy())
    assert "design" in idata.constant_data
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "obs", "groups")
    # log p(y | theta) per element at the stored draws
    theta = torch.as_tensor(post["theta"].values)
    ll = dist.Normal(theta.unsqueeze(-2), 1.0).log_prob(y)
    assert np.allclose(idata.log_likelihood["y"].values, ll.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"dims\['w'\].*2 dimensions.*1 after \(chain, draw\)"):
        to_inference_data(hier, g, y, num_samples=5, dims={"w": ["a", "b"]})


def test_observed_site_with_event_dims():
    # images-like data: 5 points of dimension 3; the log-likelihood is per point
    x = torch.arange(15.0).reshape(5, 3) / 10

    def vec_model(x):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    g = AutoNormal(vec_model)
    g(x)
    idata = to_inference_data(vec_model, g, x, num_samples=40, posterior_predictive=True)
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "data")
    assert idata.observed_data["x"].dims == ("data", "x_dim_1")
    assert idata.posterior_predictive["x"].dims == ("chain", "draw", "data", "x_dim_1")
    assert idata.posterior["z"].dims == ("chain", "draw", "z_dim_0")
    z = torch.as_tensor(idata.posterior["z"].values)
    ll = dist.Normal(z.unsqueeze(-2), 1.0).log_prob(x).sum(-1)
    assert np.allclose(idata.log_likelihood["x"].values, ll.numpy(), rtol=1e-12)


def test_posterior_predictive_moments(data):
    # x_rep = z + eps with z ~ q = N(0.7, 0.2^2): mean 0.7, variance 1 + 0.04. With 4000 x 20
    # replicated values the sample mean has sd ~ sqrt(0.04/4000 + 1/80000) = 0.0047 and
    # the variance estimate sd ~ 1.04 * sqrt(2/80000) = 0.0052 (plus the shared-z correlation
    # 0.04 * sqrt(2/4000) = 0.0009); 5 of those.
    set_guide(0.7, 0.2)
    idata = to_inference_data(model, guide, data, num_samples=S, posterior_predictive=True)
    rep = idata.posterior_predictive["x"].values
    assert rep.shape == (1, S, N)
    assert rep.mean() == pytest.approx(0.7, abs=5 * 0.0047)
    assert rep.var() == pytest.approx(1.04, abs=5 * 0.0061)


def test_result_netcdf_round_trip_and_loo(data, tmp_path):
    result = SVIRunner(model, guide, pyro.optim.Adam({"lr": 0.05}), BetaELBO(), progress_bar=False,
                       num_chains=2, seed=0).run(data, num_steps=30)
    idata = result.to_inference_data(num_samples=200)
    assert idata.posterior.sizes == {"chain": 2, "draw": 200}
    hist = idata.optimization_history
    assert hist["elbo"].dims == ("chain", "step") and hist.sizes["step"] == 30
    assert hist["kl_per_site"].dims == ("chain", "step", "site")
    assert hist["site"].values.tolist() == ["x", "z"]
    assert np.allclose(hist["elbo"].sel(chain=1).values, result.chain_history(1)["elbo"].to_numpy())
    assert np.isnan(hist["kl_per_site"].sel(site="x").values).all()
    # each chain's draws come from its own parameters: log q(z_s) at the stored draws is the
    # closed-form density of that chain's N(loc, scale^2) (float64 rounding: 1e-12)
    for c in range(2):
        params = result.chain_states[c]["params"]
        loc, scale = float(params["loc"]), float(params["scale"].exp())
        z = torch.as_tensor(idata.posterior["z"].sel(chain=c).values)
        expected = dist.Normal(loc, scale).log_prob(z).numpy()
        assert np.allclose(idata.sample_stats["log_guide"].sel(chain=c).values, expected, rtol=1e-12, atol=1e-12)

    path = tmp_path / "result.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(back.groups()) == set(idata.groups())
    for group in back.groups():
        for name in idata[group].data_vars:
            assert np.array_equal(back[group][name].values, idata[group][name].values, equal_nan=True), (group, name)
    assert back.optimization_history["step"].values.tolist() == list(range(30))

    loo = az.loo(back, pointwise=True)
    assert np.isfinite(loo.elpd_loo) and loo.pareto_k.shape == (N,)


def test_loo_matches_exact_leave_one_out(data):
    # with the exact posterior as guide, PSIS-LOO estimates the exact
    # sum_i log p(x_i | x_-i), x_i | x_-i ~ N(sum_-i x / n, 1 + 1/n) (n = N - 1 + 1 prior)
    m, s, _ = exact(data)
    set_guide(m, s)
    idata = to_inference_data(model, guide, data, num_samples=S)
    loo = az.loo(idata)
    rest = data.sum() - data
    exact_loo = float(dist.Normal(rest / N, math.sqrt(1 + 1 / N)).log_prob(data).sum())
    # PSIS-LOO's Monte Carlo error is far below its reported SE (which is the spread over
    # data points); 0.05 nats covers 5 Monte Carlo standard errors at S = 4000
    assert loo.elpd_loo == pytest.approx(exact_loo, abs=0.05)
    assert (loo.pareto_k.values < 0.5).all()
    # WAIC is asymptotically equal to LOO; here (20 points, one parameter) they differ by
    # O(1/N) nats in total: 0.05 + 1/N
    assert az.waic(idata).elpd_waic == pytest.approx(exact_loo, abs=0.05 + 1 / N)


def test_summary_psis_corrects_a_shifted_guide(data):
    m, s, log_evidence = exact(data)
    set_guide(m + 0.15, 1.5 * s)
    result = SVIRunner(model, guide, pyro.optim.Adam({"lr": 1e-12}), BetaELBO(), progress_bar=False).run(data, num_steps=3)
    # 16 S draws: the gap's Monte Carlo error below needs them (see there)
    S_big = 16 * S
    summary = result.summary(num_samples=S_big)
    row = summary.posterior.loc["z"]
    vi = summary.vi.loc[0]
    # the raw guide mean: S_big draws of N(m + 0.15, (1.5 s)^2), 5 standard errors 1.5 s / sqrt(S_big),
    # plus az.summary's display rounding (to 3 digits here: at most 0.005)
    assert row["mean"] == pytest.approx(m + 0.15, abs=5 * 1.5 * s / math.sqrt(S_big) + 0.005)
    # the PSIS-corrected mean is within 5 standard errors s / sqrt(ESS) of the exact posterior mean
    assert row["psis_mean"] == pytest.approx(m, abs=5 * s / math.sqrt(vi["ess"]))
    assert vi["log_evidence"] == pytest.approx(log_evidence, abs=5 * vi["log_evidence_stderr"])
    assert vi["verdict"] == "good" and vi["pareto_k"] < 0.5
    # gap = KL(q || p(z|x)) in closed form for two Gaussians. By the delta method the gap's
    # error is the mean over the draws of w / E[w] - log w, whose sd under q is 0.92 here
    # (computed from 4e6 draws; 1000 replicates at S draws gave 0.0147 = 0.92 / sqrt(S)):
    # 5 standard errors 5 * 0.92 / sqrt(S_big) = 0.018
    q_scale = 1.5 * s
    kl = math.log(s / q_scale) + (q_scale**2 + 0.15**2) / (2 * s**2) - 0.5
    assert vi["gap"] == pytest.approx(kl, abs=5 * 0.92 / math.sqrt(S_big))
    assert math.isnan(vi["r_hat"])
    text = str(summary)
    assert "psis_mean" in text and "log_evidence" in text
    with pytest.raises(ValueError, match="last must be a positive integer"):
        result.summary(idata=to_inference_data(model, guide, data, num_samples=30), last=0)


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="num_samples"):
        to_inference_data(model, guide, data, num_samples=0)
