# SPDX-License-Identifier: Apache-2.0
"""
Pyro's extension hook ``_differentiable_loss_particle(model_trace, guide_trace)`` carries
the weighting (β, free bits, capacity), so that a class built on the hook, as Pyro's own
``JitTraceMeanField_ELBO`` is, keeps it. Each value is computed by hand from the
``poutine.trace`` log-probabilities (and closed-form KLs) of the same traces.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.util import prune_subsample_sites

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO

DATA = torch.tensor([1.3, 0.2, 2.1, 1.7, 0.9, 1.1])


def model(data):
    loc = pyro.param("prior_loc", torch.tensor(0.3))
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 0.8), obs=data)


def guide(data):
    m = pyro.param("m", data * 0.5)
    s = pyro.param("s", torch.full_like(data, 0.7), constraint=dist.constraints.positive)
    with pyro.plate("data", len(data)):
        pyro.sample("z", dist.Normal(m, s))


def _traces(seed):
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(guide).get_trace(DATA)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(DATA)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)


def _hand_parts(seed):
    """(reconstruction, Monte Carlo KL per element, analytic KL per element) by hand."""
    model_trace, guide_trace = _traces(seed)
    z = guide_trace.nodes["z"]["value"]
    m, s = pyro.param("m"), pyro.param("s")
    loc = pyro.param("prior_loc")
    recon = dist.Normal(z, 0.8).log_prob(DATA).sum()
    mc = dist.Normal(m, s).log_prob(z) - dist.Normal(loc, 1.0).log_prob(z)
    analytic = torch.log(1.0 / s) + (s**2 + (m - loc) ** 2) / 2 - 0.5
    return recon, mc, analytic


@pytest.mark.parametrize("beta", [1.0, 10.0, 0.25])
@pytest.mark.parametrize(
    "Loss, base, analytic", [(BetaELBO, Trace_ELBO, False), (BetaMeanFieldELBO, TraceMeanField_ELBO, True)]
)
def test_hook_keeps_beta(Loss, base, analytic, beta):
    # the base class's differentiable_loss goes through the hook only
    guide(DATA)
    model(DATA)
    loss = Loss(beta=beta)
    pyro.set_rng_seed(3)
    value = base.differentiable_loss(loss, model, guide, DATA)
    recon, mc, exact = _hand_parts(3)
    kl = (exact if analytic else mc).sum()
    expected = -(recon - beta * kl)
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    # and its gradient with respect to the guide's loc is the hand one
    grad = torch.autograd.grad(value, [pyro.param("m").unconstrained()])[0]
    m = pyro.param("m").detach().requires_grad_()
    s = pyro.param("s").detach()
    pyro.set_rng_seed(3)
    guide_trace = poutine.trace(guide).get_trace(DATA)
    eps = (guide_trace.nodes["z"]["value"] - pyro.param("m")) / s
    z = m + s * eps.detach()
    loc = pyro.param("prior_loc").detach()
    if analytic:
        kl_h = (torch.log(1.0 / s) + (s**2 + (m - loc) ** 2) / 2 - 0.5).sum()
    else:
        kl_h = (dist.Normal(m, s).log_prob(z) - dist.Normal(loc, 1.0).log_prob(z)).sum()
    hand = -(dist.Normal(z, 0.8).log_prob(DATA).sum() - beta * kl_h)
    expected_grad = torch.autograd.grad(hand, [m])[0]
    assert torch.allclose(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_hook_beta_ten_is_not_the_elbo():
    # the regression of issue 10: beta=10 through the hook gave the unweighted loss
    guide(DATA)
    model(DATA)
    model_trace, guide_trace = _traces(5)
    for trace in (model_trace, guide_trace):
        trace.compute_log_prob()
    guide_trace.compute_score_parts()
    loss = BetaELBO(beta=10.0)
    value, surrogate = loss._differentiable_loss_particle(model_trace, guide_trace)
    recon = model_trace.nodes["x"]["log_prob_sum"]
    kl = guide_trace.nodes["z"]["log_prob_sum"] - model_trace.nodes["z"]["log_prob_sum"]
    assert value == pytest.approx(-(recon - 10.0 * kl).item(), rel=1e-12)
    assert surrogate.item() == pytest.approx(value, rel=1e-12)
    elbo = -(recon - kl).item()
    assert abs(value - elbo) > 1.0


def test_hook_free_bits_and_capacity():
    guide(DATA)
    model(DATA)
    lam, capacity, gamma = 0.9, 0.4, 3.0
    recon, _, exact = _hand_parts(7)
    n = len(DATA)
    fb = BetaMeanFieldELBO(beta=2.0, free_bits=lam)
    pyro.set_rng_seed(7)
    value = TraceMeanField_ELBO.differentiable_loss(fb, model, guide, DATA)
    # one latent dimension per element: N max(λ, mean KL)
    expected = -(recon - 2.0 * n * torch.clamp(exact.mean(), min=lam))
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
    cap = BetaMeanFieldELBO(capacity=capacity, gamma=gamma)
    pyro.set_rng_seed(7)
    value = TraceMeanField_ELBO.differentiable_loss(cap, model, guide, DATA)
    expected = -(recon - gamma * torch.abs(exact.sum() - n * capacity))
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)
