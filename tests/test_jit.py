# SPDX-License-Identifier: Apache-2.0
"""
Compiled losses (JitBetaELBO, JitBetaMeanFieldELBO): identical losses and gradients to the
uncompiled classes for the same seed, exact values on conjugate models, β and capacity as
inputs of the compiled function (schedules without recompiling), compile-once caching.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from functools import partial

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn as nn
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.optim import Adam

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO, JitBetaELBO, JitBetaMeanFieldELBO
from pyro_elbo_lab.schedules import LinearWarmup

PAIRS = [
    pytest.param(BetaELBO, JitBetaELBO, id="JitBetaELBO"),
    pytest.param(BetaMeanFieldELBO, JitBetaMeanFieldELBO, id="JitBetaMeanFieldELBO"),
]
# the same, also with the inductor compiler (each compilation takes seconds: the slower
# tests run for these, the structural ones for TorchScript only)
INDUCTOR_PAIRS = [
    pytest.param(BetaELBO, partial(JitBetaELBO, compiler="inductor"), id="JitBetaELBO-inductor"),
    pytest.param(
        BetaMeanFieldELBO, partial(JitBetaMeanFieldELBO, compiler="inductor"), id="JitBetaMeanFieldELBO-inductor"
    ),
]
ALL_PAIRS = PAIRS + INDUCTOR_PAIRS

# Normal–Normal: mu ~ N(MU0, SIGMA0), x_i ~ N(mu, SIGMA), i = 1..N
MU0, SIGMA0, SIGMA = 0.5, 2.0, 1.5
X = torch.tensor([1.3, 2.1, -0.4, 0.9, 1.7, 2.6])


def nn_model(x):
    mu = pyro.sample("mu", dist.Normal(MU0, SIGMA0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, SIGMA), obs=x)


def nn_guide(x):
    loc = pyro.param("loc", torch.full((), 0.0))
    scale = pyro.param("scale", torch.full((), 1.0), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def posterior(x):
    precision = 1 / SIGMA0**2 + x.shape[0] / SIGMA**2
    mean = (MU0 / SIGMA0**2 + x.sum() / SIGMA**2) / precision
    return mean, torch.tensor(precision**-0.5)


def log_evidence(x):
    n = x.shape[0]
    cov = SIGMA**2 * torch.eye(n) + SIGMA0**2 * torch.ones(n, n)
    return dist.MultivariateNormal(torch.full((n,), MU0), cov).log_prob(x)


def expected_terms(x, m, s, beta):
    """Closed form E_q[log p(x|mu)], KL(q||p(mu)) and the β-objective for q = N(m, s)."""
    recon = (-0.5 * math.log(2 * math.pi * SIGMA**2) - ((x - m) ** 2 + s**2) / (2 * SIGMA**2)).sum()
    kl = math.log(SIGMA0 / s) + (s**2 + (m - MU0) ** 2) / (2 * SIGMA0**2) - 0.5
    return recon, kl, recon - beta * kl


def hand_terms(seed, num_particles):
    """
    Reconstruction, KL (Monte Carlo), expected log joint and entropy of ``nn_model`` /
    ``nn_guide`` at the current parameters, by hand from ``poutine.trace`` log-probabilities
    of the draws a vectorised loss makes after ``pyro.set_rng_seed(seed)``.
    """
    pyro.set_rng_seed(seed)
    with torch.no_grad(), pyro.plate("particles", num_particles, dim=-2):
        guide_trace = poutine.trace(nn_guide).get_trace(X)
        model_trace = poutine.trace(poutine.replay(nn_model, trace=guide_trace)).get_trace(X)
    mu = guide_trace.nodes["mu"]["value"]
    log_lik = model_trace.nodes["x"]["fn"].log_prob(X).sum(-1)
    log_prior = dist.Normal(MU0, SIGMA0).log_prob(mu).sum(-1)
    log_q = guide_trace.nodes["mu"]["fn"].log_prob(mu).sum(-1)
    return {
        "reconstruction": log_lik.mean().item(),
        "kl": (log_q - log_prior).mean().item(),
        "expected_log_joint": (log_lik + log_prior).mean().item(),
        "entropy": -log_q.mean().item(),
    }


class TinyVAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 4)
        self.dec = nn.Linear(2, 5)

    def model(self, x):
        pyro.module("dec", self.dec)
        with pyro.plate("batch", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("enc", self.enc)
        with pyro.plate("batch", x.shape[0]):
            h = self.enc(x)
            pyro.sample("z", dist.Normal(h[..., :2], nn.functional.softplus(h[..., 2:]) + 1e-3).to_event(1))


def discrete_model(x):
    z = pyro.sample("z", dist.Bernoulli(0.3))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(2.0 * z, 1.0), obs=x)


def discrete_guide(x):
    logit = pyro.param("logit", torch.full((), 0.2))
    pyro.sample("z", dist.Bernoulli(logits=logit))


def run_svi(loss, model, guide, args, steps, seed=0):
    """Losses, terms and final parameters of ``steps`` SVI steps from a fresh store."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if isinstance(model, TinyVAE):  # fresh modules, same initial weights
        vae = TinyVAE()
        model, guide = vae.model, vae.guide
    svi = SVI(model, guide, Adam({"lr": 0.05}), loss)
    losses, terms = [], []
    for _ in range(steps):
        losses.append(svi.step(*args))
        terms.append(getattr(loss, "last_terms", None))
    params = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    return losses, terms, params


