# SPDX-License-Identifier: Apache-2.0
"""
rate_distortion against the linear-Gaussian VAE, whose β-optimal encoder, rate and
distortion are closed form, and the Normal–Normal model with a global latent.
"""

from __future__ import annotations

import math
import types

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_elbo_lab
from pyro_elbo_lab import plots
from pyro_elbo_lab.diagnostics import RateDistortion, rate_distortion, rate_distortion_sweep

N, SIGMA = 30, 0.7


@pytest.fixture
def data():
    return torch.randn(N)


def vae_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x)


def optimal_encoder(beta, x):
    """argmax over q(z|x) = N(m, s²) of E_q log p(x|z) - β KL(q ‖ N(0,1)): m = x/(1+βσ²), s² = βσ²/(1+βσ²)."""
    return x / (1 + beta * SIGMA**2), beta * SIGMA**2 / (1 + beta * SIGMA**2)


def normal_guide(loc, var):
    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, math.sqrt(var)))

    return guide


def exact_rate_distortion(x, m, s2):
    rate = (0.5 * (s2 + m**2 - 1 - math.log(s2))).mean()
    distortion = (0.5 * math.log(2 * math.pi * SIGMA**2) + ((x - m) ** 2 + s2) / (2 * SIGMA**2)).mean()
    return float(rate), float(distortion)


@pytest.mark.parametrize("beta", [0.5, 1.0, 4.0])
def test_linear_gaussian_vae(data, beta):
    m, s2 = optimal_encoder(beta, data)
    rd = rate_distortion(vae_model, normal_guide(m, s2), data, num_samples=400, beta=beta)
    rate, distortion = exact_rate_distortion(data, m, s2)
    assert rd.kl_method == {"z": "analytic"}
    assert rd.rate == pytest.approx(rate, abs=1e-12)  # analytic KL, parameters fixed
    assert rd.rate_stderr == 0
    assert rd.distortion == pytest.approx(distortion, abs=5 * rd.distortion_stderr)  # 5 standard errors
    assert rd.num_datapoints == N and rd.plate == "data" and rd.beta == beta
    # the rate is exact, so ELBO and objective carry the distortion's error only: 5 standard errors
    assert rd.elbo == pytest.approx(-(distortion + rate), abs=5 * rd.distortion_stderr)
    assert rd.objective(beta) == pytest.approx(-(distortion + beta * rate), abs=5 * rd.distortion_stderr)


def test_keyword_data_in_any_mapping(data):
    # model_kwargs may be any mapping (a read-only view here), not only a dict; the keyword data
    # reach model and guide: the rate is the closed-form KL of the optimal encoder at β = 1
    m, s2 = optimal_encoder(1.0, data)
    guide = normal_guide(m, s2)

    def model(*, x):
        vae_model(x)

    def guide_kw(*, x):
        guide(x)

    rd = rate_distortion(model, guide_kw, model_kwargs=types.MappingProxyType({"x": data}), num_samples=10)
    rate, _ = exact_rate_distortion(data, m, s2)
    assert rd.rate == pytest.approx(rate, abs=1e-12)
    assert rd.num_datapoints == N


def test_sweep_traces_the_rate_distortion_curve(data):
    fitted = []

    def fit(beta):
        fitted.append(beta)
        m, s2 = optimal_encoder(beta, data)
        return vae_model, normal_guide(m, s2)

    betas = [0.25, 1.0, 4.0]
    frame = rate_distortion_sweep(fit, betas, data, num_samples=400)
    assert fitted == betas
    assert list(frame.index) == betas
    columns = ["beta", "rate", "distortion", "rate_stderr", "distortion_stderr", "elbo", "objective"]
    assert list(frame.columns) == columns
    for beta, row in frame.iterrows():
        rate, distortion = exact_rate_distortion(data, *optimal_encoder(beta, data))
        assert row["rate"] == pytest.approx(rate, abs=1e-12)
        assert row["distortion"] == pytest.approx(distortion, abs=5 * row["distortion_stderr"])
        assert row["objective"] == pytest.approx(-(distortion + beta * rate), abs=5 * row["distortion_stderr"])
        assert row["elbo"] == pytest.approx(-(distortion + rate), abs=5 * row["distortion_stderr"])
    # larger β buys lower rate at higher distortion (exact rates, distortions 0.2+ nats apart)
    assert frame["rate"].is_monotonic_decreasing
    assert frame["distortion"].is_monotonic_increasing
    # the ELBO (β = 1 objective) is largest at the β = 1 optimum; differences >> stderr here
    assert frame["elbo"].idxmax() == 1.0


