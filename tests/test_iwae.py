# SPDX-License-Identifier: Apache-2.0
"""IWAE / Rényi-α with DReG against RenyiELBO, the exact evidence of a conjugate model, and Monte Carlo."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO

from pyro_elbo_lab.losses.iwae import IWAE

DATA = torch.tensor([0.8, 1.5, -0.3, 2.1])


def model(data):
    shift = pyro.param("shift", torch.tensor(0.2))
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(z + shift, 1.0), obs=data)


def guide(data):
    m = pyro.param("m", torch.tensor(0.3))
    s = pyro.param("s", torch.tensor(0.6), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(m, s))


def exact_log_evidence(shift=0.2):
    n = len(DATA)
    cov = torch.eye(n) + torch.ones(n, n)
    return dist.MultivariateNormal(torch.full((n,), shift), cov).log_prob(DATA).item()


def _params():
    return {name: pyro.param(name).unconstrained() for name in ("m", "s", "shift")}


def _grads(elbo, seed):
    for p in _params().values():
        p.grad = None
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(model, guide, DATA)
    return loss, {k: p.grad.clone() for k, p in _params().items()}


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential_particles", "vectorized_particles"])
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_value_and_standard_gradient_match_renyi_elbo(alpha, vectorize):
    kwargs = dict(num_particles=5, max_plate_nesting=1, vectorize_particles=vectorize)
    pyro.set_rng_seed(0)
    RenyiELBO(alpha=alpha, **kwargs).loss(model, guide, DATA)  # create the parameters
    expected = _grads(RenyiELBO(alpha=alpha, **kwargs), 4)
    actual = _grads(IWAE(alpha=alpha, gradient="standard", **kwargs), 4)
    assert actual[0] == pytest.approx(expected[0], rel=1e-12)
    for name in expected[1]:
        torch.testing.assert_close(actual[1][name], expected[1][name], rtol=1e-10, atol=1e-12)
    pyro.set_rng_seed(4)
    assert IWAE(alpha=alpha, **kwargs).loss(model, guide, DATA) == pytest.approx(expected[0], rel=1e-12)


def test_bound_increases_with_k_to_exact_log_evidence():
    pyro.set_rng_seed(0)
    IWAE(1, max_plate_nesting=1).loss(model, guide, DATA)
    log_evidence = exact_log_evidence()
    means, stderrs = [], []
    for k in (1, 4, 32, 512):
        elbo = IWAE(k, max_plate_nesting=1)
        bounds = torch.tensor([-elbo.loss(model, guide, DATA) for _ in range(200)])
        means.append(bounds.mean().item())
        stderrs.append(bounds.std().item() / math.sqrt(len(bounds)))
    for (m0, s0), (m1, s1) in zip(zip(means, stderrs), zip(means[1:], stderrs[1:])):
        assert m1 > m0 - 3 * math.hypot(s0, s1)
    assert means[-1] > means[0] + 3 * math.hypot(stderrs[0], stderrs[-1])  # strictly tighter
    # a lower bound in expectation, within 3 standard errors and a small bias of log p(x)
    assert means[-1] <= log_evidence + 3 * stderrs[-1]
    assert log_evidence - means[-1] < 0.01 + 3 * stderrs[-1]


def test_records_bound_and_elbo_of_the_same_particles():
    pyro.set_rng_seed(0)
    elbo = IWAE(6, max_plate_nesting=1)
    pyro.set_rng_seed(2)
    loss = elbo.loss(model, guide, DATA)
    # the same particles, by hand
    pyro.set_rng_seed(2)
    with pyro.plate("num_particles_vectorized", 6, dim=-2):
        guide_trace = pyro.poutine.trace(guide).get_trace(DATA)
    z = guide_trace.nodes["z"]["value"].reshape(6)
    log_q = dist.Normal(pyro.param("m"), pyro.param("s")).log_prob(z).detach()
    log_prior = dist.Normal(0.0, 1.0).log_prob(z)
    log_lik = dist.Normal(z.unsqueeze(-1) + 0.2, 1.0).log_prob(DATA).sum(-1)
    log_w = log_lik + log_prior - log_q
    assert -loss == pytest.approx((torch.logsumexp(log_w, 0) - math.log(6)).item(), rel=1e-12)
    assert elbo.last_bound == pytest.approx(-loss, rel=1e-12)
    terms = elbo.last_terms
    assert terms.elbo == pytest.approx(log_w.mean().item(), rel=1e-12)
    assert elbo.last_elbo == pytest.approx(log_w.mean().item(), rel=1e-12)
    assert terms.per_site["obs"]["reconstruction"] == pytest.approx(log_lik.mean().item(), rel=1e-12)
    assert terms.per_site["z"]["kl"] == pytest.approx((log_q - log_prior).mean().item(), rel=1e-12)
    assert terms.per_site["z"]["entropy"] == pytest.approx(-log_q.mean().item(), rel=1e-12)
    assert terms.stderr["elbo"] == pytest.approx(log_w.std().item() / math.sqrt(6), rel=1e-10)


def test_dreg_is_unbiased_with_higher_signal_to_noise():
    """Rainforth et al. 2018: the standard IWAE guide gradient's SNR falls with K; DReG's does not."""
    pyro.set_rng_seed(0)
    IWAE(1, max_plate_nesting=1).loss(model, guide, DATA)
    k, repeats = 64, 400
    samples = {}
    for gradient in ("standard", "dreg"):
        elbo = IWAE(k, gradient=gradient, max_plate_nesting=1)
        rows = [_grads(elbo, seed)[1] for seed in range(repeats)]
        samples[gradient] = {name: torch.stack([r[name] for r in rows]) for name in rows[0]}
    for name in ("m", "s"):
        std, dreg = samples["standard"][name], samples["dreg"][name]
        se = math.hypot(std.std().item(), dreg.std().item()) / math.sqrt(repeats)
        assert abs(std.mean().item() - dreg.mean().item()) < 4 * se
        snr_std = abs(std.mean().item()) / std.std().item()
        snr_dreg = abs(dreg.mean().item()) / dreg.std().item()
        assert dreg.var().item() < 0.5 * std.var().item(), (name, snr_std, snr_dreg)
    # model parameters: the standard gradient, the same number for the same seed
    torch.testing.assert_close(samples["dreg"]["shift"], samples["standard"]["shift"], rtol=1e-10, atol=1e-12)


def test_non_reparameterised_site_refused():
    def discrete_guide(data):
        pyro.sample("z", dist.Bernoulli(0.5))

    def discrete_model(data):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=data[0])

    with pytest.raises(NotImplementedError, match="guide site 'z' \\(Bernoulli\\) is not"):
        IWAE(4, max_plate_nesting=0).loss_and_grads(discrete_model, discrete_guide, DATA)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_particles": 0}, "num_particles must be an integer >= 1"),
        ({"alpha": 1.0}, "alpha must be a finite number != 1"),
        ({"gradient": "rws"}, "gradient must be one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IWAE(**kwargs)


def local_model(data):
    with pyro.plate("data", len(data)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=data)


def local_guide(data):
    m = pyro.param("lm", torch.zeros(len(data)))
    with pyro.plate("data", len(data)):
        pyro.sample("z", dist.Normal(m, 0.8))


def test_local_latents_bound_per_data_point():
    """Plate-local latents: one bound per data point (RenyiELBO's value), exact for each point as K grows."""
    kwargs = dict(num_particles=7, max_plate_nesting=1, vectorize_particles=True)
    pyro.set_rng_seed(0)
    RenyiELBO(**kwargs).loss(local_model, local_guide, DATA)
    pyro.set_rng_seed(1)
    expected = RenyiELBO(**kwargs).loss(local_model, local_guide, DATA)
    pyro.set_rng_seed(1)
    elbo = IWAE(**kwargs)
    assert elbo.loss(local_model, local_guide, DATA) == pytest.approx(expected, rel=1e-12)
    # large K: the per-point bounds sum to the exact evidence, sum_n log N(x_n | 0, 1 + 0.5^2)
    exact = dist.Normal(0.0, math.sqrt(1.25)).log_prob(DATA).sum().item()
    bounds = torch.tensor([-IWAE(2000, max_plate_nesting=1).loss(local_model, local_guide, DATA) for _ in range(20)])
    stderr = bounds.std().item() / math.sqrt(len(bounds))
    assert abs(bounds.mean().item() - exact) < 3 * stderr + 0.005