def assert_same_run(ref, jit, model, guide, args, steps=6, seed=0):
    l0, t0, p0 = run_svi(ref, model, guide, args, steps, seed)
    l1, t1, p1 = run_svi(jit, model, guide, args, steps, seed)
    # same seed, same random draws, same arithmetic: the compiled graph runs the ops the
    # eager pass ran (inductor: fused, with the eager random ops), so losses agree to
    # float64 rounding (a few ulps of ~1e2 nats)
    assert l1 == pytest.approx(l0, rel=1e-12, abs=1e-10)
    for a, b in zip(t0, t1):
        da, db = a.as_dict(), b.as_dict()
        assert set(da) == set(db)
        for key in da:
            assert db[key] == pytest.approx(da[key], rel=1e-12, abs=1e-10), key
    for name in p0:
        assert torch.allclose(p1[name], p0[name], rtol=1e-10, atol=1e-12), name
    assert jit.num_compilations == 1
    return l1, t1


# -- identical to the uncompiled classes --------------------------------------------------


@pytest.mark.parametrize("ref_cls, jit_cls", ALL_PAIRS)
def test_same_losses_conjugate(ref_cls, jit_cls):
    losses, _ = assert_same_run(ref_cls(), jit_cls(), nn_model, nn_guide, (X,))
    # at β = 1, the losses of Pyro's own class for the same seed
    pyro_cls = Trace_ELBO if ref_cls is BetaELBO else TraceMeanField_ELBO
    expected, _, _ = run_svi(pyro_cls(), nn_model, nn_guide, (X,), steps=len(losses))
    assert losses == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("ref_cls, jit_cls", ALL_PAIRS)
@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential", "vectorised"])
def test_same_losses_particles_modules(ref_cls, jit_cls, vectorize):
    x = torch.randn(7, 5)
    kw = dict(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=1)
    _, terms = assert_same_run(ref_cls(beta=2.0, **kw), jit_cls(beta=2.0, **kw), TinyVAE(), None, (x,))
    assert terms[-1].num_particles == 3 and set(terms[-1].stderr) >= {"elbo", "kl"}


@pytest.mark.parametrize("ref_cls, jit_cls", ALL_PAIRS)
def test_beta_schedule_is_an_input(ref_cls, jit_cls):
    # a baked-in β would freeze the first step's β = 0; the sequences would part at step 2
    sched = LinearWarmup(4, start=0.0, end=3.0)
    losses, terms = assert_same_run(ref_cls(beta=sched), jit_cls(beta=sched), nn_model, nn_guide, (X,))
    assert [t.beta for t in terms] == [sched(k) for k in range(6)]


def test_score_function_site_beta_schedule():
    # non-reparameterised guide site: the downstream cost log_r carries β (losses.score_function.downstream_cost)
    sched = LinearWarmup(3, start=0.5, end=2.0)
    assert_same_run(BetaELBO(beta=sched), JitBetaELBO(beta=sched), discrete_model, discrete_guide, (X,), steps=5)
    # by hand from poutine.trace log-probabilities of the same draw: the loss
    # -(log p(x|z) + β (log p(z) - log q(z))) and its score-function gradient in the logit,
    # -log_r d log q(z) / d logit with log_r = log p(x|z) + β (log p(z) - log q(z)) and
    # d log q / d logit = z - sigmoid(logit) (Ranganath et al. 2014, with β in the cost; like
    # Pyro's Trace_ELBO, the direct term -β d log q, zero in expectation, is not included)
    pyro.clear_param_store()
    loss = JitBetaELBO(beta=sched)
    logit = None
    for step in range(5):
        beta = sched(step)
        pyro.set_rng_seed(step)
        with torch.no_grad():
            guide_trace = poutine.trace(discrete_guide).get_trace(X)
            model_trace = poutine.trace(poutine.replay(discrete_model, trace=guide_trace)).get_trace(X)
        z = guide_trace.nodes["z"]["value"]
        log_q = guide_trace.nodes["z"]["fn"].log_prob(z)
        log_r = model_trace.nodes["x"]["fn"].log_prob(X).sum() + beta * (
            model_trace.nodes["z"]["fn"].log_prob(z) - log_q
        )
        logit = pyro.param("logit").unconstrained()
        logit.grad = None
        pyro.set_rng_seed(step)
        value = loss.loss_and_grads(discrete_model, discrete_guide, X)
        assert value == pytest.approx(-log_r.item(), rel=1e-12)
        expected_grad = -log_r * (z - torch.sigmoid(logit.detach()))
        assert logit.grad.item() == pytest.approx(expected_grad.item(), rel=1e-10, abs=1e-12)
        with torch.no_grad():
            logit -= 0.05 * logit.grad  # move, so that every step sees other parameters
    assert loss.num_compilations == 1