def test_sweep_table_feeds_the_rate_distortion_plot(data):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    frame = rate_distortion_sweep(lambda b: (vae_model, normal_guide(*optimal_encoder(b, data))), [0.5, 2.0], data)
    ax = plots.plot_rate_distortion(frame)
    assert len(ax.texts) == 2  # one β label per fit
    plt.close(ax.figure)


def test_global_latent_rate_is_divided_by_n():
    x = torch.tensor([0.3, 1.2, -0.4, 2.0, 0.9, 1.7])
    tau0, sigma, m, s = 2.0, 1.0, 0.8, 0.35

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, tau0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, sigma), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(m, s))

    rd = rate_distortion(model, guide, x, num_samples=2000)
    n = len(x)
    kl = math.log(tau0 / s) + (s**2 + m**2) / (2 * tau0**2) - 0.5
    distortion = float((0.5 * math.log(2 * math.pi * sigma**2) + ((x - m) ** 2 + s**2) / (2 * sigma**2)).mean())
    assert rd.num_datapoints == n
    assert rd.rate == pytest.approx(kl / n, abs=1e-12)
    assert rd.rate_per_site == {"mu": pytest.approx(kl / n, abs=1e-12)}
    assert rd.distortion == pytest.approx(distortion, abs=5 * rd.distortion_stderr)
    assert rd.distortion_per_site["obs"] == pytest.approx(rd.distortion, abs=1e-12)


def test_subsampled_plate_gives_per_datapoint_values(data):
    idx = torch.tensor([0, 4, 9, 17, 23])
    m, s2 = optimal_encoder(1.0, data)

    def model(x):
        with pyro.plate("data", len(x), subsample=idx):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA), obs=x[idx])

    def guide(x):
        with pyro.plate("data", len(x), subsample=idx):
            pyro.sample("z", dist.Normal(m[idx], math.sqrt(s2)))

    rd = rate_distortion(model, guide, data, num_samples=400)
    rate, distortion = exact_rate_distortion(data[idx], m[idx], s2)
    # Pyro scales the 5 terms by N/5; dividing by N leaves their mean
    assert rd.num_datapoints == N
    assert rd.rate == pytest.approx(rate, abs=1e-12)
    assert rd.distortion == pytest.approx(distortion, abs=5 * rd.distortion_stderr)


def test_monte_carlo_rate(data):
    nu = 5.0
    m, s2 = optimal_encoder(1.0, data)
    s = math.sqrt(s2)

    def guide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.StudentT(nu, m, s))

    rd = rate_distortion(vae_model, guide, data, num_samples=4000, batch_size=1500)
    assert rd.kl_method == {"z": "monte carlo"}
    # KL(T_ν(m, s) ‖ N(0, 1)) = -H[T] + ½ log 2π + ½ (m² + s² ν/(ν-2)), exactly
    entropy = dist.StudentT(nu, m, s).entropy()
    exact = float((-entropy + 0.5 * math.log(2 * math.pi) + 0.5 * (m**2 + s2 * nu / (nu - 2))).mean())
    assert rd.rate_stderr > 0
    assert rd.rate == pytest.approx(exact, abs=5 * rd.rate_stderr)  # 5 standard errors


def test_model_without_plate_is_per_dataset():
    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, SIGMA), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.5, 0.5))

    rd = rate_distortion(model, guide, torch.tensor(1.0), num_samples=2)
    assert rd.plate is None and rd.num_datapoints == 1
    assert rd.rate == pytest.approx(math.log(1 / 0.5) + (0.25 + 0.25) / 2 - 0.5, abs=1e-12)


