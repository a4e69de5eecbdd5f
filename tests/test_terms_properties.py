# SPDX-License-Identifier: Apache-2.0
"""
Property tests (hypothesis) over random conjugate Normal–Normal models: random prior and
likelihood scales, data, guide location/scale, β and particles. The identities of the
decomposition hold to float precision for either estimator; under the exact posterior the
Monte Carlo ELBO equals the closed-form log evidence for every particle; the analytic KL
equals the closed form; the recorded objective is the β-weighted one.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO, ELBOTerms

SETTINGS = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _tol(*values):
    """float64 rounding on sums of O(N) terms: 1e-9 relative to the largest magnitude involved."""
    return 1e-9 * (1.0 + max(abs(v) for v in values))


@st.composite
def conjugate_problems(draw):
    n = draw(st.integers(1, 8))
    data = draw(st.lists(st.floats(-5, 5, allow_nan=False), min_size=n, max_size=n))
    return dict(
        mu0=draw(st.floats(-3, 3)),
        sigma0=draw(st.floats(0.2, 5)),
        sigma=draw(st.floats(0.2, 5)),
        data=torch.tensor(data, dtype=torch.float64),
        loc=draw(st.floats(-5, 5)),
        scale=draw(st.floats(0.05, 5)),
        beta=draw(st.sampled_from([0.0, 0.3, 1.0, 4.0])),
        num_particles=draw(st.integers(1, 5)),
        vectorize=draw(st.booleans()),
        mean_field=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _model_guide(mu0, sigma0, sigma, loc, scale):
    def model(data):
        z = pyro.sample("z", dist.Normal(mu0, sigma0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(z, sigma), obs=data)

    def guide(data):
        pyro.sample("z", dist.Normal(loc, scale))

    return model, guide


def _posterior(mu0, sigma0, sigma, data):
    precision = 1 / sigma0**2 + len(data) / sigma**2
    return ((mu0 / sigma0**2 + data.sum().item() / sigma**2) / precision, precision**-0.5)


def _log_evidence(mu0, sigma0, sigma, data):
    n = len(data)
    cov = sigma**2 * torch.eye(n) + sigma0**2 * torch.ones(n, n)
    return dist.MultivariateNormal(torch.full((n,), float(mu0)), cov).log_prob(data).item()


def _loss(problem):
    Loss = BetaMeanFieldELBO if problem["mean_field"] else BetaELBO
    return Loss(
        beta=problem["beta"],
        num_particles=problem["num_particles"],
        vectorize_particles=problem["vectorize"],
    )


def _check_identities(terms: ELBOTerms):
    assert terms.elbo == pytest.approx(terms.reconstruction - terms.kl, abs=_tol(terms.reconstruction, terms.kl))
    assert terms.elbo == pytest.approx(
        terms.expected_log_joint + terms.entropy, abs=_tol(terms.expected_log_joint, terms.entropy)
    )
    assert terms.kl == pytest.approx(terms.cross_entropy - terms.entropy, abs=_tol(terms.cross_entropy, terms.entropy))
    assert terms.objective == pytest.approx(
        terms.reconstruction - terms.beta * terms.kl, abs=_tol(terms.reconstruction, terms.beta * terms.kl)
    )


@SETTINGS
@given(problem=conjugate_problems())
def test_identities_any_guide(problem):
    p = problem
    model, guide = _model_guide(p["mu0"], p["sigma0"], p["sigma"], p["loc"], p["scale"])
    loss_fn = _loss(p)
    pyro.set_rng_seed(p["seed"])
    loss = loss_fn.loss(model, guide, p["data"])
    terms = loss_fn.last_terms
    assert loss == pytest.approx(-terms.objective, abs=_tol(loss))
    assert terms.num_particles == p["num_particles"] and bool(terms.stderr) == (p["num_particles"] > 1)
    _check_identities(terms)
    if p["mean_field"]:
        kl = math.log(p["sigma0"] / p["scale"]) + (p["scale"] ** 2 + (p["loc"] - p["mu0"]) ** 2) / (
            2 * p["sigma0"] ** 2
        ) - 0.5
        assert terms.kl == pytest.approx(kl, abs=_tol(kl))
        entropy = 0.5 * math.log(2 * math.pi * math.e * p["scale"] ** 2)
        assert terms.entropy == pytest.approx(entropy, abs=_tol(entropy))


@SETTINGS
@given(problem=conjugate_problems())
def test_exact_posterior_elbo_is_log_evidence(problem):
    p = problem
    loc, scale = _posterior(p["mu0"], p["sigma0"], p["sigma"], p["data"])
    model, guide = _model_guide(p["mu0"], p["sigma0"], p["sigma"], loc, scale)
    loss_fn = BetaELBO(num_particles=p["num_particles"], vectorize_particles=p["vectorize"])
    pyro.set_rng_seed(p["seed"])
    loss = loss_fn.loss(model, guide, p["data"])
    log_z = _log_evidence(p["mu0"], p["sigma0"], p["sigma"], p["data"])
    terms = loss_fn.last_terms
    tol = _tol(log_z, terms.reconstruction, terms.kl)
    assert -loss == pytest.approx(log_z, abs=tol)
    assert terms.elbo == pytest.approx(log_z, abs=tol)
    _check_identities(terms)