@pytest.mark.parametrize("ref_cls, jit_cls", ALL_PAIRS)
def test_capacity_and_free_bits(ref_cls, jit_cls):
    x = torch.randn(7, 5)
    cap = LinearWarmup(3, start=0.0, end=2.0)
    _, terms = assert_same_run(
        ref_cls(capacity=cap, gamma=5.0), jit_cls(capacity=cap, gamma=5.0), TinyVAE(), None, (x,)
    )
    assert [t.capacity for t in terms] == [cap(k) for k in range(6)]
    assert_same_run(ref_cls(free_bits=0.3), jit_cls(free_bits=0.3), TinyVAE(), None, (x,))


@pytest.mark.parametrize("ref_cls, jit_cls", ALL_PAIRS)
def test_gradients_match_uncompiled(ref_cls, jit_cls):
    def calls(loss):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        out = []
        for method in ("loss_and_grads", "loss_and_grads", "differentiable_loss"):
            params = [pyro.param(n).unconstrained() for n in ("loc", "scale")] if out else None
            if params:
                for p in params:
                    p.grad = None
            value = getattr(loss, method)(nn_model, nn_guide, X)
            params = [pyro.param(n).unconstrained() for n in ("loc", "scale")]
            if method == "differentiable_loss":
                grads = torch.autograd.grad(value, params)
            else:
                grads = [p.grad.clone() for p in params]
            out.append((float(value.detach()) if torch.is_tensor(value) else value, grads))
        return out

    # the first call of the compiled loss is eager; the second and third run the trace
    for (v0, g0), (v1, g1) in zip(calls(ref_cls(beta=1.7)), calls(jit_cls(beta=1.7))):
        assert v1 == pytest.approx(v0, rel=1e-12)
        for a, b in zip(g0, g1):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


# -- exact answers ---------------------------------------------------------------------------


def test_exact_evidence_at_posterior():
    # q = p(mu | x): log p(x, mu) - log q(mu) = log p(x) for every draw, so the compiled
    # Monte Carlo loss is -log p(x) up to float64 rounding, with zero spread over particles
    mean, std = posterior(X)
    pyro.param("loc", mean.clone())
    pyro.param("scale", std.clone(), constraint=constraints.positive)
    loss = JitBetaELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    expected = -log_evidence(X).item()
    for seed in range(3):  # the eager first call, then the compiled function
        pyro.set_rng_seed(seed)
        assert loss.loss(nn_model, nn_guide, X) == pytest.approx(expected, abs=1e-9)
    assert loss.num_compilations == 1
    terms = loss.last_terms
    assert terms.elbo == pytest.approx(-expected, abs=1e-9)
    assert terms.stderr["elbo"] < 1e-9
    # each term by hand from the log-probabilities of the same draws (seed 2), which are random
    hand = hand_terms(seed=2, num_particles=5)
    for name, value in hand.items():
        assert getattr(terms, name) == pytest.approx(value, rel=1e-12, abs=1e-12), name
    # the analytic-KL loss is exact in expectation only: within 5 standard errors
    mf = JitBetaMeanFieldELBO(num_particles=4000, vectorize_particles=True, max_plate_nesting=1)
    for _ in range(2):
        value = mf.loss(nn_model, nn_guide, X)
    se = mf.last_terms.stderr["elbo"]
    assert 0 < se < 0.05 and value == pytest.approx(expected, abs=5 * se)


def test_beta_objective_and_gradient_closed_form():
    # β-objective of the Normal–Normal model with analytic KL: recon is Monte Carlo over
    # P vectorised particles, the KL exact. β follows a schedule; at each step the compiled
    # function must use that step's β (a baked β would be off by |Δβ| * KL ~ 1 nat).
    P = 20000
    m, s = 0.7, 0.6
    pyro.param("loc", torch.tensor(m))
    pyro.param("scale", torch.tensor(s), constraint=constraints.positive)
    sched = LinearWarmup(3, start=0.0, end=3.0)
    loss = JitBetaMeanFieldELBO(beta=sched, num_particles=P, vectorize_particles=True, max_plate_nesting=1)
    n = X.shape[0]
    for step in range(4):
        beta = sched(step)
        out = loss.differentiable_loss(nn_model, nn_guide, X)
        loc = pyro.param("loc").unconstrained()
        (g_loc,) = torch.autograd.grad(out, [loc])
        recon, kl, objective = expected_terms(X, m, s, beta)
        terms = loss.last_terms
        # objective: only the reconstruction is random; 5 standard errors of its MC mean
        se = terms.stderr["reconstruction"]
        assert 0 < se < 0.05
        assert terms.beta == beta
        assert terms.kl == pytest.approx(kl, abs=1e-10)
        assert -out.item() == pytest.approx(objective.item(), abs=5 * se)
        assert terms.reconstruction == pytest.approx(recon.item(), abs=5 * se)
        # d(-objective)/dm = -sum_i (x_i - m - s eps)/SIGMA^2 + beta (m - MU0)/SIGMA0^2; the
        # eps part has sd n s / SIGMA^2 / sqrt(P): tolerance 5 of those
        exact = -(X - m).sum() / SIGMA**2 + beta * (m - MU0) / SIGMA0**2
        tol = 5 * n * s / SIGMA**2 / math.sqrt(P)
        assert g_loc.item() == pytest.approx(exact.item(), abs=tol)
    assert loss.num_compilations == 1 and loss.step == 4


