# SPDX-License-Identifier: Apache-2.0
"""
aggregate_posterior: ELBO surgery and the β-TCVAE split against a linear-Gaussian encoder
whose aggregate posterior is (to O(1/N)) a known Gaussian, and exact limits.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_elbo_lab
from pyro_elbo_lab.diagnostics import AggregatePosteriorReport, aggregate_posterior
from pyro_elbo_lab.diagnostics.aggregate import ESTIMATORS

# x_n: the N normal quantiles, so that the empirical distribution of x is N(0, 1) to O(1/N)
N = 600
X = dist.Normal(0.0, 1.0).icdf((torch.arange(N, dtype=torch.float64) + 0.5) / N)
A, B, S = 1.0, 0.6, 0.5


def model(x, subsample=None):
    with pyro.plate("data", len(x), subsample=subsample) as idx:
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x[idx])


def linear_guide(x, subsample=None):
    # q(z | x) = N((A x, B x), S² I): both units carry x, so they are correlated under q̄
    with pyro.plate("data", len(x), subsample=subsample) as idx:
        pyro.sample("z", dist.Normal(torch.stack([A * x[idx], B * x[idx]], -1), S).to_event(1))


def collapsed_guide(x, subsample=None):
    with pyro.plate("data", len(x), subsample=subsample) as idx:
        pyro.sample("z", dist.Normal(torch.zeros(len(idx), 2), 1.0).to_event(1))


def linear_gaussian_closed_form() -> tuple:
    """``(I, TC, [KL(q̄_u ‖ N(0, 1))], average KL)`` of the linear-Gaussian encoder, nats."""
    cov = torch.tensor([[A * A + S * S, A * B], [A * B, B * B + S * S]])
    mi = 0.5 * math.log(float(torch.det(cov)) / S**4)
    tc = 0.5 * math.log(float(cov[0, 0] * cov[1, 1] / torch.det(cov)))
    dw = [0.5 * (v - 1 - math.log(v)) for v in cov.diagonal().tolist()]
    kl = 0.5 * (2 * S * S + (A * A + B * B) * float((X**2).mean()) - 2 - 2 * math.log(S * S))
    return mi, tc, dw, kl


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_linear_gaussian_encoder_matches_closed_form(estimator):
    # q̄(z) → N(0, Σ), Σ = [[A²+S², AB], [AB, B²+S²]]; the Gaussian channel gives
    # I = ½ log(det Σ / S⁴), TC = ½ log(Σ₁₁ Σ₂₂ / det Σ), KL(q̄_u ‖ N(0,1)) = ½(Σ_uu - 1 - log Σ_uu)
    mi, tc, dw, kl = linear_gaussian_closed_form()
    # without subsampling "stratified" is "full"; "mws" divides q̄ by N·M = N² instead of N, so its
    # log q̄ is log N lower: I and TC (joint minus D = 2 marginals) gain log N, each KL(q̄_u ‖ p_u) loses it
    shift = math.log(N) if estimator == "mws" else 0.0

    report = aggregate_posterior(model, linear_guide, X, estimator=estimator, num_samples=12)
    assert report.kl_analytic == pytest.approx(kl, abs=1e-10)  # analytic mean KL
    # Monte Carlo over S·N = 7200 draws plus the O(1/N) mixture-vs-Gaussian error, measured over
    # 30 seeds at N = 600, S = 12: sd 0.010 (kl), 0.008 (I), 0.006 (TC), 0.0012 and 0.0024 (the
    # dimension-wise terms), means within 0.005 of the closed form; allow 0.05 (5 sd or more) and
    # 0.015 (6 sd) for the dimension-wise terms
    assert report.kl == pytest.approx(kl, abs=0.05)
    assert report.mutual_information == pytest.approx(mi + shift, abs=0.05)
    assert report.total_correlation == pytest.approx(tc + shift, abs=0.05)
    assert report.dimensionwise_kl_per_dimension.tolist() == pytest.approx([v - shift for v in dw], abs=0.015)
    assert report.dimensionwise_kl == pytest.approx(sum(dw) - 2 * shift, abs=0.03)
    assert report.num_datapoints == N and report.minibatch_size == N and report.estimator == estimator


def test_collapsed_guide_exact_values():
    # q(z | x_n) = p(z) for every n: q̄ = p, so I = TC = dimension-wise KL = 0 exactly
    for estimator in ("full", "stratified"):
        report = aggregate_posterior(model, collapsed_guide, X[:50], estimator=estimator, num_samples=2)
        for value in (report.kl, report.mutual_information, report.total_correlation, report.dimensionwise_kl):
            assert value == pytest.approx(0.0, abs=1e-12)
    # minibatch weighted sampling (Chen et al. 2018) divides by N·M: with M = N present it
    # reports I = log N and TC = (D - 1) log N here, the bias its docstring states
    report = aggregate_posterior(model, collapsed_guide, X[:50], estimator="mws", num_samples=2)
    assert report.mutual_information == pytest.approx(math.log(50), abs=1e-12)
    assert report.total_correlation == pytest.approx(math.log(50), abs=1e-12)
    assert report.dimensionwise_kl == pytest.approx(-2 * math.log(50), abs=1e-12)


def test_mutual_information_reaches_log_n_for_separated_codes():
    # codes 1e-3 wide and at least 0.05 apart: q̄(z_n) = q(z_n | x_n)/N up to exp(-1e3), I = log N
    x = torch.linspace(-3, 3, 121)

    def guide(x, subsample=None):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.stack([x, -x], -1), 1e-3).to_event(1))

    report = aggregate_posterior(model, guide, x, num_samples=2)
    assert report.mutual_information == pytest.approx(math.log(121), abs=1e-9)
    assert report.mutual_information_bound == pytest.approx(math.log(121), abs=1e-12)


def test_stratified_equals_full_without_subsampling():
    pyro.set_rng_seed(3)
    full = aggregate_posterior(model, linear_guide, X[:80], estimator="full")
    pyro.set_rng_seed(3)
    strat = aggregate_posterior(model, linear_guide, X[:80], estimator="stratified")
    # (1/N) q(z|x_i) + (N-1)/(N(N-1)) Σ_{m≠i} q(z|x_m) = (1/N) Σ_m q(z|x_m)
    assert strat.mutual_information == pytest.approx(full.mutual_information, abs=1e-10)
    assert strat.total_correlation == pytest.approx(full.total_correlation, abs=1e-10)


def test_subsampled_plate_minibatch_estimators():
    idx = torch.arange(0, N, 20)  # M = 30 of N = 600
    for estimator in ("mws", "stratified"):
        report = aggregate_posterior(model, collapsed_guide, X, idx, estimator=estimator)
        assert report.num_datapoints == N and report.minibatch_size == len(idx)
    # collapsed codes: stratified is exact (weights sum to 1); MWS is log(N M) - log M = log N
    strat = aggregate_posterior(model, collapsed_guide, X, idx, estimator="stratified")
    assert strat.mutual_information == pytest.approx(0.0, abs=1e-12)
    assert strat.total_correlation == pytest.approx(0.0, abs=1e-12)
    mws = aggregate_posterior(model, collapsed_guide, X, idx, estimator="mws")
    assert mws.mutual_information == pytest.approx(math.log(N), abs=1e-12)
    # (informative codes under subsampling have no closed form here: the log of the unbiased
    # stratified estimate of q̄ is biased, by +0.18 nats in I for M = 30; not asserted)


def test_non_factorised_guide_gives_surgery_only():
    cov_q = torch.tensor([[0.3, 0.1], [0.1, 0.2]])
    v = torch.tensor([A, B])

    def guide(x, subsample=None):
        with pyro.plate("data", len(x)):
            loc = torch.stack([A * x, B * x], -1)
            pyro.sample("z", dist.MultivariateNormal(loc, cov_q))

    x = X[::3]  # 200 evenly spaced normal quantiles: x ~ N(0, 1) to O(1/N)
    report = aggregate_posterior(model, guide, x, num_samples=16)
    assert report.total_correlation is None and report.dimensionwise_kl is None
    assert report.kl_analytic is None  # MVN guide vs Independent Normal prior: no registered KL
    # Gaussian channel z = v x + ε, ε ~ N(0, Σq): I = ½ log det(Σq + Var(x) v vᵀ) / det Σq.
    # Measured over 30 seeds: sd 0.014, mean within 0.002 of it; allow 0.07 (5 sd)
    mi = 0.5 * math.log(float(torch.det(cov_q + torch.outer(v, v)) / torch.det(cov_q)))
    assert report.mutual_information == pytest.approx(mi, abs=0.07)


def test_report_api():
    report = aggregate_posterior(model, linear_guide, X[:50])
    assert pyro_elbo_lab.aggregate_posterior is aggregate_posterior
    assert pyro_elbo_lab.AggregatePosteriorReport is AggregatePosteriorReport
    d = report.as_dict()
    assert {"kl", "mutual_information", "marginal_kl", "total_correlation", "dimensionwise_kl", "kl_analytic"} <= set(d)
    assert "dimensionwise_kl/z[0]" in d and report.dimensions == ("z[0]", "z[1]")
    assert "log N" in str(report)


def test_errors():
    with pytest.raises(ValueError, match="estimator must be one of"):
        aggregate_posterior(model, linear_guide, X[:10], estimator="exact")
    with pytest.raises(ValueError, match="needs at least 2 elements of plate 'data' present, found 1"):
        aggregate_posterior(model, linear_guide, X, torch.tensor([3]), estimator="stratified")
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        aggregate_posterior(model, linear_guide, X[:10], num_samples=0)


KEEP = torch.arange(N) % 2 == 0


def masked_model(x):
    with pyro.plate("data", len(x)), poutine.mask(mask=KEEP[: len(x)]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)


def shifted(guide_loc):
    # masked elements are sent 50 prior sds away: counted, they would dominate every term
    def guide(x):
        keep = KEEP[: len(x)]
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(guide_loc(x) + torch.where(keep, 0.0, 50.0)[:, None], 1.0).to_event(1))

    return guide


def test_masked_elements_left_out_of_the_aggregate_posterior_exact():
    # q(z | x_n) = p(z) on the kept elements: q̄ over them is p, so every term is 0 exactly
    guide = shifted(lambda x: torch.zeros(len(x), 2))
    x = X[:50]
    for estimator in ("full", "stratified"):
        report = aggregate_posterior(masked_model, guide, x, estimator=estimator, num_samples=2)
        for value in (report.kl, report.kl_analytic, report.mutual_information, report.total_correlation):
            assert value == pytest.approx(0.0, abs=1e-12)
        assert report.minibatch_size == 25 and report.num_datapoints == 25
    # minibatch weighted sampling divides by N·M with N = M = 25 kept: I = log 25 exactly
    report = aggregate_posterior(masked_model, guide, x, estimator="mws", num_samples=2)
    assert report.mutual_information == pytest.approx(math.log(25), abs=1e-12)


def test_masked_linear_gaussian_encoder_matches_closed_form():
    def loc(x):
        return torch.stack([A * x, B * x], -1)

    def guide(x):
        keep = KEEP[: len(x)]
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc(x) + torch.where(keep, 0.0, 50.0)[:, None], S).to_event(1))

    kept = X[KEEP]  # every other normal quantile: still N(0, 1) to O(1/N)
    cov = torch.tensor([[A * A + S * S, A * B], [A * B, B * B + S * S]])
    mi = 0.5 * math.log(float(torch.det(cov)) / S**4)
    tc = 0.5 * math.log(float(cov[0, 0] * cov[1, 1] / torch.det(cov)))
    kl = 0.5 * (2 * S * S + (A * A + B * B) * float((kept**2).mean()) - 2 - 2 * math.log(S * S))
    report = aggregate_posterior(masked_model, guide, X, num_samples=24)
    assert report.kl_analytic == pytest.approx(kl, abs=1e-10)
    assert report.num_datapoints == N // 2
    # tolerances of the unmasked test (same S·N draws; 0.05 is over 5 sd there)
    assert report.kl == pytest.approx(kl, abs=0.05)
    assert report.mutual_information == pytest.approx(mi, abs=0.05)
    assert report.total_correlation == pytest.approx(tc, abs=0.05)


# -- autoguides: the guide density at a site is the pushforward of the auxiliary Normal -----------


def constrained_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        w = pyro.sample("w", dist.LogNormal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z.sum(-1), w), obs=x)


def autoguide_with(guide_class, model, x, locs, scales):
    """
    An autoguide of ``model`` whose unconstrained Normal has the given per-datapoint ``locs`` and
    ``scales`` (dicts of ``(N, ...)`` tensors, in the order of the model's sites).
    """
    from pyro.infer import autoguide

    pyro.clear_param_store()
    guide = getattr(autoguide, guide_class)(model)
    guide(x)
    to_scale = torch.distributions.transform_to(guide.scale_constraint)
    with torch.no_grad():
        if guide_class == "AutoNormal":
            for name in locs:
                getattr(guide.locs, name).copy_(locs[name])
                getattr(guide.scales, f"{name}_unconstrained").copy_(to_scale.inv(scales[name]))
                assert torch.allclose(getattr(guide.scales, name), scales[name])
        else:  # one latent: each site's (N, ...) unconstrained value, row-major, in model order
            assert list(guide._unconstrained_shapes) == list(locs)
            guide.loc.copy_(torch.cat([v.reshape(-1) for v in locs.values()]))
            scale = torch.cat([v.reshape(-1) for v in scales.values()])
            guide.scale_unconstrained.copy_(to_scale.inv(scale))
            assert torch.allclose(guide.scale, scale)
    return guide


@pytest.mark.parametrize("guide_class", ["AutoNormal", "AutoDiagonalNormal"])
def test_autoguide_equal_to_the_prior_gives_zero_for_every_term(guide_class):
    # u_n ~ Normal(0, 1) for every n: z_n = u_n is Normal(0, 1) and w_n = exp(u_n) is LogNormal(0, 1),
    # the priors, so q(z | x_n) = p(z): q̄ = p and kl = I = TC = dimension-wise KL = 0 exactly.
    # Before the fix the Deltas at z and w were evaluated at the other datapoints' draws (-inf):
    # I = TC = log N and a dimension-wise KL of about -5 for N = 50.
    x = X[:50]
    n = len(x)
    locs = {"z": torch.zeros(n, 2), "w": torch.zeros(n)}
    scales = {"z": torch.ones(n, 2), "w": torch.ones(n)}
    guide = autoguide_with(guide_class, constrained_model, x, locs, scales)
    for estimator in ("full", "stratified"):
        report = aggregate_posterior(constrained_model, guide, x, estimator=estimator, num_samples=4)
        assert report.dimensions == ("z[0]", "z[1]", "w")
        for value in (
            report.kl,
            report.mutual_information,
            report.marginal_kl,
            report.total_correlation,
            report.dimensionwise_kl,
        ):
            assert value == pytest.approx(0.0, abs=1e-9)
        assert report.dimensionwise_kl_per_dimension.tolist() == pytest.approx([0.0] * 3, abs=1e-9)
        assert report.kl_analytic is None  # w: Monte Carlo (no registered KL for the pushforward)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("guide_class", ["AutoNormal", "AutoDiagonalNormal"])
def test_autoguide_linear_gaussian_encoder_matches_closed_form(guide_class, estimator):
    # the linear-Gaussian encoder of test_linear_gaussian_encoder_matches_closed_form held by an
    # autoguide: u_n ~ N((A x_n, B x_n), S² I) and z_n = u_n, so the same closed forms hold, with
    # the same tolerances (the same S·N = 7200 draws); kl_analytic is KL(Normal || Normal) exactly
    mi, tc, dw, kl = linear_gaussian_closed_form()
    shift = math.log(N) if estimator == "mws" else 0.0

    locs = {"z": torch.stack([A * X, B * X], -1)}
    scales = {"z": torch.full((N, 2), S)}
    guide = autoguide_with(guide_class, model, X, locs, scales)
    report = aggregate_posterior(model, guide, X, estimator=estimator, num_samples=12)
    assert report.kl_analytic == pytest.approx(kl, abs=1e-10)
    assert report.kl == pytest.approx(kl, abs=0.05)
    assert report.mutual_information == pytest.approx(mi + shift, abs=0.05)
    assert report.total_correlation == pytest.approx(tc + shift, abs=0.05)
    assert report.dimensionwise_kl_per_dimension.tolist() == pytest.approx([v - shift for v in dw], abs=0.015)
    assert report.dimensionwise_kl == pytest.approx(sum(dw) - 2 * shift, abs=0.03)


def test_joint_autoguide_is_refused():
    from pyro.infer.autoguide import AutoMultivariateNormal

    x = X[:10]
    pyro.clear_param_store()
    guide = AutoMultivariateNormal(model)
    guide(x)
    with pytest.raises(
        ValueError, match="site 'z'.*AutoMultivariateNormal.*_AutoMultivariateNormal_latent.*Normal site"
    ):
        aggregate_posterior(model, guide, x, num_samples=2)
