# SPDX-License-Identifier: Apache-2.0
"""
The examples double as tests: each script's ``main`` is run in quick mode and the facts it
demonstrates are asserted against closed forms computed here or in the script with
numpy/torch linear algebra (never with pyro-elbo-lab itself).
"""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"

pytest.importorskip("sklearn", reason="the examples need scikit-learn (the 'examples' extra)")


def load_example(name: str):
    """Import ``examples/<name>.py`` as a module."""
    module_name = f"_elbo_lab_example_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def within_se(estimate: float, exact: float, se: float, k: float = 5.0) -> bool:
    """|estimate - exact| <= k standard errors (k = 5: a false alarm every ~1.7 million runs)."""
    return abs(estimate - exact) <= k * se


# ----------------------------------------------------------------------------------------
# bayesian_regression.py
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regression():
    br = load_example("bayesian_regression")
    return br, br.main(quick=True, verbose=False)


def test_regression_log_evidence_by_bayes_rule(regression):
    # Independent check of the closed-form evidence: log p(y) = log p(y|w) + log p(w) - log p(w|y)
    # at any w (here the posterior mean), with torch distributions.
    br, result = regression
    X, y, _ = br.load_data()
    post = result["exact"]
    w = torch.as_tensor(post.mean)
    log_lik = dist.Normal(X @ w, br.NOISE_SCALE).log_prob(y).sum()
    log_prior = dist.Normal(0.0, br.PRIOR_SCALE).log_prob(w).sum()
    log_post = dist.MultivariateNormal(w, precision_matrix=torch.as_tensor(post.precision)).log_prob(w)
    assert (log_lik + log_prior - log_post).item() == pytest.approx(post.log_evidence, abs=1e-8)


@pytest.mark.parametrize("guide", ["mean_field", "full_rank"])
def test_regression_identity_at_fitted_guides(regression, guide):
    # log p(y) = ELBO(q) + KL(q || p(w|y)) for the fitted Gaussian q: three closed forms, 1e-6 nats
    # (float64 round-off on numbers of size ~500 is ~1e-12).
    br, result = regression
    exact = result["guides"][guide]["exact"]
    assert exact["elbo"] + exact["kl_posterior"] == pytest.approx(result["exact"].log_evidence, abs=1e-6)
    assert exact["kl_posterior"] > 0


@pytest.mark.parametrize("guide", ["mean_field", "full_rank"])
def test_regression_decompose_matches_closed_form(regression, guide):
    # pyro-elbo-lab's Monte Carlo ELBO and reconstruction agree with the closed form to 5 se.
    br, result = regression
    r = result["guides"][guide]
    est = r["estimate"]
    assert within_se(est.elbo, r["exact"]["elbo"], est.stderr["elbo"])
    assert within_se(est.reconstruction, r["exact"]["reconstruction"], est.stderr["reconstruction"])
    if guide == "mean_field":
        # BetaMeanFieldELBO's KL is analytic: exact up to round-off
        assert est.kl == pytest.approx(r["exact"]["kl_prior"], abs=1e-8)


@pytest.mark.parametrize("guide", ["mean_field", "full_rank"])
def test_regression_importance_sampled_evidence(regression, guide):
    # The IS estimate of log p(y) is a stochastic lower bound (Burda et al. 2016) that is at
    # least the ELBO: exact ELBO - 5 se <= estimate <= exact log p(y) + 5 se.
    br, result = regression
    ev = result["guides"][guide]["evidence"]
    exact = result["guides"][guide]["exact"]
    assert exact["elbo"] - 5 * ev.log_evidence_stderr <= ev.log_evidence
    assert ev.log_evidence <= result["exact"].log_evidence + 5 * ev.log_evidence_stderr


def gaussian_pareto_k(precision_p: np.ndarray, cov_q: np.ndarray) -> float:
    """
    The true Pareto shape k of the importance weights p/q for Gaussians q and p, in closed
    form. With x = m_q + cov_q^(1/2) u, u ~ N(0, I), log w = u^T (I - A) u / 2 + (linear in
    u) with A = cov_q^(1/2) precision_p cov_q^(1/2); along an eigenvector of A with eigenvalue
    a < 1, P(w > t) ~ t^(-1/(1-a)), a tail index 1/(1-a): k = 1 - a, the largest over the
    directions (the means move only the linear term).
    """
    a = np.linalg.eigvals(precision_p @ cov_q).real
    return float(max(0.0, 1.0 - a.min()))