# -- caching, recompilation, errors -----------------------------------------------------------


def test_compiles_once_and_recompiles_on_new_shape():
    loss = JitBetaELBO()
    svi = SVI(nn_model, nn_guide, Adam({"lr": 0.01}), loss)
    for _ in range(5):
        svi.step(X)
    assert loss.num_compilations == 1
    # a smaller batch (a data plate of another size) compiles once more, then both are reused
    x_small = X[:4]
    value = loss.loss(nn_model, nn_guide, x_small)
    assert loss.num_compilations == 2
    for _ in range(3):
        svi.step(X)
        svi.step(x_small)
    assert loss.num_compilations == 2
    # the second compiled function is that of 4 data points: compare with the uncompiled loss
    pyro.set_rng_seed(11)
    a = loss.loss(nn_model, nn_guide, x_small)
    pyro.set_rng_seed(11)
    b = BetaELBO().loss(nn_model, nn_guide, x_small)
    assert a == pytest.approx(b, rel=1e-12) and math.isfinite(value)


def test_decompose_does_not_step_or_touch_last_terms():
    loss = JitBetaMeanFieldELBO(beta=2.0)
    loss.loss_and_grads(nn_model, nn_guide, X)
    last = loss.last_terms
    terms = loss.decompose(nn_model, nn_guide, X)
    assert loss.step == 1 and loss.last_terms is last
    # analytic KL against the closed form at the guide's current parameters (exact), and the
    # β-objective with the Monte Carlo reconstruction: within 5 sd of one draw (|x - mu|^2 terms)
    m, s = pyro.param("loc").item(), pyro.param("scale").item()
    recon, kl, objective = (float(v) for v in expected_terms(X, m, s, 2.0))
    assert terms.kl == pytest.approx(kl, abs=1e-10)
    recon_sd = X.shape[0] / (2 * SIGMA**2) * math.sqrt(2 * s**4 + 4 * s**2 * (m - X.mean().item()) ** 2)
    assert terms.reconstruction == pytest.approx(recon, abs=5 * recon_sd)
    assert terms.objective == pytest.approx(objective, abs=5 * recon_sd)


def test_positional_argument_must_be_a_tensor():
    def model(x, n):
        nn_model(x)

    def guide(x, n):
        nn_guide(x)

    with pytest.raises(ValueError, match=r"argument 1 is a int \(3\).*keyword"):
        JitBetaELBO().loss(model, guide, X, 3)


def test_keyword_arguments_compile_once_each():
    def model(x, scale=1.0):
        nn_model(x * scale)

    def guide(x, scale=1.0):
        nn_guide(x)

    loss = JitBetaELBO()
    for s in (1.0, 2.0, 1.0, 2.0):
        loss.loss(model, guide, X, scale=s)
    assert loss.num_compilations == 2


@pytest.mark.parametrize("ref_cls, jit_cls", PAIRS)
def test_same_losses_unoptimised_graph(ref_cls, jit_cls, monkeypatch):
    # large graphs (many unrolled particles) run as recorded instead of through the
    # optimising executor: the same losses either way
    from pyro_elbo_lab.losses.torchscript import TorchScriptStrategy

    monkeypatch.setattr(TorchScriptStrategy, "optimize_max_nodes", 0)
    jit = jit_cls(num_particles=2)
    assert_same_run(
        ref_cls(num_particles=2),
        jit,
        discrete_model if ref_cls is BetaELBO else nn_model,
        discrete_guide if ref_cls is BetaELBO else nn_guide,
        (X,),
    )
    assert not next(iter(jit._compiled.values())).info["optimize"]


class _Amortised:
    """A model/guide pair given as bound methods, the usual pattern for a VAE object."""

    def model(self, x):
        nn_model(x)

    def guide(self, x):
        nn_guide(x)


