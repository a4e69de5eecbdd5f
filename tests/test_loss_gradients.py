# SPDX-License-Identifier: Apache-2.0
"""
Gradients of the β-weighted objective against exact gradients: closed form for Gaussian
(reparameterised) sites, enumeration for Bernoulli (score-function) sites.

The loss' gradient is the average over P vectorised particles of a per-particle estimator
whose mean is the exact gradient. Each test computes that estimator's exact standard
deviation (closed form, enumeration, or independent draws in the test itself) and allows
5 standard deviations of the mean, 5 sd / sqrt(P): a chance failure has probability
< 6e-7 per comparison (and the seed is fixed). Parity with Pyro's own estimators at β = 1
(identical gradients for the same seed) lives in ``test_valid_models.py``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO

LOSSES = pytest.mark.parametrize("Loss", [BetaELBO, BetaMeanFieldELBO], ids=["BetaELBO", "BetaMeanFieldELBO"])
P = 20_000
DATA = torch.tensor([1.3, 0.2, 2.1, 1.7, 0.9, 1.1, 2.4])
SIGMA, SIGMA0 = 0.8, 1.5


def _grads(loss_fn, model, guide, args, params):
    """Gradient of the objective (= -loss) with respect to ``params``."""
    loss = loss_fn.differentiable_loss(model, guide, *args)
    return [-g for g in torch.autograd.grad(loss, params)]


def normal_gradient_stats(data, sigma, mu0, sigma0, m, s, beta, monte_carlo_kl):
    """
    Exact gradient of E_q log N(x | z, sigma) - β KL(N(m, s) || N(mu0, sigma0)) with respect
    to (m, s, mu0), and the sd of the per-particle reparameterised estimator.

    With z = m + s ε the per-particle gradients are, for c = 1 (Monte Carlo KL, full
    log q as Pyro uses) or c = 0 (analytic KL):
    d/dm = A - s B ε, d/ds = A ε - s B ε^2 + const, d/dmu0 = β (m + c s ε - mu0) / sigma0^2,
    A = Σ(x - m)/σ² - c β (m - mu0)/σ0², B = N/σ² + c β/σ0²; Var[ε] = 1, Var[ε²] = 2.
    """
    n, c = len(data), 1.0 if monte_carlo_kl else 0.0
    resid = (data - m).sum().item()
    mean = {
        "m": resid / sigma**2 - beta * (m - mu0) / sigma0**2,
        "s": -n * s / sigma**2 - beta * (-1 / s + s / sigma0**2),
        "mu0": beta * (m - mu0) / sigma0**2,
    }
    a = resid / sigma**2 - c * beta * (m - mu0) / sigma0**2
    b = n / sigma**2 + c * beta / sigma0**2
    sd = {"m": s * b, "s": math.sqrt(a**2 + 2 * b**2 * s**2), "mu0": c * beta * s / sigma0**2}
    return mean, sd


def _normal_model_and_guide(mu0, m, s, data_sigma=SIGMA, name="z", obs="x"):
    def model(data):
        z = pyro.sample(name, dist.Normal(mu0, SIGMA0))
        with pyro.plate(f"{obs}_plate", len(data)):
            pyro.sample(obs, dist.Normal(z, data_sigma), obs=data)

    def guide(data):
        pyro.sample(name, dist.Normal(m, s))

    return model, guide


@pytest.mark.parametrize("beta", [0.0, 1.0, 4.0])
@LOSSES
def test_reparameterised_gradient_closed_form(Loss, beta):
    mu0 = torch.tensor(0.5, requires_grad=True)
    m = torch.tensor(0.3, requires_grad=True)
    s = torch.tensor(0.45, requires_grad=True)
    model, guide = _normal_model_and_guide(mu0, m, s)
    loss_fn = Loss(beta=beta, num_particles=P, vectorize_particles=True)
    grads = dict(zip(["m", "s", "mu0"], _grads(loss_fn, model, guide, (DATA,), [m, s, mu0])))
    mean, sd = normal_gradient_stats(DATA, SIGMA, 0.5, SIGMA0, 0.3, 0.45, beta, Loss is BetaELBO)
    for name in ("m", "s", "mu0"):
        tol = 5 * sd[name] / math.sqrt(P) + 1e-10  # 1e-10: float64 rounding when sd = 0
        assert grads[name].item() == pytest.approx(mean[name], abs=tol), name


@LOSSES
def test_beta_on_named_sites_gradient(Loss):
    """β = 3 on z only; w keeps weight 1: each site's gradient follows its own weight."""
    m = torch.tensor(0.3, requires_grad=True)
    s = torch.tensor(0.45, requires_grad=True)
    mw = torch.tensor(-0.2, requires_grad=True)
    sw = torch.tensor(0.6, requires_grad=True)
    ydata = torch.tensor([-0.5, 0.4, 0.1])
    model_z, guide_z = _normal_model_and_guide(0.5, m, s)
    model_w, guide_w = _normal_model_and_guide(0.0, mw, sw, data_sigma=1.0, name="w", obs="y")

    def model(data, ydata):
        model_z(data)
        model_w(ydata)

    def guide(data, ydata):
        guide_z(data)
        guide_w(ydata)

    loss_fn = Loss(beta=3.0, sites=["z"], num_particles=P, vectorize_particles=True)
    g_m, g_s, g_mw, g_sw = _grads(loss_fn, model, guide, (DATA, ydata), [m, s, mw, sw])
    mc = Loss is BetaELBO
    mean, sd = normal_gradient_stats(DATA, SIGMA, 0.5, SIGMA0, 0.3, 0.45, 3.0, mc)
    # both sites share each particle, but each gradient only involves its own site's draw
    assert g_m.item() == pytest.approx(mean["m"], abs=5 * sd["m"] / math.sqrt(P))
    assert g_s.item() == pytest.approx(mean["s"], abs=5 * sd["s"] / math.sqrt(P))
    mean, sd = normal_gradient_stats(ydata, 1.0, 0.0, SIGMA0, -0.2, 0.6, 1.0, mc)
    assert g_mw.item() == pytest.approx(mean["m"], abs=5 * sd["m"] / math.sqrt(P))
    assert g_sw.item() == pytest.approx(mean["s"], abs=5 * sd["s"] / math.sqrt(P))


