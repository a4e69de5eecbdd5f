# SPDX-License-Identifier: Apache-2.0
"""
VSBC on a conjugate Normal model where every "fit" is closed form: the exact posterior
(quantiles uniform, so symmetric), an over-dispersed but centred guide (symmetric, not
uniform: VSBC is blind to spread), and guides biased by construction (asymmetric).
"""

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

from pyro_elbo_lab.diagnostics.vsbc import symmetry_test, vsbc

N = 5


def model(n, y=None):
    theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", n):
        pyro.sample("y", dist.Normal(theta, 1.0).to_event(1), obs=y)


def posterior(y):
    precision = 1.0 + y.shape[0]
    return y.sum(0) / precision, torch.full((2,), precision**-0.5)


def make_fit(shift=0.0, scale=1.0, record=None):
    def fit(data):
        m, s = posterior(data["y"])
        loc, sd = m + shift * s, scale * s
        if record is not None:
            record.append((loc, sd))
        return lambda n: {"theta": dist.Normal(loc, sd).sample((n,))}

    return fit


def test_exact_guide_is_symmetric_and_quantiles_match_closed_form():
    fits = []
    report = vsbc(model, make_fit(record=fits), N, data_sites=["y"], num_replications=200, num_draws=4000)
    assert report.names == ["theta[0]", "theta[1]"]
    assert report.quantiles.shape == (200, 2)
    assert not report.asymmetric.any()
    assert "No asymmetry detected" in report.verdict()
    # exact posterior: the quantiles are uniform (checked against the uniform without our test)
    for k in range(2):
        assert stats.kstest(report.quantiles[:, k], "uniform").pvalue > 0.01
    assert len(fits) == 200  # one fit per replication


def test_quantile_values_against_closed_form():
    """p = Phi((theta* - m_q) / s_q) computed without vsbc, from the same simulated data."""
    seen = []

    def fit(data):
        m, s = posterior(data["y"])
        loc, sd = m + 0.3 * s, s
        seen.append((data["y"].clone(), loc, sd))
        return lambda n: {"theta": dist.Normal(loc, sd).sample((n,))}

    pyro.set_rng_seed(3)
    report = vsbc(model, fit, N, data_sites=["y"], num_replications=30, num_draws=20000)
    pyro.set_rng_seed(3)
    prior = pyro.infer.Predictive(model, num_samples=30)(N)
    for m, (y, loc, sd) in enumerate(seen):
        assert torch.equal(y, prior["y"][m].reshape(y.shape))
        exact = stats.norm.cdf(((prior["theta"][m].reshape(-1) - loc) / sd).numpy())
        np.testing.assert_allclose(report.quantiles[m], exact, atol=0.015)


def test_overdispersed_centred_guide_is_symmetric():
    report = vsbc(model, make_fit(scale=1.5), N, data_sites=["y"], num_replications=200, num_draws=2000)
    assert not report.asymmetric.any()
    # not uniform: quantiles concentrate near 1/2 (the guide is too wide)
    assert stats.kstest(report.quantiles[:, 0], "uniform").pvalue < 0.01


@pytest.mark.parametrize("shift, side", [(0.7, "above"), (-0.7, "below")], ids=["too-high", "too-low"])
def test_biased_guide_is_detected(shift, side):
    report = vsbc(model, make_fit(shift=shift), N, data_sites=["y"], num_replications=200, num_draws=2000)
    assert report.asymmetric.all()
    assert np.all(report.p_value < 1e-3)
    # a guide shifted up puts theta* low in q: mean quantile = E[Phi(Z - shift)] = Phi(-shift / sqrt(2))
    expected = stats.norm.cdf(-shift / np.sqrt(2))
    np.testing.assert_allclose(report.mean_quantile, expected, atol=0.05)
    assert f"sit {side} the true value" in report.verdict()


def test_bad_arguments():
    with pytest.raises(ValueError, match="data site 'z'"):
        vsbc(model, make_fit(), N, data_sites=["z"], num_replications=10)
    with pytest.raises(ValueError, match="num_replications"):
        vsbc(model, make_fit(), N, data_sites=["y"], num_replications=2)
    with pytest.raises(ValueError, match="shape"):
        vsbc(model, lambda d: lambda n: {"theta": torch.zeros(n, 3)}, N, data_sites=["y"], num_replications=10)
    with pytest.raises(ValueError, match="model_kwargs"):
        vsbc(model, make_fit(), N, model_kwargs=(1,), data_sites=["y"], num_replications=10)


def test_symmetry_statistic_is_scipy_ks_distance():
    rng = np.random.default_rng(0)
    q = np.concatenate([rng.uniform(size=(150, 2)), rng.beta(2, 5, size=(150, 1))], 1)
    q[:5, 0] = [0.0, 1.0, 0.5, 0.25, 0.75]  # ties between p and 1 - p
    stat, _ = symmetry_test(q, num_resamples=99, seed=0)
    expected = [stats.ks_2samp(q[:, k], 1 - q[:, k]).statistic for k in range(3)]
    np.testing.assert_allclose(stat, expected, atol=1e-12)


def test_symmetry_p_value_is_calibrated():
    """Under symmetry the test rejects at about its level."""
    rng = np.random.default_rng(1)
    q = rng.uniform(size=(50, 300))  # 300 symmetric columns of 50 replications
    _, p = symmetry_test(q, num_resamples=199, seed=2)
    # a randomisation test rejects at most at its level (less with a discrete statistic);
    # binomial sd over 300 columns: 0.013 at 0.05, 0.023 at 0.2
    assert (p < 0.05).mean() <= 0.05 + 0.03
    assert 0.2 - 0.07 <= (p < 0.2).mean() <= 0.2 + 0.05
    # and it has power against an asymmetric distribution
    _, p_skew = symmetry_test(rng.beta(2, 3, size=(100, 100)), num_resamples=199, seed=3)
    assert (p_skew < 0.05).mean() > 0.8