def test_bound_methods_compile_once():
    # vae.model is a new bound-method object at every access: the cache must not key on id()
    pair = _Amortised()
    loss = JitBetaELBO()
    values = [loss.loss(pair.model, pair.guide, X) for _ in range(4)]
    assert loss.num_compilations == 1 and all(math.isfinite(v) for v in values)


def test_container_keyword_arguments_are_keyed_by_content():
    # a new list with the same items reuses the compiled function; other items compile once
    # more (a stale function would keep the old shift: values are checked against Trace_ELBO)
    def model(x, shifts=()):
        nn_model(x + sum(shifts))

    def guide(x, shifts=()):
        nn_guide(x)

    loss = JitBetaELBO()
    for seed, shifts in enumerate([[0.5, 1.0], [0.5, 1.0], [2.0], [0.5, 1.0], [2.0]]):
        pyro.set_rng_seed(seed)
        value = loss.loss(model, guide, X, shifts=list(shifts))
        pyro.set_rng_seed(seed)
        assert value == pytest.approx(Trace_ELBO().loss(model, guide, X, shifts=shifts), rel=1e-12)
    assert loss.num_compilations == 2


def test_tensor_keyword_argument_is_rejected():
    def model(x, shift=None):
        nn_model(x + shift)

    def guide(x, shift=None):
        nn_guide(x)

    with pytest.raises(ValueError, match=r"keyword argument 'shift' is a tensor.*positionally"):
        JitBetaELBO().loss(model, guide, X, shift=torch.tensor(1.0))


def test_dynamic_structure_across_particles_is_an_error():
    calls = {"n": 0}

    def model(x):
        calls["n"] += 1
        nn_model(x)
        if calls["n"] % 2 == 0:
            pyro.sample("extra", dist.Normal(0.0, 1.0))

    def guide(x):
        nn_guide(x)
        if calls["n"] % 2 == 1:  # the model's next call is even: it samples "extra" too
            pyro.sample("extra", dist.Normal(0.0, 1.0))

    # the first particle lacks "extra", the second has it
    with pytest.raises(ValueError, match=r"static structure.*missing: \[\]; new: \[\('kl', 'extra'\).*Use BetaELBO"):
        JitBetaELBO(num_particles=2).loss(model, guide, X)


# -- the inductor compiler ----------------------------------------------------------------


@pytest.mark.parametrize("ref_cls, jit_cls", INDUCTOR_PAIRS)
def test_inductor_forward_graph(ref_cls, jit_cls):
    # loss() and differentiable_loss() run a forward graph (no gradients inside): the same
    # values as the uncompiled loss for the same seed, and autograd through the compiled
    # forward gives the same gradients; each compiles once
    def calls(loss):
        pyro.clear_param_store()
        pyro.set_rng_seed(5)
        values = [loss.loss(nn_model, nn_guide, X) for _ in range(3)]
        grads = []
        for _ in range(3):
            value = loss.differentiable_loss(nn_model, nn_guide, X)
            params = [pyro.param(n).unconstrained() for n in ("loc", "scale")]
            values.append(value.item())
            grads.append(torch.autograd.grad(value, params))
        return values, grads

    jit = jit_cls(beta=0.7)
    (v0, g0), (v1, g1) = calls(ref_cls(beta=0.7)), calls(jit)
    assert v1 == pytest.approx(v0, rel=1e-12)
    for a, b in zip(g0, g1):
        for x, y in zip(a, b):
            assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)
    # one recorded graph (forward), compiled for no-grad and for grad calls
    assert jit.num_compilations == 1 and jit.compile_seconds > 0


def test_inductor_compiles_training_step_once():
    loss = JitBetaELBO(compiler="inductor")
    svi = SVI(nn_model, nn_guide, Adam({"lr": 0.01}), loss)
    for _ in range(4):
        svi.step(X)
    assert loss.num_compilations == 1
    # gradients of the closed form at the current parameters, for a step whose draw is known:
    # with q = N(loc, scale) reparameterised, d(-ELBO)/d loc = -sum_i (x_i - mu)/SIGMA^2 + (mu - MU0)/SIGMA0^2
    # evaluated at the drawn mu (a single particle), checked through the compiled step
    pyro.set_rng_seed(9)
    loc, scale = pyro.param("loc").item(), pyro.param("scale").item()
    eps = torch.randn(())  # the draw the step below makes (Normal.rsample: loc + scale * eps)
    mu = loc + scale * eps.item()
    params = [pyro.param(n).unconstrained() for n in ("loc", "scale")]
    for p in params:
        p.grad = None
    pyro.set_rng_seed(9)
    loss.loss_and_grads(nn_model, nn_guide, X)
    dmu = -((X - mu) / SIGMA**2).sum().item() + (mu - MU0) / SIGMA0**2
    # d/d log(scale) of [-log p(x, mu) + log q(mu)] with mu = loc + scale*eps: the entropy term
    # of log q contributes -1 (d/dlog s of -log s), the path term dmu * scale * eps
    dlogscale = dmu * scale * eps.item() - 1.0
    assert params[0].grad.item() == pytest.approx(dmu, rel=1e-10)
    assert params[1].grad.item() == pytest.approx(dlogscale, rel=1e-10)
    assert loss.num_compilations == 1