def test_regression_importance_sampling_verdicts(regression):
    # The mean-field guide's variances are 1 / Lambda_ii, below the posterior's marginal
    # variances along the correlated serum features: the true k of its weights, in closed form,
    # is ~0.99 (measured), far above 0.7, so PSIS must call it "bad" (k̂ measured 0.85-1.03 over
    # seeds 0-2). The full-rank guide after 500 quick steps has a true k of 0.68-0.78 (seeds
    # 0-2), astride the 0.7 threshold, so its verdict is not asserted.
    br, result = regression
    post = result["exact"]
    mf = result["guides"]["mean_field"]
    assert gaussian_pareto_k(post.precision, mf["cov"]) > 0.9
    assert mf["evidence"].verdict == "IS unreliable"  # was "bad" (issue 12: words about IS only)
    assert mf["evidence"].pareto_k > 0.7


def test_regression_gaps(regression):
    br, result = regression
    best = result["mean_field_gap"]
    mf_gap = result["guides"]["mean_field"]["exact"]["kl_posterior"]
    fr_gap = result["guides"]["full_rank"]["exact"]["kl_posterior"]
    # no mean-field q beats the mean-field optimum; 500 quick SVI steps get within 0.5 nats of it
    # (measured: ~0.2 nats; the remaining slack is optimisation noise of 4-particle gradients)
    assert best - 1e-9 <= mf_gap < best + 0.5
    # the full-rank family contains the posterior: it ends well below the best mean-field gap
    assert fr_gap < 0.6 * best


def test_regression_report_words_follow_the_numbers(regression):
    # the closing sentence is computed from the fits: the quick run's full-rank gap is below the
    # best mean-field gap (asserted in test_regression_gaps), a made-up unconverged fit is not
    br, result = regression
    post, mf_gap = result["exact"], result["mean_field_gap"]
    post_sd = np.sqrt(np.diag(np.linalg.inv(post.precision)))
    mf_var = 1.0 / np.diag(post.precision)
    mf, fr = result["guides"]["mean_field"], result["guides"]["full_rank"]
    assert "The full-rank guide gets below any mean-field guide" in br.closing_words(
        post, post_sd, mf_var, mf_gap, mf, fr
    )
    stuck = dict(fr, exact=dict(fr["exact"], kl_posterior=mf_gap + 10.0))
    text = br.closing_words(post, post_sd, mf_var, mf_gap, mf, stuck)
    assert "not yet below the best mean-field gap" in text and "gets below" not in text


def test_regression_identity_for_random_gaussian_q(regression):
    # "for any Gaussian q": a random full-rank q, set by hand; decompose() against the closed form
    br, _ = regression
    X, y, _ = br.load_data()
    D = X.shape[1]
    g = torch.Generator().manual_seed(1)
    loc = 0.1 * torch.randn(D, generator=g)
    tril = torch.tril(0.02 * torch.randn(D, D, generator=g), -1) + torch.diag(0.01 + 0.05 * torch.rand(D, generator=g))
    store = pyro.get_param_store()
    store.clear()
    store["fr_loc"] = loc.clone()
    store["fr_scale_tril"] = tril.clone()
    exact = br.exact_elbo(X, y, loc.numpy(), (tril @ tril.T).numpy(), br.exact_posterior(X, y))
    assert exact["elbo"] + exact["kl_posterior"] == pytest.approx(exact["log_evidence"], abs=1e-6)
    est = br.BetaELBO(num_particles=4096, vectorize_particles=True, max_plate_nesting=1).decompose(
        br.model, br.full_rank_guide, X, y
    )
    assert within_se(est.elbo, exact["elbo"], est.stderr["elbo"])
    assert within_se(est.kl, exact["kl_prior"], est.stderr["kl"])


# ----------------------------------------------------------------------------------------
# em_gaussian_mixture.py
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def em():
    module = load_example("em_gaussian_mixture")
    return module, module.main(quick=True, verbose=False)


def test_em_log_likelihood_never_decreases(em):
    _, result = em
    ll = result["history"]["log p(x)"].to_numpy()
    # EM's monotonicity, up to float64 round-off on numbers of size ~300
    assert np.all(np.diff(ll) >= -1e-9)
    assert ll[-1] > ll[0] + 100  # it really climbs: measured -289.7 -> -134.2