def test_result_api_and_errors(data):
    m, s2 = optimal_encoder(1.0, data)
    guide = normal_guide(m, s2)
    rd = rate_distortion(vae_model, guide, data, num_samples=1)
    assert pyro_elbo_lab.rate_distortion is rate_distortion and pyro_elbo_lab.RateDistortion is RateDistortion
    assert math.isnan(rd.distortion_stderr)  # one sample
    d = rd.as_dict()
    assert {"rate", "distortion", "elbo", "rate/z", "distortion/x"} <= set(d)
    assert "nats per datapoint" in str(rd)
    row = rate_distortion(vae_model, guide, data, num_samples=400, beta=2.0).to_dataframe()
    assert list(row.index) == [2.0]
    rate, distortion = exact_rate_distortion(data, m, s2)
    assert row.loc[2.0, "rate"] == pytest.approx(rate, abs=1e-12)  # analytic KL, parameters fixed
    se = row.loc[2.0, "distortion_stderr"]  # 5 standard errors of the distortion, the only noisy term
    assert row.loc[2.0, "objective"] == pytest.approx(-(distortion + 2.0 * rate), abs=5 * se)
    assert row.loc[2.0, "elbo"] == pytest.approx(-(distortion + rate), abs=5 * se)

    with pytest.raises(ValueError, match="plate='nope' is not a vectorised plate"):
        rate_distortion(vae_model, guide, data, plate="nope")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        rate_distortion(vae_model, guide, data, num_samples=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        rate_distortion(vae_model, guide, data, batch_size=0)
    with pytest.raises(ValueError, match="betas must be finite numbers >= 0, got -1"):
        rate_distortion_sweep(lambda b: (vae_model, guide), [1.0, -1], data)
    with pytest.raises(ValueError, match=r"fit\(beta\) must return a \(model, guide\) pair"):
        rate_distortion_sweep(lambda b: guide, [1.0], data)
    with pytest.raises(ValueError, match=r"betas is empty"):
        rate_distortion_sweep(lambda b: (vae_model, guide), [], data)
    with pytest.raises(ValueError, match="latent site 'z' has no site in the guide"):
        rate_distortion(vae_model, lambda x: None, data)


@pytest.mark.parametrize("where", ["model", "guide"])
def test_masked_datapoints_are_left_out(data, where):
    # half the data masked (in the model, or in the guide with Distribution.mask); their
    # encoder output is 40 prior sds away, so counting them would dominate R and D
    keep = torch.arange(N) % 2 == 1
    m, s2 = optimal_encoder(1.0, data)
    loc = m + torch.where(keep, 0.0, 40.0)

    def model(x):
        with pyro.plate("data", len(x)), poutine.mask(mask=keep if where == "model" else True):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, SIGMA).mask(keep), obs=x)

    def guide(x):
        with pyro.plate("data", len(x)):
            q = dist.Normal(loc, math.sqrt(s2))
            pyro.sample("z", q.mask(keep) if where == "guide" else q)

    rd = rate_distortion(model, guide, data, num_samples=400)
    rate, distortion = exact_rate_distortion(data[keep], m[keep], s2)
    assert rd.num_datapoints == int(keep.sum())
    if where == "model":
        assert rd.rate == pytest.approx(rate, abs=1e-12)  # analytic KL over the kept points
    else:  # no KL is registered between a masked Normal and a Normal: Monte Carlo, 5 standard errors
        assert rd.kl_method == {"z": "monte carlo"}
        assert rd.rate == pytest.approx(rate, abs=5 * rd.rate_stderr)
    assert rd.distortion == pytest.approx(distortion, abs=5 * rd.distortion_stderr)


@pytest.mark.parametrize("beta", [-1, -0.5, float("nan"), float("inf"), "1"])
def test_bad_beta_is_refused(data, beta):
    m, s2 = optimal_encoder(1.0, data)
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0, got beta="):
        rate_distortion(vae_model, normal_guide(m, s2), data, beta=beta)