def test_inductor_data_dependent_control_flow_is_an_error():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(MU0, SIGMA0))
        if mu > 0:  # a Python branch on a sampled value
            mu = mu * 1.0
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, SIGMA), obs=x)

    loss = JitBetaELBO(compiler="inductor")
    with pytest.raises(ValueError, match=r"read a tensor's value in Python.*compiler='torchscript'"):
        loss.loss(model, nn_guide, X)


def test_unknown_compiler_is_an_error():
    with pytest.raises(ValueError, match=r"compiler must be one of \('torchscript', 'inductor'\), got 'xla'"):
        JitBetaMeanFieldELBO(compiler="xla")


# Beta–Bernoulli: p ~ Beta(A0, B0), x_i ~ Bernoulli(p); a Beta guide is reparameterised
# through the Gamma sampler, whose own derivative is not differentiable again
A0, B0 = 2.0, 3.0
FLIPS = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])


def beta_bernoulli_model(x):
    p = pyro.sample("p", dist.Beta(A0, B0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Bernoulli(p), obs=x)


def beta_bernoulli_guide(x):
    a = pyro.param("a", torch.full((), 1.0), constraint=constraints.positive)
    b = pyro.param("b", torch.full((), 1.0), constraint=constraints.positive)
    pyro.sample("p", dist.Beta(a, b))


@pytest.mark.parametrize("ref_cls, jit_cls", INDUCTOR_PAIRS)
def test_inductor_beta_guide(ref_cls, jit_cls):
    # the gradient graph is run without grad mode: compiling the backward of the gradients
    # would need the derivative of _standard_gamma_grad, which torch does not have
    assert_same_run(ref_cls(), jit_cls(), beta_bernoulli_model, beta_bernoulli_guide, (FLIPS,))
    if ref_cls is not BetaELBO:
        return  # the analytic KL of the mean-field class is exact only in expectation
    # at the exact posterior Beta(A0 + heads, B0 + tails), log p(x, p) - log q(p) = log p(x)
    # for every draw: the compiled Monte Carlo loss is -log p(x) to float64 rounding
    heads = FLIPS.sum().item()
    tails = FLIPS.shape[0] - heads
    log_evidence = (
        torch.lgamma(torch.tensor(A0 + heads))
        + torch.lgamma(torch.tensor(B0 + tails))
        - torch.lgamma(torch.tensor(A0 + B0 + FLIPS.shape[0]))
        - torch.lgamma(torch.tensor(A0))
        - torch.lgamma(torch.tensor(B0))
        + torch.lgamma(torch.tensor(A0 + B0))
    ).item()
    pyro.get_param_store()["a"] = torch.tensor(A0 + heads)
    pyro.get_param_store()["b"] = torch.tensor(B0 + tails)
    loss = jit_cls()
    values = [loss.loss_and_grads(beta_bernoulli_model, beta_bernoulli_guide, FLIPS) for _ in range(3)]
    assert values == pytest.approx([-log_evidence] * 3, abs=1e-10)


def test_inductor_gradients_accumulate_like_backward():
    # loc = a + b: both parameters get the same gradient, which the compiled graph may return
    # as one tensor; .grad must still accumulate per parameter across calls without zeroing
    def guide(x):
        a = pyro.param("a", torch.full((), 0.1))
        b = pyro.param("b", torch.full((), 0.2))
        pyro.sample("mu", dist.Normal(a + b, 1.0))

    def grads(loss):
        pyro.clear_param_store()
        pyro.set_rng_seed(2)
        for _ in range(3):
            loss.loss_and_grads(nn_model, guide, X)
        return [pyro.param(n).unconstrained().grad.clone() for n in ("a", "b")]

    expected, got = grads(BetaELBO()), grads(JitBetaELBO(compiler="inductor"))
    for e, g in zip(expected, got):
        assert torch.allclose(g, e, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got[0], got[1])


def test_inductor_tensor_outside_param_store_is_an_error():
    net = nn.Linear(1, 1)  # not registered with pyro.module: its weights are not Pyro parameters

    def guide(x):
        loc = pyro.param("loc", torch.full((), 0.0))
        pyro.sample("mu", dist.Normal(loc + net(torch.ones(1)).squeeze(), 1.0))

    loss = JitBetaELBO(compiler="inductor")
    # raised when the first call records the graph (after its eager evaluation)
    with pytest.raises(ValueError, match=r"tensor of shape \(1, 1\) that requires grad.*pyro\.module"):
        loss.loss_and_grads(nn_model, guide, X)


# -- tracer warnings (issue 11 §6) ----------------------------------------------------------


def branching_model(x):
    # a Python bool of an input tensor: torch.jit.trace warns that the branch is frozen
    mu = pyro.sample("mu", dist.Normal(MU0, SIGMA0))
    scale = SIGMA if bool(x.sum() > 0) else 2 * SIGMA
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, scale), obs=x)


