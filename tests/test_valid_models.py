# SPDX-License-Identifier: Apache-2.0
"""
Pyro-style valid-model checks for the loss family (after ``tests/infer/test_valid_models.py``
in pyro-ppl/pyro): every model runs an SVI step, and ``loss``, ``loss_and_grads`` and
``differentiable_loss`` agree for the same seed; with β = 1 and neither free bits nor
capacity, loss and gradients equal those of Pyro's own ``Trace_ELBO`` /
``TraceMeanField_ELBO`` for the same seed; invalid input raises a ``ValueError`` that names
the argument or site.
"""
from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.optim import Adam

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO
from pyro_elbo_lab.schedules import Cyclical, LinearWarmup, Sigmoid, Tempering

LOSSES = [
    pytest.param(BetaELBO, Trace_ELBO, id="BetaELBO"),
    pytest.param(BetaMeanFieldELBO, TraceMeanField_ELBO, id="BetaMeanFieldELBO"),
]
PARTICLES = [
    pytest.param(dict(num_particles=1), id="1particle"),
    pytest.param(dict(num_particles=3), id="3particles-sequential"),
    pytest.param(dict(num_particles=3, vectorize_particles=True), id="3particles-vectorized"),
]
# Same traces, same floating-point operations up to the order of summation: agreement to
# a few ulps of the loss' magnitude.
RTOL, ATOL = 1e-9, 1e-9


# ---------------------------------------------------------------------------------------
# models and guides (each returns (model, guide, args); guides hold pyro.params)
# ---------------------------------------------------------------------------------------


def _data(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) + 0.5


def global_local():
    """A global latent, a plate of local latents, observations in the plate."""
    data = _data()

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=data)

    def guide(data):
        m = pyro.param("m", torch.tensor(0.1))
        s = pyro.param("s", torch.tensor(0.7), constraint=constraints.positive)
        pyro.sample("mu", dist.Normal(m, s))
        loc = pyro.param("loc", torch.zeros(len(data)))
        scale = pyro.param("scale", torch.ones(len(data)), constraint=constraints.positive)
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.Normal(loc, scale))

    return model, guide, (data,)


def subsample():
    """A subsampled data plate: local latents and data scaled by N / batch size."""
    data = _data(10)

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(data), subsample_size=4) as idx:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=data[idx])

    def guide(data):
        m = pyro.param("m", torch.tensor(0.1))
        s = pyro.param("s", torch.tensor(0.7), constraint=constraints.positive)
        pyro.sample("mu", dist.Normal(m, s))
        loc = pyro.param("loc", torch.zeros(len(data)))
        with pyro.plate("data", len(data), subsample_size=4) as idx:
            pyro.sample("z", dist.Normal(loc[idx], 0.8))

    return model, guide, (data,)


def nested_plates():
    """Two nested plates with latent vectors (``.to_event``) in the inner one."""
    data = torch.randn(3, 4, 2)

    def model(data):
        with pyro.plate("outer", 4, dim=-1):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            with pyro.plate("inner", 3, dim=-2):
                z = pyro.sample("z", dist.Normal(w.unsqueeze(-1), torch.ones(2)).to_event(1))
                pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=data)

    def guide(data):
        wl = pyro.param("wl", torch.zeros(4))
        zl = pyro.param("zl", torch.zeros(3, 4, 2))
        zs = pyro.param("zs", torch.ones(3, 4, 2), constraint=constraints.positive)
        with pyro.plate("outer", 4, dim=-1):
            pyro.sample("w", dist.Normal(wl, 0.9))
            with pyro.plate("inner", 3, dim=-2):
                pyro.sample("z", dist.Normal(zl, zs).to_event(1))

    return model, guide, (data,)


def poutine_mask():
    """``poutine.mask`` on observations and on a latent site (masked in model and guide)."""
    data = _data()
    mask = torch.tensor([True, False, True, True, False, True])

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(data)):
            with poutine.mask(mask=mask):
                z = pyro.sample("z", dist.Normal(mu, 1.0))
            with poutine.mask(mask=~mask):
                pyro.sample("x", dist.Normal(mu, 1.0), obs=data)
            with poutine.mask(mask=mask):
                pyro.sample("y", dist.Normal(z, 0.5), obs=data)

    def guide(data):
        m = pyro.param("m", torch.tensor(0.1))
        pyro.sample("mu", dist.Normal(m, 0.6))
        loc = pyro.param("loc", torch.zeros(len(data)))
        with pyro.plate("data", len(data)):
            with poutine.mask(mask=mask):
                pyro.sample("z", dist.Normal(loc, 0.8))

    return model, guide, (data,)