@pytest.mark.parametrize("prior", ["normal", "lognormal"])
def test_autonormal_rate_per_site_is_the_site_kl(prior):
    # AutoNormal's guide for a site is u ~ Normal(m, s) at "<site>_unconstrained" and a Delta at the
    # site (z = u, or z = exp(u) for the LogNormal prior): its pushforward is Normal(m, s) or
    # LogNormal(m, s), so the KL from Normal(0, 1) / LogNormal(0, 1) is KL(Normal(m, s) || Normal(0, 1))
    # in closed form. The rate of that site alone must be it, with no "_unconstrained" entry left.
    from pyro.infer.autoguide import AutoNormal

    x = torch.tensor([0.5, -1.0, 2.0, 0.3])
    fn = dist.Normal(0.0, 1.0) if prior == "normal" else dist.LogNormal(0.0, 1.0)

    def model(x):
        s = pyro.sample("s", fn)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(s, 1.0), obs=x)

    pyro.clear_param_store()
    guide = AutoNormal(model)
    guide(x)
    m, scale = 0.7, 0.4
    with torch.no_grad():
        guide.locs.s.fill_(m)
        guide.scales.s_unconstrained.fill_(
            float(torch.distributions.transform_to(guide.scale_constraint).inv(torch.tensor(scale)))
        )
    assert abs(float(guide.scales.s.detach()) - scale) < 1e-12
    result = rate_distortion(model, guide, x, num_samples=4000)
    exact = float(torch.distributions.kl_divergence(dist.Normal(m, scale), dist.Normal(0.0, 1.0))) / x.shape[0]
    assert set(result.rate_per_site) == {"s"}
    assert result.kl_method == {"s": "monte carlo"}
    assert 0 < result.rate_stderr < 0.05
    assert abs(result.rate_per_site["s"] - exact) < 5 * result.rate_stderr
    assert abs(result.rate - exact) < 5 * result.rate_stderr


def test_autodiagonalnormal_rate_per_site_is_each_site_kl():
    # AutoDiagonalNormal draws one latent u ~ Normal(loc, scale) (N entries for z, then N for w) and
    # Deltas z = u[:N], w = exp(u[N:]): per datapoint the pushforwards are Normal(m, s) and
    # LogNormal(m, s), so each site's rate per datapoint is the mean over n of
    # KL(Normal(m_n, s_n) || Normal(0, 1)) in closed form, with no "_AutoDiagonalNormal_latent" entry.
    from pyro.infer.autoguide import AutoDiagonalNormal

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            w = pyro.sample("w", dist.LogNormal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, w), obs=x)

    x = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.1])
    n = x.shape[0]
    locs = {"z": torch.linspace(-1.0, 1.5, n), "w": torch.linspace(0.5, -0.8, n)}
    scales = {"z": torch.linspace(0.3, 0.9, n), "w": torch.linspace(1.4, 0.4, n)}
    pyro.clear_param_store()
    guide = AutoDiagonalNormal(model)
    guide(x)
    assert list(guide._unconstrained_shapes) == ["z", "w"]
    scale = torch.cat([scales["z"], scales["w"]])
    with torch.no_grad():
        guide.loc.copy_(torch.cat([locs["z"], locs["w"]]))
        guide.scale_unconstrained.copy_(torch.distributions.transform_to(guide.scale_constraint).inv(scale))
    assert torch.allclose(guide.scale, scale)
    result = rate_distortion(model, guide, x, num_samples=4000)
    assert set(result.rate_per_site) == {"z", "w"}
    assert 0 < result.rate_stderr < 0.05
    prior = dist.Normal(0.0, 1.0)
    total = 0.0
    for name in ("z", "w"):
        exact = float(torch.distributions.kl_divergence(dist.Normal(locs[name], scales[name]), prior).mean())
        total += exact
        # z and w are drawn independently, so each site's standard error is below the total's
        assert abs(result.rate_per_site[name] - exact) < 5 * result.rate_stderr, (name, result.rate_per_site, exact)
    assert abs(result.rate - total) < 5 * result.rate_stderr