def test_ignore_jit_warnings_silences_tracer_warnings():
    # filterwarnings = error: a TracerWarning that got through would fail this test; the
    # losses are Pyro's Trace_ELBO's for the same seeds (β = 1)
    loss = JitBetaELBO(ignore_jit_warnings=True)
    for seed in range(3):  # the eager call, the tracing, then the compiled function
        pyro.set_rng_seed(seed)
        value = loss.loss(branching_model, nn_guide, X)
        pyro.set_rng_seed(seed)
        assert value == pytest.approx(Trace_ELBO().loss(branching_model, nn_guide, X), rel=1e-12)
    assert loss.num_compilations == 1


def test_tracer_warnings_are_shown_by_default():
    # recorded by hand: pytest.warns would re-raise Pyro's own (filtered) tracer warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        JitBetaELBO().loss(branching_model, nn_guide, X)
    ours = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning) and w.filename == __file__]
    assert len(ours) == 1 and "Python boolean" in str(ours[0].message)


# -- several loss_and_grads calls per optimiser step (L-BFGS) ---------------------------------

LBFGS_PARTICLES = 16
LBFGS_SEEDS = (3, 4)  # two loss_and_grads calls per closure, gradients accumulated


def lbfgs_fit(loss):
    """
    ``torch.optim.LBFGS`` over the parameter store; each closure evaluation calls
    ``loss_and_grads`` once per seed of LBFGS_SEEDS (fixed draws: a deterministic sample
    average objective) and records the loss and accumulated gradients after every call.
    """
    pyro.clear_param_store()
    nn_guide(X)  # create the parameters
    params = [pyro.param(n).unconstrained() for n in ("loc", "scale")]
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=60, tolerance_grad=1e-11, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )
    calls = []

    def closure():
        optimizer.zero_grad()
        total = 0.0
        for seed in LBFGS_SEEDS:
            pyro.set_rng_seed(seed)
            total += loss.loss_and_grads(nn_model, nn_guide, X)
            calls.append((total, [p.grad.clone() for p in params]))
        return torch.tensor(total)

    optimizer.step(closure)
    return calls, pyro.param("loc").item(), pyro.param("scale").item()


def lbfgs_optimum():
    """
    The maximiser of the sample-average ELBO over the fixed draws. With mu_j = m + s eps_j,
    log p(x, mu) = -(mu - m_post)^2 / (2 s_post^2) + const and log q(mu_j) = -eps_j^2/2 - log s
    + const, so the objective is -mean_j (m + s eps_j - m_post)^2 / (2 s_post^2) + log s:
    m = m_post - s mean(eps), s = s_post / sd(eps) (sd with divisor J). The draws eps_j are read
    from ``poutine.trace`` of the guide under the same seeds.
    """
    eps = []
    for seed in LBFGS_SEEDS:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        with torch.no_grad(), pyro.plate("particles", LBFGS_PARTICLES, dim=-2):
            site = poutine.trace(nn_guide).get_trace(X).nodes["mu"]
        eps.append(((site["value"] - site["fn"].loc) / site["fn"].scale).reshape(-1))
    eps = torch.cat(eps)
    m_post, s_post = posterior(X)
    s = s_post / eps.std(unbiased=False)
    return (m_post - s * eps.mean()).item(), s.item()


@pytest.mark.parametrize("compiler", ["torchscript", "inductor"])
def test_lbfgs_closure_several_calls_per_step(compiler):
    kw = dict(num_particles=LBFGS_PARTICLES, vectorize_particles=True, max_plate_nesting=1)
    jit = JitBetaELBO(compiler=compiler, **kw)
    calls, loc, scale = lbfgs_fit(jit)
    # after every call, the loss and accumulated gradients of Pyro's Trace_ELBO (β = 1) and
    # of the uncompiled loss for the same seeds (and so the same optimisation path)
    for ref in (Trace_ELBO(**kw), BetaELBO(**kw)):
        expected, _, _ = lbfgs_fit(ref)
        assert len(calls) == len(expected) > 2 * len(LBFGS_SEEDS)
        for (v0, g0), (v1, g1) in zip(expected, calls):
            assert v1 == pytest.approx(v0, rel=1e-10)
            for a, b in zip(g0, g1):
                assert torch.allclose(b, a, rtol=1e-8, atol=1e-10)
    # the optimum reached is the closed-form maximiser of the sample-average ELBO
    m, s = lbfgs_optimum()
    assert loc == pytest.approx(m, abs=1e-7)
    assert scale == pytest.approx(s, abs=1e-7)
    assert jit.num_compilations == 1


# -- a change of default dtype -----------------------------------------------------------------