def test_em_e_step_closes_the_gap(em):
    module, result = em
    h = result["history"]
    # exact enumeration: ELBO(q = posterior) == log p(x)
    np.testing.assert_allclose(h["ELBO after E"], h["log p(x)"], atol=1e-8)
    # pyro-elbo-lab's Monte Carlo ELBO: log p(x,z) - log q(z) = log p(x) for every sampled z, so
    # the estimate has zero variance and is exact up to round-off
    np.testing.assert_allclose(h["ELBO (MC estimate)"], h["log p(x)"], atol=1e-6)
    assert (h["± se"] < 1e-6).all()


def test_em_m_step_raises_the_elbo(em):
    _, result = em
    h = result["history"]
    assert np.all(h["E log p(x,z) after M"] >= h["E log p(x,z) after E"] - 1e-9)
    assert np.all(h["ELBO after M"] >= h["ELBO after E"] - 1e-9)
    assert np.all(h["gap after M"] >= -1e-9)


def test_em_report_words_follow_the_numbers(em):
    # the sentences about monotonicity are computed from the history, not canned: the real
    # run reads "never negative"; a history with a drop (made up here) is reported as one
    module, result = em
    h = result["history"]
    assert "never negative" in module.monotonicity(h["log p(x)"])
    assert "each M-step raised the ELBO" in module.steps_summary(h)
    made_up = pd.Series([-300.0, -250.0, -260.0, -240.0])
    text = module.monotonicity(made_up)
    assert "never negative" not in text
    assert "DECREASED at 1 of 3 iterations (largest drop 10 nats)" in text
    broken = h.copy()
    broken.loc[1, "ELBO after M"] = broken.loc[1, "ELBO after E"] - 2.0
    assert "an M-step LOWERED the ELBO (by 2 nats)" in module.steps_summary(broken)


def test_em_exact_terms_against_the_definitions(em):
    # the terms by enumeration against their definitions written out in numpy with 0 log 0 = 0,
    # for responsibilities with exact zeros (a hard assignment); float64 round-off on ~100s
    module, _ = em
    x, _ = module.load_data()
    params = module.initial_params(x, 0)
    resp = torch.nn.functional.one_hot(torch.arange(x.shape[0]) % module.K, module.K).to(x.dtype)
    resp[0] = torch.tensor([0.2, 0.3, 0.5])
    terms = module.exact_terms(x, params, resp)
    r, w = resp.numpy(), params.weights.numpy()
    r_log_r = np.where(r > 0, r * np.log(np.where(r > 0, r, 1.0)), 0.0)
    assert terms["entropy"] == pytest.approx(-r_log_r.sum(), abs=1e-10)
    assert terms["kl"] == pytest.approx((r_log_r - r * np.log(w)).sum(), abs=1e-10)


def test_em_mc_terms_match_enumeration(em):
    # the per-term Monte Carlo estimates (which, unlike the ELBO, do vary with z) agree with the
    # exact enumeration to 5 standard errors
    module, result = em
    x, _ = module.load_data()
    params = module.initial_params(x, 0)
    resp = module.e_step(x, params)
    exact = module.exact_terms(x, params, resp)
    est = result["decompositions"][0]
    for term in ("reconstruction", "kl", "entropy", "expected_log_joint"):
        assert within_se(getattr(est, term), exact[term], est.stderr[term]), term


def test_em_log_likelihood_independent():
    # the example's log-likelihood against the Gaussian density written out in numpy
    module = load_example("em_gaussian_mixture")
    x, _ = module.load_data()
    params = module.initial_params(x, 3)
    X = x.numpy()
    density = np.zeros(X.shape[0])
    for k in range(module.K):
        L = params.scale_trils[k].numpy()
        cov = L @ L.T
        diff = X - params.locs[k].numpy()
        quad = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(cov), diff)
        density += params.weights[k].item() * np.exp(-0.5 * quad) / (2 * np.pi * np.sqrt(np.linalg.det(cov)))
    assert module.log_likelihood(x, params) == pytest.approx(np.log(density).sum(), abs=1e-8)


# ----------------------------------------------------------------------------------------
# cavi_mean_field.py
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cavi():
    module = load_example("cavi_mean_field")
    return module, module.main(quick=True, verbose=False)