# ---------------------------------------------------------------------------------------
# score-function (Bernoulli) sites, against enumeration of both values
# ---------------------------------------------------------------------------------------

PI0, MU = 0.3, (-1.0, 1.5)


def _bernoulli_enumeration(p, data, beta, local):
    """
    For b = 0, 1: q(b), the cost f(b) = log p(x | b) - β (log q(b) - log π(b)) (per data
    element for local sites b_i, summed over the data for a global b) and d/dp log q(b).
    The exact objective is Σ_b q(b) f(b); the per-particle score-function estimator of its
    gradient is (d/dp log q(b)) f(b).
    """
    values = []
    for b in (0.0, 1.0):
        q_b = p if b else 1 - p
        prior_b = PI0 if b else 1 - PI0
        loglik = dist.Normal(MU[int(b)], SIGMA).log_prob(data)
        if not local:
            loglik = loglik.sum()
        f = loglik - beta * (torch.log(q_b) - math.log(prior_b))
        dlogq = 1 / p if b else -1 / (1 - p)
        values.append((q_b, f, dlogq))
    return values


@pytest.mark.parametrize("beta", [1.0, 3.0])
@pytest.mark.parametrize("local", [False, True], ids=["global", "local-plate"])
def test_score_function_gradient_enumeration(local, beta):
    data = DATA[:4]
    p = torch.tensor([0.35, 0.6, 0.8, 0.5] if local else 0.4, requires_grad=True)

    def model(data):
        if local:
            with pyro.plate("data", len(data)):
                b = pyro.sample("b", dist.Bernoulli(PI0))
                pyro.sample("x", dist.Normal(MU[0] + (MU[1] - MU[0]) * b, SIGMA), obs=data)
        else:
            b = pyro.sample("b", dist.Bernoulli(PI0))
            with pyro.plate("data", len(data)):
                pyro.sample("x", dist.Normal(MU[0] + (MU[1] - MU[0]) * b, SIGMA), obs=data)

    def guide(data):
        if local:
            with pyro.plate("data", len(data)):
                pyro.sample("b", dist.Bernoulli(p))
        else:
            pyro.sample("b", dist.Bernoulli(p))

    (grad,) = _grads(BetaELBO(beta=beta, num_particles=P, vectorize_particles=True), model, guide, (data,), [p])

    # exact: autograd through the enumerated objective
    q = p.detach().clone().requires_grad_()
    objective = sum(q_b * f for q_b, f, _ in _bernoulli_enumeration(q, data, beta, local)).sum()
    (exact,) = torch.autograd.grad(objective, [q])
    # sd of the per-particle estimator, Rao-Blackwellised to the data element for local
    # sites (each b_i's downstream cost is its own x_i), the whole particle for a global b
    with torch.no_grad():
        enum = _bernoulli_enumeration(p.detach(), data, beta, local)
        first = sum(q_b * d * f for q_b, f, d in enum)
        second = sum(q_b * (d * f) ** 2 for q_b, f, d in enum)
        sd = (second - first**2).sqrt()
    assert torch.allclose(first, exact)  # the estimator is unbiased (sanity of the reference)
    assert torch.all((grad - exact).abs() <= 5 * sd / math.sqrt(P)), (grad, exact, sd)