def distribution_mask():
    """``Distribution.mask(...)`` on observations and latents."""
    data = _data()
    mask = torch.tensor([True, True, False, True, False, True])

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Normal(mu, 1.0).mask(mask))
            pyro.sample("x", dist.Normal(z, 0.5).mask(mask), obs=data)

    def guide(data):
        m = pyro.param("m", torch.tensor(0.1))
        pyro.sample("mu", dist.Normal(m, 0.6))
        loc = pyro.param("loc", torch.zeros(len(data)))
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.Normal(loc, 0.8).mask(mask))

    return model, guide, (data,)


def several_observed():
    """Three observed sites of different families sharing a latent, one of them global."""
    data = _data()
    counts = torch.tensor([0.0, 2.0, 1.0, 4.0, 0.0, 3.0])

    def model(data, counts):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        pyro.sample("prior_obs", dist.Normal(mu, 3.0), obs=torch.tensor(0.2))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(mu, sigma), obs=data)
            pyro.sample("n", dist.Poisson(mu.exp()), obs=counts)

    def guide(data, counts):
        m = pyro.param("m", torch.tensor(0.1))
        pyro.sample("mu", dist.Normal(m, 0.6))
        a = pyro.param("a", torch.tensor(0.0))
        pyro.sample("sigma", dist.LogNormal(a, 0.5))

    return model, guide, (data, counts)


def auxiliary():
    """A guide with an auxiliary site (``infer={"is_auxiliary": True}``) absent from the model."""
    data = _data()

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=data)

    def guide(data):
        m = pyro.param("m", torch.tensor(0.1))
        u = pyro.sample("u", dist.Normal(m, 1.0), infer={"is_auxiliary": True})
        pyro.sample("mu", dist.Normal(u, 0.5))

    return model, guide, (data,)


def _constrained_model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(mu, sigma), obs=data)


def auto_normal():
    """AutoNormal on a model with a constrained latent."""
    return _constrained_model, AutoNormal(_constrained_model), (_data(),)


def auto_diagonal_normal():
    """AutoDiagonalNormal (an auxiliary latent and Delta sites with log-Jacobians)."""
    return _constrained_model, AutoDiagonalNormal(_constrained_model), (_data(),)


class _Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 4)

    def forward(self, x):
        out = self.net(x)
        return out[..., :2], torch.nn.functional.softplus(out[..., 2:]) + 1e-3


def amortised():
    """A small VAE: ``nn.Module`` encoder in the guide, ``nn.Module`` decoder in the model."""
    data = torch.randn(5, 2)
    encoder = _Encoder()
    decoder = torch.nn.Linear(2, 2)

    def model(data):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 0.5).to_event(1), obs=data)

    def guide(data):
        pyro.module("encoder", encoder)
        loc, scale = encoder(data)
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide, (data,)


def observed_only():
    """No latent sites at all: maximum likelihood through an SVI loss."""
    data = _data()

    def model(data):
        w = pyro.param("w", torch.tensor(0.3))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(w, 1.0), obs=data)

    def guide(data):
        pass

    return model, guide, (data,)


def score_function():
    """A Bernoulli latent (score-function gradient) upstream of a reparameterised one."""
    data = _data()

    def model(data):
        b = pyro.sample("b", dist.Bernoulli(0.3))
        with pyro.plate("data", len(data)):
            z = pyro.sample("z", dist.Normal(2.0 * b - 1.0, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=data)

    def guide(data):
        p = pyro.param("p", torch.tensor(0.6), constraint=constraints.unit_interval)
        pyro.sample("b", dist.Bernoulli(p))
        loc = pyro.param("loc", torch.zeros(len(data)))
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.Normal(loc, 0.8))

    return model, guide, (data,)


MODELS = [
    global_local,
    subsample,
    nested_plates,
    poutine_mask,
    distribution_mask,
    several_observed,
    auxiliary,
    auto_normal,
    auto_diagonal_normal,
    amortised,
    observed_only,
]
MODEL_IDS = [m.__name__ for m in MODELS]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _params():
    store = pyro.get_param_store()
    return {name: store.get_param(name).unconstrained() for name in sorted(store.keys())}


def _loss_and_grads(loss_fn, model, guide, args, seed=7):
    """``loss_and_grads`` at a fixed seed: the loss and a {param: grad} dict."""
    pyro.set_rng_seed(seed)
    for p in _params().values():
        p.grad = None
    value = loss_fn.loss_and_grads(model, guide, *args)
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in _params().items()}
    for p in _params().values():
        p.grad = None
    return value, grads