def test_cavi_exact_evidence_by_bayes_rule(cavi):
    # log p(x) = log p(x | mu, tau) + log p(mu, tau) - log p(mu, tau | x) at a point, with the
    # Normal-Gamma posterior written out with torch distributions
    module, result = cavi
    x = module.load_data()
    N, xbar = x.shape[0], x.mean()
    lam_n = module.LAMBDA0 + N
    mu_n = (module.LAMBDA0 * module.MU0 + N * xbar) / lam_n
    a_n = module.A0 + N / 2
    b_n = module.B0 + 0.5 * ((x - xbar) ** 2).sum() + module.LAMBDA0 * N * (xbar - module.MU0) ** 2 / (2 * lam_n)
    mu, tau = torch.tensor(5.1), torch.tensor(7.0)
    log_joint = (
        dist.Normal(mu, tau.rsqrt()).log_prob(x).sum()
        + dist.Gamma(module.A0, module.B0).log_prob(tau)
        + dist.Normal(module.MU0, (module.LAMBDA0 * tau).rsqrt()).log_prob(mu)
    )
    log_post = dist.Gamma(a_n, b_n).log_prob(tau) + dist.Normal(mu_n, (lam_n * tau).rsqrt()).log_prob(mu)
    assert (log_joint - log_post).item() == pytest.approx(result["log_evidence"], abs=1e-9)


def test_cavi_fixed_point_matches_closed_form(cavi):
    module, result = cavi
    x = module.load_data()
    q = result["cavi_q"]
    N = x.shape[0]
    # the stationary equations: mu_N, a_N in closed form; lambda_N and b_N consistent with each other
    assert q["mu_loc"] == pytest.approx(
        (module.LAMBDA0 * module.MU0 + x.sum().item()) / (module.LAMBDA0 + N), abs=1e-12
    )
    lam = q["mu_scale"] ** -2
    assert lam == pytest.approx((module.LAMBDA0 + N) * q["tau_concentration"] / q["tau_rate"], rel=1e-9)
    e_sq = (
        ((x - q["mu_loc"]) ** 2).sum().item() + N / lam + module.LAMBDA0 * ((q["mu_loc"] - module.MU0) ** 2 + 1 / lam)
    )
    assert q["tau_rate"] == pytest.approx(module.B0 + 0.5 * e_sq, rel=1e-9)
    # coordinate ascent never lowers the ELBO
    assert np.all(np.diff(result["cavi_trace"]) >= -1e-12)


def test_cavi_fixed_point_is_a_maximum_of_the_elbo(cavi):
    # each CAVI update is the exact optimum of its factor, and the optimum lies in the
    # Normal x Gamma family, so the fixed point maximises the closed-form ELBO over all four
    # parameters: moving any of them by 0.1% lowers it. The second-order drop is >= ~1e-7 nats
    # for these curvatures; float64 round-off of the ELBO (~60 nats) is ~1e-13.
    module, result = cavi
    x = module.load_data()
    q = result["cavi_q"]
    best = module.mean_field_elbo(x, q)
    for name in q:
        for sign in (-1, 1):
            moved = dict(q, **{name: q[name] * (1 + sign * 1e-3)})
            assert module.mean_field_elbo(x, moved) < best - 1e-10, (name, sign)


def test_cavi_needs_a_sweep(cavi):
    # num_iterations=0 used to return the initial q and an empty trace (main then failed on trace[-1])
    module, _ = cavi
    with pytest.raises(ValueError, match="num_iterations must be >= 1.*got 0"):
        module.cavi(module.load_data(), num_iterations=0)


def test_cavi_report_words_follow_the_numbers(cavi):
    # the sentence about the sweeps is computed from the trace, not canned
    module, result = cavi
    assert result["cavi_converged"]
    assert "no sweep lowered the ELBO" in module.sweep_summary(result["cavi_trace"], True)
    text = module.sweep_summary([-40.0, -39.0, -39.5, -39.4], False)
    assert text.startswith("NOT converged after 4 sweeps")
    assert "1 of 3 sweeps LOWERED the ELBO (largest drop 0.5 nats)" in text
    # stopping at the iteration limit is not convergence
    _, trace, converged = module.cavi(module.load_data(), num_iterations=2)
    assert len(trace) == 2 and not converged