def test_score_function_gradient_with_beta_on_downstream_site():
    """
    Bernoulli b (weight 1) upstream of a Gaussian z (β = 3 via sites=["z"]) whose prior
    depends on b: the downstream cost of b carries the β-weighted KL of z.
    """
    beta, delta, p0, m, s = 3.0, 3.0, 0.4, 0.3, 0.5
    p = torch.tensor(p0, requires_grad=True)

    def model(data):
        b = pyro.sample("b", dist.Bernoulli(PI0))
        z = pyro.sample("z", dist.Normal(delta * b, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(z, SIGMA), obs=data)

    def guide(data):
        pyro.sample("b", dist.Bernoulli(p))
        pyro.sample("z", dist.Normal(m, s))

    (grad,) = _grads(
        BetaELBO(beta=beta, sites=["z"], num_particles=P, vectorize_particles=True), model, guide, (DATA,), [p]
    )

    def kl_z(b):  # KL(N(m, s) || N(delta b, 1))
        return -math.log(s) + (s**2 + (m - delta * b) ** 2) / 2 - 0.5

    def log_q(b, pp):
        return math.log(pp if b else 1 - pp)

    def log_pi(b):
        return math.log(PI0 if b else 1 - PI0)

    # F(p) = Σ_b q(b) [E log p(x|z) + log π(b) - log q(b) - β KL_z(b)]; E log p(x|z) does not
    # depend on b, and Σ_b q(b) d/dp log q(b) = 0, so dF/dp = F_1 - F_0 of the b-dependent part
    exact = (log_pi(1) - log_q(1, p0) - beta * kl_z(1)) - (log_pi(0) - log_q(0, p0) - beta * kl_z(0))
    # sd of the per-particle estimator d/dp log q(b) * f(b, z), from independent draws
    g = torch.Generator().manual_seed(123)
    zs = m + s * torch.randn(400_000, generator=g)
    second = 0.0
    for b in (0.0, 1.0):
        q_b = p0 if b else 1 - p0
        f = (
            dist.Normal(zs.unsqueeze(-1), SIGMA).log_prob(DATA).sum(-1)
            + log_pi(b)
            - log_q(b, p0)
            - beta * (dist.Normal(m, s).log_prob(zs) - dist.Normal(delta * b, 1.0).log_prob(zs))
        )
        dlogq = 1 / p0 if b else -1 / (1 - p0)
        second += q_b * ((dlogq * f) ** 2).mean().item()
    sd = math.sqrt(second - exact**2)
    assert grad.item() == pytest.approx(exact, abs=5 * sd / math.sqrt(P))
    # the unweighted cost would be off by (β - 1) (KL_z(1) - KL_z(0)): far outside the band
    assert abs((beta - 1) * (kl_z(1) - kl_z(0))) > 10 * sd / math.sqrt(P)


def test_score_function_gradient_under_free_bits_on_another_site():
    """
    Regression: a Bernoulli site left out of free bits (sites=["z"]) sees the free-bits term,
    not the linear KL of z, in its downstream cost. λ = 2 exceeds the per-particle KL of z
    at every draw (log q(z) - log p(z|b) <= log 2 + 2 b^2 / 3 < 1.37 for q = N(0, 1/2),
    p = N(b, 1)), so the free-bits term is the constant β λ and dF/dp only involves b.
    """
    beta, lam, p0 = 2.0, 2.0, 0.4
    p = torch.tensor(p0, requires_grad=True)

    def model(data):
        b = pyro.sample("b", dist.Bernoulli(PI0))
        z = pyro.sample("z", dist.Normal(b, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(z, SIGMA), obs=data)

    def guide(data):
        pyro.sample("b", dist.Bernoulli(p))
        pyro.sample("z", dist.Normal(0.0, 0.5))

    loss_fn = BetaELBO(beta=beta, sites=["z"], free_bits=lam, num_particles=P, vectorize_particles=True)
    (grad,) = _grads(loss_fn, model, guide, (DATA,), [p])
    assert loss_fn.last_terms.objective == pytest.approx(
        loss_fn.last_terms.reconstruction - loss_fn.last_terms.per_site["b"]["kl"] - beta * lam, abs=1e-10
    )
    exact = (math.log(PI0) - math.log(p0)) - (math.log(1 - PI0) - math.log(1 - p0))
    g = torch.Generator().manual_seed(321)
    zs = 0.5 * torch.randn(400_000, generator=g)
    loglik = dist.Normal(zs.unsqueeze(-1), SIGMA).log_prob(DATA).sum(-1)
    second = 0.0
    for b in (0.0, 1.0):
        q_b, pi_b = (p0, PI0) if b else (1 - p0, 1 - PI0)
        f = loglik + math.log(pi_b) - math.log(q_b) - beta * lam
        second += q_b * (((1 / p0 if b else -1 / (1 - p0)) * f) ** 2).mean().item()
    sd = math.sqrt(second - exact**2)
    assert grad.item() == pytest.approx(exact, abs=5 * sd / math.sqrt(P))


# ---------------------------------------------------------------------------------------
# free bits and capacity gradients
# ---------------------------------------------------------------------------------------

LOCAL_DATA = torch.tensor([[0.5, 1.0, -2.0], [0.1, 2.0, 1.5], [-0.3, 1.4, 2.2], [0.2, -1.1, 1.9]])


def _local(loc, scale):
    """Likelihood on latent dims 1 and 2 only, so dim 0 is driven by its KL alone."""

    def model(data):
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z[..., 1:], 1.0).to_event(1), obs=data[..., 1:])

    def guide(data):
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide


@pytest.mark.parametrize("particles", [dict(), dict(num_particles=5, vectorize_particles=True)], ids=["1", "5-vec"])
def test_free_bits_gradient(particles):
    """Dims below λ get exactly zero gradient; dims above λ get the β-ELBO's gradient."""
    loc = torch.tensor([[0.1, 1.0, -2.0], [0.0, 1.5, 1.5], [-0.1, 1.2, 2.0], [0.1, -1.0, 2.0]], requires_grad=True)
    scale = torch.tensor([[0.9, 0.6, 0.5], [1.1, 0.7, 0.5], [0.95, 0.5, 0.6], [1.0, 0.6, 0.4]], requires_grad=True)
    model, guide = _local(loc, scale)
    with torch.no_grad():  # average KL per dim: ~0.01, ~0.9, ~2.2
        kl_j = (-torch.log(scale) + (scale**2 + loc**2) / 2 - 0.5).mean(0)
    lam = 0.5
    assert kl_j[0] < lam < kl_j[1] and kl_j[2] > lam
    pyro.set_rng_seed(8)
    g_loc, g_scale = _grads(
        BetaMeanFieldELBO(beta=2.0, free_bits=lam, **particles), model, guide, (LOCAL_DATA,), [loc, scale]
    )
    assert torch.all(g_loc[:, 0] == 0) and torch.all(g_scale[:, 0] == 0)
    pyro.set_rng_seed(8)
    e_loc, e_scale = _grads(BetaMeanFieldELBO(beta=2.0, **particles), model, guide, (LOCAL_DATA,), [loc, scale])
    assert torch.allclose(g_loc[:, 1:], e_loc[:, 1:], rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_scale[:, 1:], e_scale[:, 1:], rtol=1e-10, atol=1e-12)
    # and the β-ELBO's gradient of dim 0 is the closed form -β d KL / d(loc, scale)
    assert torch.allclose(e_loc[:, 0], -2.0 * loc[:, 0].detach(), atol=1e-12)
    assert torch.allclose(e_scale[:, 0], -2.0 * (scale[:, 0] - 1 / scale[:, 0]).detach(), atol=1e-12)


@pytest.mark.parametrize("capacity, sign", [(0.1, -1.0), (50.0, 1.0)], ids=["KL-above-C", "KL-below-C"])
def test_capacity_gradient(capacity, sign):
    """d/dθ [-γ |KL - N C|] = -γ sign(KL - N C) dKL/dθ: the KL is pushed towards N C."""
    loc = torch.tensor([[0.1, 1.0, -2.0], [0.0, 1.5, 1.5], [-0.1, 1.2, 2.0], [0.1, -1.0, 2.0]], requires_grad=True)
    scale = torch.full((4, 3), 0.7, requires_grad=True)
    model, guide = _local(loc, scale)
    gamma = 5.0
    g_loc, g_scale = _grads(
        BetaMeanFieldELBO(capacity=capacity, gamma=gamma), model, guide, (LOCAL_DATA,), [loc, scale]
    )
    # dim 0 has no likelihood: its gradient is the capacity term's, in closed form
    dkl_dloc, dkl_dscale = loc[:, 0].detach(), (scale[:, 0] - 1 / scale[:, 0]).detach()
    assert torch.allclose(g_loc[:, 0], sign * gamma * dkl_dloc, atol=1e-12)
    assert torch.allclose(g_scale[:, 0], sign * gamma * dkl_dscale, atol=1e-12)