def _assert_close_grads(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(actual[name], expected[name], rtol=RTOL, atol=ATOL), name


def assert_ok(loss_fn, model, guide, args):
    """An SVI step, then loss, loss_and_grads, differentiable_loss agree for the same seed."""
    svi = SVI(model, guide, Adam({"lr": 1e-3}), loss_fn)
    step_loss = svi.step(*args)
    assert math.isfinite(step_loss)
    assert loss_fn.last_terms is not None
    assert loss_fn.last_terms.loss == pytest.approx(step_loss, rel=RTOL, abs=ATOL)

    # loss_and_grads and differentiable_loss count a step (schedules advance): rewind
    state = loss_fn.state_dict()
    pyro.set_rng_seed(11)
    value = loss_fn.loss(model, guide, *args)
    assert loss_fn.state_dict() == state
    value_and_grads, grads = _loss_and_grads(loss_fn, model, guide, args, seed=11)
    assert loss_fn.step == state["step"] + 1
    loss_fn.load_state_dict(state)
    pyro.set_rng_seed(11)
    diff = loss_fn.differentiable_loss(model, guide, *args)
    assert value == pytest.approx(value_and_grads, rel=RTOL, abs=ATOL)
    assert diff.item() == pytest.approx(value, rel=RTOL, abs=ATOL)
    params = _params()
    if diff.requires_grad:
        autograd = torch.autograd.grad(diff, list(params.values()), allow_unused=True)
        autograd = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), autograd)}
        _assert_close_grads(autograd, grads)


def assert_error(loss_fn, model, guide, args, match):
    with pytest.raises(ValueError, match=match):
        loss_fn.loss(model, guide, *args)