def test_cavi_below_exact_evidence(cavi):
    _, result = cavi
    gap = result["log_evidence"] - result["cavi_elbo"]
    # mean-field cannot represent the mu-tau coupling: a strictly positive gap (measured 0.0092 nats)
    assert 1e-3 < gap < 0.1
    assert result["svi_elbo"] <= result["log_evidence"]


def test_cavi_and_svi_reach_the_same_optimum(cavi):
    _, result = cavi
    # CAVI is the mean-field optimum; SVI's (closed-form) ELBO gets within 0.02 nats of it in
    # 1000 quick steps (measured: 0.0014); the ELBO is flat in tau's concentration, so the
    # parameters themselves are compared more loosely
    assert result["cavi_elbo"] - 0.02 < result["svi_elbo"] <= result["cavi_elbo"] + 1e-9
    assert result["svi_q"]["mu_loc"] == pytest.approx(result["cavi_q"]["mu_loc"], abs=0.01)
    assert result["svi_q"]["mu_scale"] == pytest.approx(result["cavi_q"]["mu_scale"], rel=0.05)
    mean_tau = lambda q: q["tau_concentration"] / q["tau_rate"]  # noqa: E731
    assert mean_tau(result["svi_q"]) == pytest.approx(mean_tau(result["cavi_q"]), rel=0.05)


def test_cavi_decompose_matches_closed_form(cavi):
    _, result = cavi
    est = result["estimate"]
    assert within_se(est.elbo, result["cavi_elbo"], est.stderr["elbo"])


# ----------------------------------------------------------------------------------------
# eight_schools.py
# ----------------------------------------------------------------------------------------


def test_eight_schools_exact_evidence_by_adaptive_quadrature():
    # An independent route to log p(y): scipy's adaptive quadrature over tau in (0, inf) of
    # HalfCauchy(tau; 5) * N(y | 0, diag(sigma^2 + tau^2) + 25 11^T), with the dense 8x8
    # covariance (the demo uses Gauss-Legendre in u = atan(tau / 5) and the determinant
    # lemma). Agreement to 1e-7 nats.
    integrate = pytest.importorskip("scipy.integrate")
    from pyro_elbo_lab.demos.eight_schools import EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y, exact_reference

    y, sigma = np.array(EIGHT_SCHOOLS_Y), np.array(EIGHT_SCHOOLS_SIGMA)
    # scale the integrand by exp(31) so that quad works with O(1) numbers
    shift = 31.0

    def integrand(tau, power=0):
        cov = np.diag(sigma**2 + tau**2) + 25.0 * np.ones((8, 8))
        prior = 2.0 / (np.pi * 5.0 * (1.0 + (tau / 5.0) ** 2))
        _, logdet = np.linalg.slogdet(cov)
        log_lik = -0.5 * (8 * np.log(2 * np.pi) + logdet + y @ np.linalg.solve(cov, y))
        return tau**power * prior * np.exp(log_lik + shift)

    value, _ = integrate.quad(integrand, 0, np.inf, epsabs=1e-13, epsrel=1e-11, limit=200)
    ref = exact_reference()
    assert math.log(value) - shift == pytest.approx(ref.log_evidence, abs=1e-7)
    tau_mean = integrate.quad(lambda t: integrand(t, 1), 0, np.inf, epsabs=1e-13, epsrel=1e-11, limit=200)[0] / value
    assert tau_mean == pytest.approx(ref.tau_mean, rel=1e-6)


@pytest.fixture(scope="module")
def eight_schools():
    # a smoke run: 300 steps, below the convergence rule's 1000-step window
    module = load_example("eight_schools")
    return module, module.main(quick=True, steps=300, verbose=False)


@pytest.fixture(scope="module")
def eight_schools_converged():
    # the full run: each fit until the convergence rule stops it (measured: steps 4750, 5250, 2500, 2500;
    # about 2 minutes of CPU)
    module = load_example("eight_schools")
    return module.main(verbose=False)


def test_eight_schools_nuts_reference_agrees_with_exact(eight_schools):
    # ArviZ's NUTS draws (2000, ESS of mu ~ 1000) against quadrature: within 0.3 for mu and tau
    # (about 3 Monte Carlo standard errors, sd ~3.3 / sqrt(1000) ~ 0.1)
    _, result = eight_schools
    assert result["nuts"].loc["mu", "mean"] == pytest.approx(result["exact"].mu_mean, abs=0.3)
    assert result["nuts"].loc["tau", "mean"] == pytest.approx(result["exact"].tau_mean, abs=0.3)