def constant_data_model():
    # no positional argument: the data are made in the model, in the default dtype, and
    # frozen into the compiled function as a constant of that dtype
    x = torch.arange(6).to(torch.get_default_dtype()) * 0.37 - 0.4
    nn_model(x)


def constant_data_guide():
    nn_guide(None)


def dtype_calls(loss, dtype, state):
    """
    Three ``differentiable_loss`` calls under default ``dtype``, from the parameter values
    ``state`` (none: fresh parameters, made in that dtype): each loss and its gradients.
    """
    torch.set_default_dtype(dtype)
    pyro.clear_param_store()
    for name, value in state.items():
        pyro.get_param_store()[name] = value.clone()
    pyro.set_rng_seed(7)
    out = []
    for _ in range(3):
        value = loss.differentiable_loss(constant_data_model, constant_data_guide)
        out.append((value, torch.autograd.grad(value, [pyro.param(n).unconstrained() for n in ("loc", "scale")])))
    return out


@pytest.mark.parametrize(
    "compiler, phases",
    [
        # float32; float64 with the float32 parameters kept (only the default dtype changed:
        # the key must see it); float64 with fresh float64 parameters; float32 again (the
        # first graph, reused)
        ("torchscript", [(torch.float32, True), (torch.float64, False), (torch.float64, True), (torch.float32, True)]),
        ("inductor", [(torch.float32, True), (torch.float64, True), (torch.float32, True)]),
    ],
    ids=["torchscript", "inductor"],
)
def test_default_dtype_change(compiler, phases):
    loss = JitBetaELBO(compiler=compiler)
    try:
        for dtype, fresh in phases:
            state = {} if fresh else {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
            expected = dtype_calls(Trace_ELBO(), dtype, state)  # Pyro's own loss, same seed, β = 1
            got = dtype_calls(loss, dtype, state)
            # float32 anywhere (parameters or data) rounds at 1e-7; a stale float32 graph
            # would be off by that in float64 and return a float32 loss
            rel = 1e-12 if pyro.param("loc").dtype == dtype == torch.float64 else 1e-5
            for (v0, g0), (v1, g1) in zip(expected, got):
                assert v1.dtype == v0.dtype
                assert v1.item() == pytest.approx(v0.item(), rel=rel)
                for a, b in zip(g0, g1):
                    assert b.dtype == a.dtype
                    assert torch.allclose(b, a, rtol=rel, atol=rel)
        assert loss.num_compilations == len(phases) - 1
    finally:
        torch.set_default_dtype(torch.float64)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_used_compiled_loss_copies_and_pickles(how):
    # SVIRunner(num_chains > 1) deep-copies the loss: a loss that has compiled (TorchScript
    # functions cannot be pickled) must copy, and the copy recompiles at its next call
    kw = dict(beta=2.0, num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    loss = JitBetaELBO(**kw)
    svi = SVI(nn_model, nn_guide, Adam({"lr": 0.05}), loss)
    for _ in range(2):  # the eager first call, then the compiled function
        svi.step(X)
    assert loss.num_compilations == 1
    copied = copy.deepcopy(loss) if how == "deepcopy" else pickle.loads(pickle.dumps(loss))
    for seed in (5, 6):  # the copy's first call compiles again, the second runs it
        # the β-objective by hand from poutine.trace log-probabilities of the same draws
        hand = hand_terms(seed=seed, num_particles=4)
        expected = -(hand["reconstruction"] - 2.0 * hand["kl"])
        pyro.set_rng_seed(seed)
        assert copied.loss(nn_model, nn_guide, X) == pytest.approx(expected, rel=1e-12, abs=1e-12)
        pyro.set_rng_seed(seed)
        assert JitBetaELBO(**kw).loss(nn_model, nn_guide, X) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert copied.num_compilations == 2
    hand = hand_terms(seed=5, num_particles=4)
    pyro.set_rng_seed(5)  # the original keeps its compiled function
    assert loss.loss(nn_model, nn_guide, X) == pytest.approx(-(hand["reconstruction"] - 2.0 * hand["kl"]), rel=1e-12)
    assert loss.num_compilations == 1


def test_compiled_enum_refusal_names_both_fixes():
    """A β schedule that equals 1 but is not the constant 1: the message names sites= and a constant beta=1.0."""
    from pyro_elbo_lab.losses.compiled_enum import JitBetaTraceEnumELBO

    def model(data):
        with pyro.plate("data", data.shape[0]):
            c = pyro.sample("c", dist.Categorical(torch.tensor([0.3, 0.7])), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(torch.tensor([-1.0, 2.0])[c], 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data)

    def guide(data):
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(data, 1.0))

    loss = JitBetaTraceEnumELBO(lambda step: 1.0, max_plate_nesting=1)
    with pytest.raises(NotImplementedError, match=r"'z'.*Pass sites= naming .*constant beta=1\.0.*not a schedule"):
        loss.loss(model, guide, X)