# ---------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("particles", PARTICLES)
@pytest.mark.parametrize("make", MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("Loss, Reference", LOSSES)
def test_beta_one_equals_pyro(Loss, Reference, make, particles):
    model, guide, args = make()
    pyro.set_rng_seed(3)  # initialise params (AutoGuides, modules) the same way for both
    Reference(**particles).loss(model, guide, *args)
    expected, expected_grads = _loss_and_grads(Reference(**particles), model, guide, args)
    actual, actual_grads = _loss_and_grads(Loss(**particles), model, guide, args)
    assert actual == pytest.approx(expected, rel=RTOL, abs=ATOL)
    _assert_close_grads(actual_grads, expected_grads)
    # Pyro's Trace_ELBO.loss bypasses _differentiable_loss_particle: ours must not disagree
    pyro.set_rng_seed(5)
    expected = Reference(**particles).loss(model, guide, *args)
    pyro.set_rng_seed(5)
    assert Loss(**particles).loss(model, guide, *args) == pytest.approx(expected, rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("particles", PARTICLES)
def test_beta_one_equals_pyro_score_function(particles):
    model, guide, args = score_function()
    pyro.set_rng_seed(3)
    Trace_ELBO(**particles).loss(model, guide, *args)
    expected, expected_grads = _loss_and_grads(Trace_ELBO(**particles), model, guide, args)
    actual, actual_grads = _loss_and_grads(BetaELBO(**particles), model, guide, args)
    assert actual == pytest.approx(expected, rel=RTOL, abs=ATOL)
    _assert_close_grads(actual_grads, expected_grads)


OPTIONS = [
    pytest.param(dict(beta=1.0), id="beta1"),
    pytest.param(dict(beta=4.0), id="beta4"),
    pytest.param(dict(beta=LinearWarmup(10)), id="beta-warmup"),
    pytest.param(dict(free_bits=0.5), id="free-bits"),
    pytest.param(dict(capacity=LinearWarmup(10, 0.0, 2.0), gamma=10.0), id="capacity"),
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("particles", PARTICLES)
@pytest.mark.parametrize("make", MODELS, ids=MODEL_IDS)
@pytest.mark.parametrize("Loss", [p.values[0] for p in LOSSES], ids=["BetaELBO", "BetaMeanFieldELBO"])
def test_valid_models(Loss, make, particles, options):
    model, guide, args = make()
    assert_ok(Loss(**particles, **options), model, guide, args)


@pytest.mark.parametrize("options", [pytest.param(dict(beta=4.0), id="beta4"), pytest.param({}, id="beta1")])
@pytest.mark.parametrize("particles", PARTICLES)
def test_valid_score_function(particles, options):
    model, guide, args = score_function()
    assert_ok(BetaELBO(**particles, **options), model, guide, args)


@pytest.mark.parametrize("options", [dict(free_bits=0.5), dict(capacity=1.0)], ids=["free-bits", "capacity"])
def test_valid_score_function_unselected(options):
    # free bits / capacity on the reparameterised site only; the Bernoulli site keeps β = 1
    model, guide, args = score_function()
    assert_ok(BetaELBO(sites=["z"], **options), model, guide, args)


def test_max_plate_nesting_explicit_with_vectorized_particles():
    model, guide, args = nested_plates()
    pyro.set_rng_seed(3)
    expected = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=2)
    expected, expected_grads = _loss_and_grads(expected, model, guide, args)
    for nesting in (2, 3):  # exact and generous bounds
        loss_fn = BetaELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=nesting)
        actual, actual_grads = _loss_and_grads(loss_fn, model, guide, args)
        assert actual == pytest.approx(expected, rel=RTOL, abs=ATOL)
        _assert_close_grads(actual_grads, expected_grads)
        assert loss_fn.last_terms.num_particles == 4
        assert loss_fn.last_terms.elbo == pytest.approx(-actual, rel=RTOL, abs=ATOL)


# ---------------------------------------------------------------------------------------
# invalid input
# ---------------------------------------------------------------------------------------

ALL_LOSSES = pytest.mark.parametrize("Loss", [BetaELBO, BetaMeanFieldELBO], ids=["BetaELBO", "BetaMeanFieldELBO"])


@ALL_LOSSES
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(beta=-1.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(beta=float("inf")), "beta"),
        (dict(beta=torch.tensor(-0.5)), "beta"),
        (dict(beta="4"), "beta"),
        (dict(free_bits=-0.1), "free_bits"),
        (dict(free_bits=float("nan")), "free_bits"),
        (dict(gamma=-1.0), "gamma"),
        (dict(capacity=-1.0), "capacity"),
        (dict(capacity=float("nan")), "capacity"),
        (dict(capacity=1.0, free_bits=0.5), "free_bits and capacity"),
        (dict(capacity=1.0, beta=2.0), "capacity replaces"),
        (dict(sites=[]), "sites"),
        (dict(sites=[3]), "sites"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_invalid_construction(Loss, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Loss(**kwargs)


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (lambda: LinearWarmup(0), {}, "num_steps"),
        (lambda: LinearWarmup(-5), {}, "num_steps"),
        (lambda: Cyclical(0), {}, "num_steps"),
        (lambda: Cyclical(100, num_cycles=0), {}, "num_cycles"),
        (lambda: Sigmoid(0), {}, "num_steps"),
        (lambda: Tempering(0), {}, "num_steps"),
    ],
    ids=["warmup-0", "warmup-neg", "cyclical-0", "cyclical-0-cycles", "sigmoid-0", "tempering-0"],
)
def test_invalid_schedule_length(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        BetaELBO(beta=make(), **kwargs)


@ALL_LOSSES
def test_sites_missing_raises_at_first_call(Loss):
    model, guide, args = global_local()
    loss_fn = Loss(beta=2.0, sites=["zz"])  # construction cannot know the model
    assert_error(loss_fn, model, guide, args, match=r"'zz'.*Latent sites: \['mu', 'z'\]")


@ALL_LOSSES
def test_sites_observed_raises(Loss):
    model, guide, args = global_local()
    assert_error(Loss(beta=2.0, sites=["x"]), model, guide, args, match="'x', an observed site")


@ALL_LOSSES
def test_sites_error_on_every_entry_point(Loss):
    model, guide, args = global_local()
    for method in ("loss_and_grads", "differentiable_loss"):
        with pytest.raises(ValueError, match="'zz'"):
            getattr(Loss(sites="zz"), method)(model, guide, *args)


@pytest.mark.parametrize("options", [dict(free_bits=0.5), dict(capacity=1.0)], ids=["free-bits", "capacity"])
def test_nonlinear_objective_on_score_function_site_raises(options):
    model, guide, args = score_function()
    with pytest.raises(NotImplementedError, match="guide site 'b'.*reparameteris"):
        BetaELBO(**options).loss(model, guide, *args)


def test_mean_field_rejects_score_function_site():
    model, guide, args = score_function()
    with pytest.raises(NotImplementedError):
        BetaMeanFieldELBO().loss(model, guide, *args)


@pytest.mark.parametrize(
    "schedule",
    [lambda step: -1.0, lambda step: float("nan"), LinearWarmup(10, start=1.0, end=-1.0)],
    ids=["negative-at-0", "nan-at-0", "negative-end"],
)
def test_bad_schedule_raises_at_construction(schedule):
    with pytest.raises(ValueError, match="beta schedule"):
        BetaELBO(beta=schedule)


def test_bad_schedule_value_raises_at_call():
    model, guide, args = global_local()
    loss_fn = BetaELBO(beta=lambda step: 1.0 - step)  # fine at step 0, negative from step 2
    loss_fn.loss_and_grads(model, guide, *args)
    loss_fn.loss_and_grads(model, guide, *args)
    with pytest.raises(ValueError, match="beta schedule .* returned -1.0 at step 2"):
        loss_fn.loss(model, guide, *args)


@pytest.mark.parametrize("state", [{}, {"step": -1}, {"step": 1.5}, None], ids=["empty", "negative", "float", "none"])
def test_bad_state_dict(state):
    with pytest.raises(ValueError, match="step"):
        BetaELBO().load_state_dict(state)