def test_eight_schools_bounds(eight_schools):
    # every guide, fitted or not: ELBO <= log p(y) and the importance-sampled estimate <= log p(y) in
    # expectation (both up to 5 standard errors of their Monte Carlo estimates)
    _, result = eight_schools
    exact = result["exact"].log_evidence
    for name, f in result["fits"].items():
        assert f["terms"].elbo <= exact + 5 * f["terms"].stderr["elbo"], name
        assert f["evidence"].log_evidence <= exact + 5 * f["evidence"].log_evidence_stderr, name


def test_eight_schools_smoke_run_is_not_converged_and_draws_no_conclusion(eight_schools):
    # 300 steps cannot fill the rule's 1000-step window, so no fit can have converged
    _, result = eight_schools
    for name, f in result["fits"].items():
        assert not f["converged"] and f["status"] == "not converged (cap of 300 steps)", name
        assert f["conclusion"] == "", name
        assert result["table"].loc[name, "fit"] == "not converged (cap of 300 steps)"


def test_eight_schools_where_vi_is_trustworthy(eight_schools_converged):
    result = eight_schools_converged
    exact = result["exact"].log_evidence
    fits = result["fits"]
    # conclusions are drawn from converged fits only
    assert all(f["converged"] for f in fits.values()), {n: f["status"] for n, f in fits.items()}
    gap = {name: exact - f["terms"].elbo for name, f in fits.items()}
    # the non-centred full-rank guide nearly closes the gap (measured 0.27 nats) and its evidence
    # estimate is usable; the centred mean-field guide cannot follow the funnel (measured gap 1.98 nats
    # at convergence, k̂ 0.99; the 5.1 nats once measured here came from an unconverged 300-step fit)
    assert gap["non-centred, full-rank"] < 1.0
    assert gap["centred, mean-field"] > 1.5
    assert fits["centred, mean-field"]["evidence"].pareto_k > 0.7
    assert fits["centred, mean-field"]["evidence"].verdict == "IS unreliable"  # was "bad"
    assert "importance sampling is unreliable" in fits["centred, mean-field"]["conclusion"]
    # measured k̂ = 0.54: the guide covers the posterior, so the estimate must be close
    nc = fits["non-centred, full-rank"]["evidence"]
    assert nc.verdict in ("IS reliable", "IS usable"), nc.pareto_k  # were "good", "ok"
    # 6 rather than 5 standard errors: for 0.5 < k̂ <= 0.7 the raw weights have no finite
    # variance (a Pareto tail has moments of order < 1/k only), so the se is itself a rough
    # estimate, and the log of a mean is biased low by ~se^2 / 2 (Vehtari et al. 2024);
    # measured deviation 2.3 se
    assert within_se(nc.log_evidence, exact, nc.log_evidence_stderr, k=6.0)


def test_eight_schools_demo_argument_errors():
    from pyro_elbo_lab.demos.eight_schools import exact_reference, fit

    with pytest.raises(ValueError, match="model_name must be one of 'centred', 'non-centred', got 'centered'"):
        fit("centered", "mean-field", 10)
    with pytest.raises(ValueError, match="guide_name must be one of 'mean-field', 'full-rank', got 'diagonal'"):
        fit("centred", "diagonal", 10)
    with pytest.raises(ValueError, match="num_nodes must be a positive integer.*got 0"):
        exact_reference(0)


# ----------------------------------------------------------------------------------------
# beta_vae_digits.py
# ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vae_study():
    module = load_example("beta_vae_digits")
    return module, module.main(quick=True, steps=30, num_samples=16, verbose=False)


def test_vae_study_reports_every_weighting(vae_study):
    _, result = vae_study
    table = result["table"]
    assert list(table.index) == [c.label for c in result["configs"]]
    assert table["final β"].tolist() == pytest.approx([1.0, 1.0, 1.0, 4.0])
    for name, ev in result["evaluations"].items():
        # the rate (rate_distortion) and the KL per dimension (posterior_collapse) are both analytic
        # Gaussian KLs of an encoder that depends on x only: no Monte Carlo error, same number
        assert ev["kl"] == pytest.approx(float(ev["kl_per_dimension"].sum()), rel=1e-8), name
        assert 0 <= ev["active_units"] <= 16  # latent dimension 16


