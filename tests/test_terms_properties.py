# SPDX-License-Identifier: Apache-2.0
"""
Property tests (hypothesis) over random conjugate Normal–Normal models: random prior and
likelihood scales, data, guide location/scale, β and particles. The recorded objective and
decomposition equal those computed by hand from the draws a loss call makes at that seed
(Monte Carlo terms from ``poutine.trace`` values, closed-form KL and entropy for the mean-field
estimator); under the exact posterior the Monte Carlo ELBO equals the closed-form log evidence
for every particle.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO

SETTINGS = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


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
    # max_plate_nesting given: no extra guide draw to guess it, so the draws are the hand's
    return Loss(
        beta=problem["beta"],
        num_particles=problem["num_particles"],
        vectorize_particles=problem["vectorize"],
        max_plate_nesting=1,
    )


def _draws(guide, data, num_particles, vectorize, seed):
    """The z a loss call at ``seed`` draws, shape (num_particles,): the guide traced by hand."""
    pyro.set_rng_seed(seed)
    with poutine.block():
        if vectorize and num_particles > 1:
            with pyro.plate("num_particles_vectorized", num_particles, dim=-2):
                return poutine.trace(guide).get_trace(data).nodes["z"]["value"].reshape(-1)
        return torch.stack([poutine.trace(guide).get_trace(data).nodes["z"]["value"] for _ in range(num_particles)])


def _hand_terms(p):
    """Per-particle reconstruction, KL, entropy, cross-entropy and objective, by hand, averaged."""
    model, guide = _model_guide(p["mu0"], p["sigma0"], p["sigma"], p["loc"], p["scale"])
    z = _draws(guide, p["data"], p["num_particles"], p["vectorize"], p["seed"])
    q, prior = dist.Normal(p["loc"], p["scale"]), dist.Normal(p["mu0"], p["sigma0"])
    recon = dist.Normal(z.unsqueeze(-1), p["sigma"]).log_prob(p["data"]).sum(-1)
    if p["mean_field"]:  # closed forms
        kl = (
            math.log(p["sigma0"] / p["scale"])
            + (p["scale"] ** 2 + (p["loc"] - p["mu0"]) ** 2) / (2 * p["sigma0"] ** 2)
            - 0.5
        )
        entropy = 0.5 * math.log(2 * math.pi * math.e * p["scale"] ** 2)
        kl, entropy = torch.full_like(z, kl), torch.full_like(z, entropy)
    else:
        kl, entropy = q.log_prob(z) - prior.log_prob(z), -q.log_prob(z)
    out = dict(
        reconstruction=recon,
        kl=kl,
        entropy=entropy,
        cross_entropy=-prior.log_prob(z) if not p["mean_field"] else kl + entropy,
        elbo=recon - kl,
        objective=recon - p["beta"] * kl,
    )
    return {name: value.mean().item() for name, value in out.items()}


@SETTINGS
@given(problem=conjugate_problems())
def test_terms_any_guide_by_hand(problem):
    p = problem
    model, guide = _model_guide(p["mu0"], p["sigma0"], p["sigma"], p["loc"], p["scale"])
    hand = _hand_terms(p)
    loss_fn = _loss(p)
    pyro.set_rng_seed(p["seed"])
    loss = loss_fn.loss(model, guide, p["data"])
    terms = loss_fn.last_terms
    assert loss == pytest.approx(-hand["objective"], abs=_tol(loss, hand["reconstruction"], hand["kl"]))
    assert terms.num_particles == p["num_particles"] and bool(terms.stderr) == (p["num_particles"] > 1)
    for name, value in hand.items():
        tol = _tol(value, hand["reconstruction"], hand["kl"], hand["entropy"])
        assert getattr(terms, name) == pytest.approx(value, abs=tol), name


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


def test_stack_columns_fills_missing_entries_with_zeros():
    # Hand-built: particle 1 records (a, b), particles 2-3 (vectorised) record (b, c).
    from pyro_elbo_lab.terms import stack_columns

    first = (["a", "b"], torch.tensor([1.0, 2.0]))
    rest = (["b", "c"], torch.tensor([[3.0, 4.0], [5.0, 6.0]]))
    names, values = stack_columns([first, rest])
    assert names == ["a", "b", "c"]
    expected = torch.tensor([[1.0, 0.0, 0.0], [2.0, 3.0, 4.0], [0.0, 5.0, 6.0]])
    assert torch.equal(values, expected)
