# SPDX-License-Identifier: Apache-2.0
"""IWAE / Rényi-α with DReG against RenyiELBO, the exact evidence of a conjugate model, and Monte Carlo."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal, init_to_value

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


def particles_by_hand(seed: int, k: int = 6) -> tuple:
    """``(log_lik, log_prior, log_q)`` of the ``k`` vectorised particles the loss draws after ``seed``."""
    pyro.set_rng_seed(seed)
    with pyro.plate("num_particles_vectorized", k, dim=-2):
        guide_trace = pyro.poutine.trace(guide).get_trace(DATA)
    z = guide_trace.nodes["z"]["value"].reshape(k)
    log_q = dist.Normal(pyro.param("m"), pyro.param("s")).log_prob(z).detach()
    log_prior = dist.Normal(0.0, 1.0).log_prob(z)
    log_lik = dist.Normal(z.unsqueeze(-1) + 0.2, 1.0).log_prob(DATA).sum(-1)
    return log_lik, log_prior, log_q


def test_records_bound_and_elbo_of_the_same_particles():
    pyro.set_rng_seed(0)
    elbo = IWAE(6, max_plate_nesting=1)
    pyro.set_rng_seed(2)
    loss = elbo.loss(model, guide, DATA)
    log_lik, log_prior, log_q = particles_by_hand(2)
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


def test_decompose_is_the_elbo_of_the_particles_by_hand_and_leaves_the_state():
    elbo = IWAE(6, max_plate_nesting=1)
    elbo.loss_and_grads(model, guide, DATA)
    before = elbo.last_terms
    pyro.set_rng_seed(5)
    terms = elbo.decompose(model, guide, DATA)
    log_lik, log_prior, log_q = particles_by_hand(5)
    assert terms.elbo == pytest.approx((log_lik + log_prior - log_q).mean().item(), rel=1e-12)
    assert terms.per_site["obs"]["reconstruction"] == pytest.approx(log_lik.mean().item(), rel=1e-12)
    assert terms.per_site["z"]["kl"] == pytest.approx((log_q - log_prior).mean().item(), rel=1e-12)
    assert elbo.step == 1 and elbo.last_terms is before


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


LOG_Y = torch.tensor([0.4, -1.1, 2.0])


def positive_model(y):
    """log s ~ N(0, 1), y_i ~ N(log s, 1): in u = log s the posterior is N(sum(y) / 4, 1/4)."""
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(s.log(), 1.0), obs=y)


@pytest.mark.parametrize(
    "guide_class, k",
    [(AutoNormal, 1), (AutoNormal, 8), (AutoDiagonalNormal, 1)],
    ids=["normal-1", "normal-8", "diag-1"],
)
def test_dreg_unbiased_for_autoguide_on_a_positive_site(guide_class, k):
    """
    Autoguides sample u ~ N(loc, scale) and put s = exp(u) in a Delta whose log_density is the
    Jacobian term -log|J(u)|: DReG must keep its path derivative (detaching it shifted the loc
    gradient by E[sum_k w_k^2]: 1 at K = 1, about 0.13 here at K = 8, which 300 repeats do not
    resolve; test_dreg_autoguide_gradient_by_hand checks K = 8 exactly). Guide 0.3 posterior sd
    off in the mean, 1.2x in the sd.
    """
    post_mean, post_sd = LOG_Y.sum().item() / 4, 0.5
    start = {"s": torch.tensor(math.exp(post_mean + 0.3 * post_sd))}
    guide = guide_class(positive_model, init_loc_fn=init_to_value(values=start), init_scale=1.2 * post_sd)
    guide(LOG_Y)
    params = dict(guide.named_parameters())
    repeats = 300
    samples = {}
    for name, elbo in (
        ("standard", RenyiELBO(alpha=0.0, num_particles=k, max_plate_nesting=1, vectorize_particles=True)),
        ("dreg", IWAE(k, max_plate_nesting=1, vectorize_particles=True)),
    ):
        rows = []
        for seed in range(repeats):
            for p in params.values():
                p.grad = None
            pyro.set_rng_seed(seed)
            elbo.loss_and_grads(positive_model, guide, LOG_Y)
            rows.append(torch.cat([p.grad.reshape(-1) for p in params.values()]))
        samples[name] = torch.stack(rows)
    std, dreg = samples["standard"], samples["dreg"]
    se = (std.var(0) + dreg.var(0)).sqrt() / math.sqrt(repeats)
    assert torch.all((std.mean(0) - dreg.mean(0)).abs() < 4 * se), (std.mean(0), dreg.mean(0), se)
    if k == 1:
        # the ELBO in closed form (u-space; the Jacobians cancel): its gradient in the guide's
        # unconstrained parameters
        if guide_class is AutoNormal:
            m, sigma = guide.locs.s, guide.scales.s
        else:
            m, sigma = guide.loc[0], guide.scale[0]
        elbo = -0.5 * (m**2 + sigma**2) - 0.5 * ((LOG_Y - m) ** 2 + sigma**2).sum() + sigma.log()
        exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(-elbo, list(params.values()))])
        assert torch.all((dreg.mean(0) - exact).abs() < 4 * dreg.std(0) / math.sqrt(repeats)), (dreg.mean(0), exact)


def test_dreg_autoguide_gradient_by_hand():
    """
    DReG (Tucker et al. 2018) for AutoNormal on s = exp(u), K = 8, against the same particles by
    hand: grad of -sum_k w_k^2 log w_k with log w_k = log p(y, s_k) - log q(s_k), q's loc and scale
    held fixed, and log q(s) = log N(u; loc, scale) - u (the Jacobian kept: it depends on u only).
    """
    k = 8
    guide = AutoNormal(positive_model, init_loc_fn=init_to_value(values={"s": torch.tensor(1.5)}), init_scale=0.8)
    guide(LOG_Y)
    params = list(guide.parameters())
    elbo = IWAE(k, max_plate_nesting=1, vectorize_particles=True)
    for seed in range(3):
        for p in params:
            p.grad = None
        pyro.set_rng_seed(seed)
        elbo.loss_and_grads(positive_model, guide, LOG_Y)
        pyro.set_rng_seed(seed)
        with pyro.plate("num_particles_vectorized", k, dim=-2):
            u = poutine.trace(guide).get_trace(LOG_Y).nodes["s_unconstrained"]["value"].reshape(k)
        s = u.exp()
        log_p = dist.LogNormal(0.0, 1.0).log_prob(s) + dist.Normal(u.unsqueeze(-1), 1.0).log_prob(LOG_Y).sum(-1)
        log_q = dist.Normal(guide.locs.s.detach(), guide.scales.s.detach()).log_prob(u) - u
        log_w = log_p - log_q
        weights = torch.softmax(log_w.detach(), 0)
        expected = torch.autograd.grad(-(weights**2 * log_w).sum(), params)
        for p, g in zip(params, expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


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


def vector_model(data):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(z[..., 0] - z[..., 1], 1.0), obs=data)


def vector_guide(data):
    m = pyro.param("vm", torch.tensor([0.3, -0.2]))
    s = pyro.param("vs", torch.tensor([0.6, 0.9]), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(m, s).to_event(1))


def lognormal_guide(y):
    m = pyro.param("lm", torch.tensor(0.1))
    s = pyro.param("ls", torch.tensor(0.7), constraint=dist.constraints.positive)
    pyro.sample("s", dist.LogNormal(m, s))


def _scalar_log_p(z):
    lik = dist.Normal(z.unsqueeze(-1) + pyro.param("shift"), 1.0).log_prob(DATA).sum(-1)
    return dist.Normal(0.0, 1.0).log_prob(z) + lik


def _vector_log_p(z):
    lik = dist.Normal((z[:, 0] - z[:, 1]).unsqueeze(-1), 1.0).log_prob(DATA).sum(-1)
    return dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + lik


def _lognormal_log_p(s):
    return dist.LogNormal(0.0, 1.0).log_prob(s) + dist.Normal(s.log().unsqueeze(-1), 1.0).log_prob(LOG_Y).sum(-1)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize(
    "case",
    [
        # Normal guide site (and a model parameter, which gets the standard gradient)
        (model, guide, DATA, ("m", "s"), ("shift",), _scalar_log_p, lambda m, s, z: dist.Normal(m, s).log_prob(z)),
        # Independent(Normal) guide site over two latent dimensions
        (vector_model, vector_guide, DATA, ("vm", "vs"), (), _vector_log_p,
         lambda m, s, z: dist.Normal(m, s).log_prob(z).sum(-1)),
        # a transformed guide distribution: the general path that copies it with its parameters detached
        (positive_model, lognormal_guide, LOG_Y, ("lm", "ls"), (), _lognormal_log_p,
         lambda m, s, z: dist.LogNormal(m, s).log_prob(z)),
    ],
    ids=["normal", "independent_normal", "lognormal"],
)  # fmt: skip
def test_dreg_gradient_by_hand(case, alpha):
    """
    DReG (Tucker et al. 2019, generalised to alpha) against the same K = 5 particles by hand: the
    guide's parameters get the gradient of -sum_k (alpha w_k + (1 - alpha) w_k^2) log w_k, w the
    normalised weights w_k^(1-alpha), log q at the guide's parameters held fixed; the model's the
    gradient of -sum_k w_k log w_k.
    """
    model_fn, guide_fn, data, guide_names, model_names, log_p_fn, log_q_fn = case
    k = 5
    pyro.set_rng_seed(0)
    elbo = IWAE(k, alpha=alpha, max_plate_nesting=1, vectorize_particles=True)
    elbo.loss(model_fn, guide_fn, data)  # creates the parameters
    params = {n: pyro.param(n).unconstrained() for n in guide_names + model_names}
    for seed in range(2):
        for p in params.values():
            p.grad = None
        pyro.set_rng_seed(seed)
        loss = elbo.loss_and_grads(model_fn, guide_fn, data)
        pyro.set_rng_seed(seed)
        with pyro.plate("num_particles_vectorized", k, dim=-2):
            z = poutine.trace(guide_fn).get_trace(data).nodes[elbo_site(guide_fn)]["value"]
        z = z.reshape(k, -1).squeeze(-1)
        fixed = [pyro.param(n).detach() for n in guide_names]
        log_p = log_p_fn(z)
        log_w = log_p - log_q_fn(*fixed, z)
        log_w_full = log_p - log_q_fn(*[pyro.param(n) for n in guide_names], z)
        assert -loss == pytest.approx(
            ((torch.logsumexp((1 - alpha) * log_w_full, 0) - math.log(k)) / (1 - alpha)).item(), rel=1e-12
        )
        weights = torch.softmax((1 - alpha) * log_w.detach(), 0)
        coefficient = alpha * weights + (1 - alpha) * weights**2
        guide_params = [params[n] for n in guide_names]
        expected = torch.autograd.grad(-(coefficient * log_w).sum(), guide_params, retain_graph=True)
        for p, g in zip(guide_params, expected):
            torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
        if model_names:
            model_params = [params[n] for n in model_names]
            for p, g in zip(model_params, torch.autograd.grad(-(weights * log_w_full).sum(), model_params)):
                torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def elbo_site(guide_fn):
    return "s" if guide_fn is lognormal_guide else "z"


def test_records_local_latents_per_particle():
    """
    With a plate common to every site (local latents), the bound is per data point, and the
    record still holds each particle's sums over all elements: by hand from the same draws.
    """
    k = 4
    pyro.set_rng_seed(0)
    elbo = IWAE(k, max_plate_nesting=1)
    elbo.loss(local_model, local_guide, DATA)
    pyro.set_rng_seed(3)
    elbo.loss(local_model, local_guide, DATA)
    pyro.set_rng_seed(3)
    with pyro.plate("num_particles_vectorized", k, dim=-2):
        z = poutine.trace(local_guide).get_trace(DATA).nodes["z"]["value"]
    assert z.shape == (k, len(DATA))
    log_q = dist.Normal(pyro.param("lm").detach(), 0.8).log_prob(z).sum(-1)
    log_prior = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_lik = dist.Normal(z, 0.5).log_prob(DATA).sum(-1)
    terms = elbo.last_terms
    assert terms.num_particles == k
    assert terms.per_site["obs"]["reconstruction"] == pytest.approx(log_lik.mean().item(), rel=1e-12)
    assert terms.per_site["z"]["kl"] == pytest.approx((log_q - log_prior).mean().item(), rel=1e-12)
    assert terms.per_site["z"]["entropy"] == pytest.approx(-log_q.mean().item(), rel=1e-12)
    elbo_per_particle = log_lik + log_prior - log_q
    assert terms.elbo == pytest.approx(elbo_per_particle.mean().item(), rel=1e-12)
    assert terms.stderr["elbo"] == pytest.approx(elbo_per_particle.std().item() / math.sqrt(k), rel=1e-10)