def elbo_by_hand(vae, x: torch.Tensor, num_draws: int = 64, seed: int = 1):
    """
    With plain torch, independent of pyro-elbo-lab: the Binomial(16) log-likelihood of each
    image under ``num_draws`` draws of z from the encoder, shape ``(S, N)``, and the analytic
    KL(q(z|x) || N(0, I)) per image, shape ``(N,)``.
    """
    with torch.no_grad():
        loc, scale = vae.encode(x)
        kl = torch.distributions.kl_divergence(
            torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0)
        )
        g = torch.Generator().manual_seed(seed)
        z = loc + scale * torch.randn((num_draws,) + tuple(loc.shape), generator=g)
        log_lik = torch.distributions.Binomial(16, logits=vae.decode(z)).log_prob(x).sum(-1)
    return log_lik, kl.sum(-1)


@pytest.fixture(scope="module")
def vae_by_hand(vae_study):
    _, result = vae_study
    return {name: elbo_by_hand(vae, result["x_test"]) for name, vae in result["vaes"].items()}


def test_vae_decomposition_against_torch(vae_study, vae_by_hand):
    # reconstruction, KL and ELBO per held-out image against the same quantities from plain
    # torch: the KL is analytic in both (round-off, rel 1e-8); the reconstruction is a Monte
    # Carlo mean in both, so they must agree within 5 se of the difference of two independent
    # estimates (a false alarm every ~1.7 million runs)
    _, result = vae_study
    for name, ev in result["evaluations"].items():
        log_lik, kl = vae_by_hand[name]
        per_draw = log_lik.mean(-1)  # (S,): reconstruction per image, one draw per image
        recon, se = per_draw.mean().item(), (per_draw.std() / per_draw.shape[0] ** 0.5).item()
        bound = 5 * math.hypot(se, ev["rate_distortion"].distortion_stderr)
        assert ev["kl"] == pytest.approx(kl.mean().item(), rel=1e-8), name
        assert abs(ev["reconstruction"] - recon) <= bound, name
        assert abs(ev["elbo"] - (recon - kl.mean().item())) <= bound, name


def test_vae_iwae_at_least_the_elbo(vae_study, vae_by_hand):
    # the IWAE bound with S samples is at least the ELBO in expectation, per image (Burda et al.
    # 2016). Paired per image: d_n = IWAE_n - ELBO_n (ELBO_n from plain torch, independent
    # draws); the d_n are independent over images, so their mean is >= -5 se of the mean
    _, result = vae_study
    for name, ev in result["evaluations"].items():
        log_lik, kl = vae_by_hand[name]
        d = ev["iwae_per_image"] - (log_lik.mean(0) - kl)
        assert d.mean().item() >= -5 * (d.std() / d.shape[0] ** 0.5).item(), name


def test_vae_beta_four_has_the_lowest_rate(vae_study):
    # β = 4 weighs the KL four times as much: its held-out rate is the lowest of the four
    _, result = vae_study
    rates = {name: ev["kl"] for name, ev in result["evaluations"].items()}
    assert rates["beta4"] == min(rates.values())


def test_vae_binomial_likelihood_is_exact():
    # The decoder's Binomial(16) log-likelihood against a direct evaluation with lgamma
    from pyro_elbo_lab.demos.vae import DigitsVAE, load_split

    x_train, _, _ = load_split(0)
    x = x_train[:5]
    vae = DigitsVAE(name="test_vae")
    z = torch.zeros(5, vae.latent_dim)
    trace = pyro.poutine.trace(pyro.poutine.condition(vae.model, data={"z": z})).get_trace(x)
    logits = vae.decode(z)
    p = torch.sigmoid(logits)
    direct = (
        torch.lgamma(torch.tensor(17.0))
        - torch.lgamma(x + 1)
        - torch.lgamma(17 - x)
        + x * torch.log(p)
        + (16 - x) * torch.log1p(-p)
    ).sum()
    assert trace.nodes["x"]["fn"].log_prob(x).sum().item() == pytest.approx(direct.item(), rel=1e-10)
