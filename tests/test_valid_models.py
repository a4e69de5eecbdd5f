# SPDX-License-Identifier: Apache-2.0
"""
Pyro-style valid-model checks for the loss family (after ``tests/infer/test_valid_models.py``
in pyro-ppl/pyro), on every model and guide kind of the matrix below (hand-written guides,
``AutoNormal``, ``AutoDiagonalNormal``, ``AutoMultivariateNormal``, ``AutoDelta``, an
amortised ``nn.Module`` guide):

- with β = 1 and neither free bits nor capacity, loss and gradients equal those of Pyro's own
  ``Trace_ELBO`` / ``TraceMeanField_ELBO`` for the same seed;
- for β = 1 and β ≠ 1, a β warm-up, ``sites=`` subsets, free bits and capacity, the value of
  ``loss``, ``loss_and_grads`` and ``differentiable_loss``, their gradients and ``last_terms``
  equal the documented objective and decomposition written out in this file from
  ``poutine.trace`` log-probabilities of the traces drawn at the same seed (no library code);
- invalid input raises a ``ValueError`` that names the argument or site.
"""

from __future__ import annotations

import functools
import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoGuideList, AutoMultivariateNormal, AutoNormal
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to

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


def _auxiliary(infer):
    data = _data()

    def model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=data)

    def guide(data):
        m = pyro.param("m", torch.tensor(0.1))
        u = pyro.sample("u", dist.Normal(m, 1.0), infer=infer)
        pyro.sample("mu", dist.Normal(u, 0.5))

    return model, guide, (data,)


def auxiliary():
    """A guide with an auxiliary site absent from the model, marked as standing for ``mu``."""
    return _auxiliary({"is_auxiliary": True, "auxiliary_for": "mu"})


def auxiliary_unmarked():
    """The same guide without ``auxiliary_for``: which model site ``u`` stands for is not known."""
    return _auxiliary({"is_auxiliary": True})


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


def auto_multivariate_normal():
    """AutoMultivariateNormal: one joint auxiliary latent (full covariance) for all sites."""
    return _constrained_model, AutoMultivariateNormal(_constrained_model), (_data(),)


def auto_delta():
    """AutoDelta: point masses (MAP), no auxiliary site, log q = 0."""
    return _constrained_model, AutoDelta(_constrained_model), (_data(),)


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
    auxiliary_unmarked,
    auto_normal,
    auto_diagonal_normal,
    auto_multivariate_normal,
    auto_delta,
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


def assert_error(loss_fn, model, guide, args, match):
    with pytest.raises(ValueError, match=match):
        loss_fn.loss(model, guide, *args)


# ---------------------------------------------------------------------------------------
# the documented objective, by hand from poutine.trace log-probabilities (no library code)
# ---------------------------------------------------------------------------------------
#
# For latent model sites s with Monte Carlo KL_s = log q_s(z_s) - log p_s(z_s) (BetaELBO) or
# the registered torch.distributions.kl_divergence (BetaMeanFieldELBO, Monte Carlo where
# none is registered), scaled and masked like the site:
#   β:          E log p(x|z) - Σ_{s∉S} KL_s - β Σ_{s∈S} KL_s
#   free bits:  E log p(x|z) - Σ_{s∉S} KL_s - β Σ_{s∈S} Σ_j max(N_s λ, Σ_i KL_sij)
#   capacity:   E log p(x|z) - Σ_{s∉S} KL_s - γ |Σ_{s∈S} KL_s - N C|,  N = max_{s∈S} N_s
# N_s: the scaled count of the site's unmasked batch elements; j: the event dimensions of an
# Independent site, one per batch element otherwise. The log q of an auxiliary guide site
# belongs to the model site(s) it stands for (AutoNormal's "<s>_unconstrained"; the slice of
# AutoDiagonalNormal's latent; hand-written: the case says, or the site is an entry of its own
# when it does not say); AutoMultivariateNormal's joint log q cannot be split per site, so it
# only enters with S = all sites and is one per-site entry (named after the joint latent site)
# for all the model sites it covers.
# Gradients: pathwise through the replayed traces; for a non-reparameterised guide site the
# score-function term log q(b) · (objective of the particle), Pyro's estimator for a global
# site.

JOINT = "<joint>"


def _draw(model, guide, args, num_particles, vectorize, max_plate_nesting):
    """[(model_trace, guide_trace)] drawn as Pyro's ELBO draws them (guide, then the model replayed)."""

    def one(model, guide):
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
        guide_trace.compute_log_prob()
        model_trace.compute_log_prob()
        return model_trace, guide_trace

    if vectorize and num_particles > 1:

        def wrap(fn):
            def wrapped(*args):
                with pyro.plate("num_particles_vectorized", num_particles, dim=-(max_plate_nesting + 1)):
                    return fn(*args)

            return wrapped

        return [one(wrap(model), wrap(guide))]
    return [one(model, guide) for _ in range(num_particles)]


class _Reducer:
    """Sums a site tensor (batch_shape + event_ndim trailing dims) to one value per particle: shape (P,)."""

    def __init__(self, num_particles, vectorize, max_plate_nesting):
        self.vectorized = vectorize and num_particles > 1
        self.particle_dim = max_plate_nesting + 1

    def __call__(self, x, event_ndim=0):
        batch = x.dim() - event_ndim
        if not self.vectorized:
            return x.reshape((1, -1) + x.shape[batch:]).sum(1)
        axis = batch - self.particle_dim
        assert axis >= 0, x.shape
        x = x.movedim(axis, 0)
        return x.reshape((x.shape[0], -1) + x.shape[batch:]).sum(1)


def _scale_mask(x, site, event_ndim=0):
    scale, mask = site["scale"], site["mask"]
    if torch.is_tensor(scale):
        scale = scale.reshape(scale.shape + (1,) * event_ndim)
    if mask is not None:
        x = torch.where(mask.reshape(mask.shape + (1,) * event_ndim), x, torch.zeros_like(x))
    return x * scale


def _dist_mask(fn):
    """The mask of a Distribution.mask(...) distribution (True where it counts)."""
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            return fn._mask
        if isinstance(fn, torch.distributions.Independent):
            fn = fn.base_dist
            continue
        return True


def _size(site):
    """N_s: scaled count of the unmasked batch elements of a site."""
    ones = torch.ones(site["fn"].batch_shape)
    dmask = _dist_mask(site["fn"])
    if torch.is_tensor(dmask):
        ones = ones * dmask.expand(ones.shape)
    return _scale_mask(ones, site)


def _kl_per_dim(q, p, value, analytic):
    """KL of q to p per batch element and latent dimension: batch_shape + (J,) (unscaled)."""
    qi = q if isinstance(q, torch.distributions.Independent) else None
    pi = p if isinstance(p, torch.distributions.Independent) else None
    if qi is not None and pi is not None and qi.reinterpreted_batch_ndims == pi.reinterpreted_batch_ndims:
        ndim, q, p = qi.reinterpreted_batch_ndims, qi.base_dist, pi.base_dist
    else:
        ndim = 0
    kl = None
    if analytic:
        try:
            kl = torch.distributions.kl_divergence(q, p)
        except NotImplementedError:
            pass
    if kl is None:
        kl = q.log_prob(value) - p.log_prob(value)
    kl = kl.reshape(kl.shape[: kl.dim() - ndim] + (-1,))
    return kl, ndim


def _aux_log_q(guide, name, site, case_aux, layout):
    """{model site or JOINT: per-element log q (batch_shape + (1,) or + (J,))} of an auxiliary site."""
    if isinstance(guide, AutoNormal):
        assert name.endswith("_unconstrained")
        return {name[: -len("_unconstrained")]: site["log_prob"].unsqueeze(-1)}
    if isinstance(guide, AutoDiagonalNormal):
        assert site["scale"] == 1.0 and site["mask"] is None
        per_element = site["fn"].base_dist.log_prob(site["value"])  # batch + (D,)
        out, offset = {}, 0
        for model_name, size in layout:
            out[model_name] = per_element[..., offset : offset + size]
            offset += size
        return out
    if isinstance(guide, AutoMultivariateNormal):
        return {JOINT: site["log_prob"].unsqueeze(-1)}
    return {case_aux[name]: site["log_prob"].unsqueeze(-1)}


def hand_objective(
    model_trace,
    guide_trace,
    reduce,
    *,
    guide,
    analytic,
    beta,
    sites,
    free_bits,
    capacity,
    gamma,
    case_aux=None,
    layout=(),
):
    """
    One (possibly vectorised) particle: the documented objective and decomposition, each a
    (P,)-tensor; ``"surrogate"`` carries the gradient estimator.
    """
    recon, kl, entropy, cross, per_dim, size, score = {}, {}, {}, {}, {}, {}, []
    for name, m in model_trace.nodes.items():
        if m["type"] != "sample":
            continue
        if m["is_observed"]:
            recon[name] = reduce(m["log_prob"])
            continue
        g = guide_trace.nodes[name]
        reparam = g["fn"].has_rsample
        log_p = reduce(m["log_prob"])
        log_q = reduce(g["log_prob"])
        if not reparam:
            score.append(log_q)
            log_q = log_q.detach()
        kl_s = None
        if analytic:
            try:
                kl_s = reduce(_scale_mask(torch.distributions.kl_divergence(g["fn"], m["fn"]), g))
            except NotImplementedError:
                pass
        if kl_s is None:
            kl_s = log_q - log_p
            entropy[name] = -log_q
        else:
            try:
                entropy[name] = reduce(_scale_mask(g["fn"].entropy(), g))
            except NotImplementedError:  # no analytic entropy: the one consistent with the KL used
                entropy[name] = -log_p - kl_s
        kl[name] = kl_s
        cross[name] = (kl_s + entropy[name]).detach()
        size[name] = reduce(_size(g))
        if free_bits is not None:
            kl_ij, ndim = _kl_per_dim(g["fn"], m["fn"], g["value"], analytic)
            if not reparam:
                kl_ij = kl_ij.detach()
            per_dim[name] = reduce(_scale_mask(kl_ij, g, 1), 1)
    joint = joint_name = None
    for name, g in guide_trace.nodes.items():
        if g["type"] != "sample" or name in model_trace.nodes:
            continue
        for target, log_q in _aux_log_q(guide, name, g, case_aux, layout).items():
            log_q_sum = reduce(log_q, 1).sum(-1)
            if target == JOINT:
                joint, joint_name = log_q_sum, name
                continue
            if target not in kl:  # an auxiliary site of its own
                kl[target] = entropy[target] = cross[target] = torch.zeros_like(log_q_sum)
            kl[target] = kl[target] + log_q_sum
            entropy[target] = entropy[target] - log_q_sum
            if target in per_dim:
                per_dim[target] = per_dim[target] + reduce(log_q, 1).reshape(per_dim[target].shape)

    latent = list(kl)
    selected = [s for s in latent if sites is None or s in sites]
    unselected = [s for s in latent if s not in selected]
    zero = torch.zeros_like(next(iter(recon.values())))
    reconstruction = sum(recon.values(), zero)
    objective = reconstruction - sum((kl[s] for s in unselected), zero)
    selected_kl = sum((kl[s] for s in selected), zero)
    if joint is not None:
        assert sites is None and free_bits is None
        selected_kl = selected_kl + joint
    if free_bits is not None:
        objective = objective - beta * sum(
            (torch.maximum(per_dim[s], free_bits * size[s].unsqueeze(-1)).sum(-1) for s in selected), zero
        )
    elif capacity is not None:
        n = torch.stack([size[s] for s in selected]).max(0).values if selected else zero
        objective = objective - gamma * (selected_kl - n * capacity).abs()
    else:
        objective = objective - beta * selected_kl
    surrogate = objective + sum((log_q * objective.detach() for log_q in score), zero)
    total_kl = sum(kl.values(), zero) + (0.0 if joint is None else joint)
    total_entropy = sum(entropy.values(), zero) - (0.0 if joint is None else joint)
    per_site_latent = {s: dict(kl=kl[s].detach(), entropy=entropy[s].detach(), cross_entropy=cross[s]) for s in latent}
    if joint is not None:  # one entry for the joint: every latent site of these models
        per_site_latent = {
            joint_name: dict(
                kl=(joint + sum(kl.values(), zero)).detach(),
                entropy=(sum(entropy.values(), zero) - joint).detach(),
                cross_entropy=sum(cross.values(), zero),
            )
        }
    return dict(
        objective=objective.detach(),
        surrogate=surrogate,
        elbo=(reconstruction - total_kl).detach(),
        reconstruction=reconstruction.detach(),
        kl=total_kl.detach(),
        entropy=total_entropy.detach(),
        per_site={
            **{s: dict(reconstruction=v.detach()) for s, v in recon.items()},
            **per_site_latent,
        },
        groups={} if joint is None else {joint_name: tuple(kl)},
    )


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


# ---------------------------------------------------------------------------------------
# the losses against the hand-written objective, on every model and guide kind
# ---------------------------------------------------------------------------------------

# the latent sites a sites= subset names, per model (None: one latent site, or no split)
SUBSET = {
    "global_local": ["z"],
    "subsample": ["z"],
    "nested_plates": ["z"],
    "poutine_mask": ["z"],
    "distribution_mask": ["z"],
    "several_observed": ["sigma"],
    "auxiliary": ["mu"],
    "auxiliary_unmarked": ["mu", "u"],  # u may carry mu's log q: selected together
    "auto_normal": ["sigma"],
    "auto_diagonal_normal": ["sigma"],
    "auto_multivariate_normal": None,  # one joint log q: no KL per site
    "auto_delta": ["sigma"],
    "amortised": None,
    "observed_only": None,
    "score_function": ["z"],
}
# which model site a hand-written auxiliary guide site stands for (itself: an entry of its own)
CASE_AUX = {"auxiliary": {"u": "mu"}, "auxiliary_unmarked": {"u": "u"}}
# λ for free bits: between the cross-entropy -log p(z) of the autoguides' sites (about 1.6 and
# 0.9 nats at their initial parameters) and their KL (about 3 and 2.3 nats, the auxiliary log q
# included), so that flooring the wrong quantity changes the objective
FREE_BITS = {"auto_normal": 2.0, "auto_diagonal_normal": 2.0}
# the name of an auxiliary site attributed to a model site selects that site's entry
LOSS_SUBSET = {"auto_normal": ["sigma_unconstrained"]}
# combinations refused with a ValueError: (model, option kind) -> the site the message names
REFUSED = {
    # u does not say which site it stands for: no term is known to be a KL
    ("auxiliary_unmarked", "free_bits"): "mu",
    ("auxiliary_unmarked", "capacity"): "mu",
    # one joint log q for mu and sigma: no KL per latent dimension
    ("auto_multivariate_normal", "free_bits"): "_AutoMultivariateNormal_latent",
}

# (id, loss options, hand options, schedule steps taken before the check, needs a subset,
#  needs a KL per site)
OPTIONS = [
    ("beta1", {}, dict(beta=1.0), 0, False, False),
    ("beta4", dict(beta=4.0), dict(beta=4.0), 0, False, False),
    ("beta4-sites", dict(beta=4.0), dict(beta=4.0), 0, True, True),
    # LinearWarmup(10) after 3 steps: β = 3 / 10
    ("beta-warmup", dict(beta=LinearWarmup(10)), dict(beta=0.3), 3, False, False),
    ("free-bits", dict(beta=2.0, free_bits=0.5), dict(beta=2.0, free_bits=0.5), 0, False, True),
    ("free-bits-sites", dict(beta=2.0, free_bits=0.5), dict(beta=2.0, free_bits=0.5), 0, True, True),
    # LinearWarmup(10, 0, 2) after 3 steps: C = 0.6 nats per element
    (
        "capacity",
        dict(capacity=LinearWarmup(10, 0.0, 2.0), gamma=10.0),
        dict(beta=1.0, capacity=0.6, gamma=10.0),
        3,
        False,
        False,
    ),
    ("capacity-sites", dict(capacity=2.0, gamma=10.0), dict(beta=1.0, capacity=2.0, gamma=10.0), 0, True, True),
]
HAND_MODELS = MODELS + [score_function]


def _hand_cases():
    cases = []
    for Loss in (BetaELBO, BetaMeanFieldELBO):
        for make in HAND_MODELS:
            name = make.__name__
            if name == "score_function" and Loss is BetaMeanFieldELBO:
                continue  # mean field needs reparameterised sites (test_mean_field_rejects_score_function_site)
            for option_id, options, hand, steps, subset, per_site in OPTIONS:
                if subset and SUBSET[name] is None:
                    continue
                if per_site and name == "auto_multivariate_normal":
                    continue
                nonlinear = "free_bits" in options or "capacity" in options
                if nonlinear and name == "observed_only":
                    continue
                if nonlinear and not subset and name == "score_function":
                    continue  # NotImplementedError, test_nonlinear_objective_on_score_function_site_raises
                kind = "free_bits" if "free_bits" in options else "capacity" if "capacity" in options else None
                if (name, kind) in REFUSED:
                    continue  # test_refused_with_auxiliary_sites
                marks = []
                if "free_bits" in options:
                    options = options | dict(free_bits=FREE_BITS.get(name, 0.5))
                    hand = hand | dict(free_bits=FREE_BITS.get(name, 0.5))
                for particles in PARTICLES:
                    cases.append(
                        pytest.param(
                            Loss,
                            make,
                            particles.values[0],
                            (option_id, options, hand, steps, subset),
                            marks=marks,
                            id=f"{Loss.__name__}-{name}-{particles.id}-{option_id}",
                        )
                    )
    return cases


def _setup(make, particles):
    """Model, guide, args, the plate nesting and AutoDiagonalNormal's latent layout (before any seeded draw)."""
    model, guide, args = make()
    pyro.set_rng_seed(3)
    guide(*args)  # AutoGuides set up, parameters created
    guide_trace = poutine.trace(guide).get_trace(*args)
    model_trace = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args))
    dims = [
        -frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    max_plate_nesting = max(dims, default=0)
    layout = [
        (name, biject_to(site["fn"].support).inv(site["value"]).numel())
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and isinstance(guide, AutoDiagonalNormal)
    ]
    return model, guide, args, max_plate_nesting, layout


def _hand(model, guide, args, particles, max_plate_nesting, layout, seed, **options):
    num_particles = particles["num_particles"]
    vectorize = particles.get("vectorize_particles", False)
    pyro.set_rng_seed(seed)
    traces = _draw(model, guide, args, num_particles, vectorize, max_plate_nesting)
    reduce = _Reducer(num_particles, vectorize, max_plate_nesting)
    parts = [hand_objective(m, g, reduce, guide=guide, layout=layout, **options) for m, g in traces]
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k not in ("per_site", "groups")}
    out["groups"] = parts[0]["groups"]
    out["per_site"] = {
        site: {term: torch.cat([p["per_site"][site][term] for p in parts]) for term in terms}
        for site, terms in parts[0]["per_site"].items()
    }
    return out


def _grads(value, params):
    grads = [None] * len(params)
    if value.requires_grad:
        grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def _assert_terms_match(terms, hand, per_site):
    num_particles = hand["objective"].shape[0]
    assert terms.num_particles == num_particles
    for name in ("objective", "elbo", "reconstruction", "kl", "entropy"):
        assert getattr(terms, name) == pytest.approx(hand[name].mean().item(), rel=RTOL, abs=ATOL), name
        if num_particles > 1:
            stderr = hand[name].std().item() / math.sqrt(num_particles)
            assert terms.stderr[name] == pytest.approx(stderr, rel=1e-6, abs=ATOL), f"stderr {name}"
    if per_site:
        assert terms.per_site.keys() == hand["per_site"].keys()
        assert terms.groups == hand["groups"]
        for site, values in hand["per_site"].items():
            for term, value in values.items():
                expected = value.mean().item()
                assert terms.per_site[site][term] == pytest.approx(expected, rel=RTOL, abs=ATOL), (site, term)


@pytest.mark.parametrize("Loss, make, particles, option", _hand_cases())
def test_objective_by_hand(Loss, make, particles, option):
    """
    ``loss``, ``loss_and_grads``, ``differentiable_loss`` and ``last_terms`` against the
    documented objective computed by hand from the traces drawn at the same seed.
    """
    option_id, options, hand_options, steps, subset = option
    name = make.__name__
    model, guide, args, max_plate_nesting, layout = _setup(make, particles)
    sites = SUBSET[name] if subset else None
    loss_sites = LOSS_SUBSET.get(name, sites) if subset else None
    extra = dict(max_plate_nesting=max_plate_nesting) if particles.get("vectorize_particles") else {}
    loss_fn = Loss(**particles, **extra, **options, **(dict(sites=loss_sites) if loss_sites else {}))
    loss_fn.load_state_dict({"step": steps})  # where the schedules are (test_losses checks the counting)
    params = _params()
    for p in params.values():
        p.grad = None
    hand_options = dict(beta=1.0, free_bits=None, capacity=None, gamma=1.0) | hand_options
    hand = _hand(
        model,
        guide,
        args,
        particles,
        max_plate_nesting,
        layout,
        seed=11,
        analytic=Loss is BetaMeanFieldELBO,
        sites=sites,
        case_aux=CASE_AUX.get(name),
        **hand_options,
    )
    expected = -hand["objective"].mean().item()
    expected_grads = _grads(-hand["surrogate"].mean(), params)

    pyro.set_rng_seed(11)
    assert loss_fn.loss(model, guide, *args) == pytest.approx(expected, rel=RTOL, abs=ATOL)
    _assert_terms_match(loss_fn.last_terms, hand, per_site=True)

    value, grads = _loss_and_grads(loss_fn, model, guide, args, seed=11)
    assert value == pytest.approx(expected, rel=RTOL, abs=ATOL)
    assert loss_fn.last_terms.objective == pytest.approx(-expected, rel=RTOL, abs=ATOL)
    _assert_close_grads(grads, expected_grads)

    loss_fn.load_state_dict({"step": steps})
    pyro.set_rng_seed(11)
    diff = loss_fn.differentiable_loss(model, guide, *args)
    assert diff.item() == pytest.approx(expected, rel=RTOL, abs=ATOL)
    _assert_close_grads(_grads(diff, params), expected_grads)


def _refused_cases():
    cases = []
    for (name, kind), site in REFUSED.items():
        make = next(m for m in MODELS if m.__name__ == name)
        for option_id, options, _, _, subset, _ in OPTIONS:
            if kind not in options:
                continue
            if subset and SUBSET[name] is None:
                continue
            for Loss in (BetaELBO, BetaMeanFieldELBO):
                sites = SUBSET[name] if subset else None
                named = sites[0] if sites else site  # the message names the first selected site concerned
                cases.append(pytest.param(Loss, make, options, sites, named, id=f"{Loss.__name__}-{name}-{option_id}"))
    # a subset that splits a latent site from an auxiliary site that may carry its log q, or
    # splits the model sites of one joint log q
    for name, sites, site in [("auxiliary_unmarked", ["mu"], "mu"), ("auto_multivariate_normal", ["mu"], "mu")]:
        make = next(m for m in MODELS if m.__name__ == name)
        for Loss in (BetaELBO, BetaMeanFieldELBO):
            cases.append(pytest.param(Loss, make, dict(beta=4.0), sites, site, id=f"{Loss.__name__}-{name}-{sites}"))
    return cases


@pytest.mark.parametrize("Loss, make, options, sites, site", _refused_cases())
def test_refused_with_auxiliary_sites(Loss, make, options, sites, site):
    """
    Free bits / capacity with auxiliary guide sites, and β on ``sites=`` that split a latent
    site from the auxiliary site carrying its log q, are refused on every entry point with a
    ValueError naming the site (the per-site term would be a cross-entropy, not a KL).
    """
    model, guide, args = make()
    guide(*args)
    loss_fn = Loss(**options, **(dict(sites=sites) if sites else {}))
    match = f"'{site}'"
    for call in (loss_fn.loss, loss_fn.loss_and_grads, loss_fn.differentiable_loss):
        with pytest.raises(ValueError, match=match):
            call(model, guide, *args)
    assert loss_fn.step == 0


@pytest.mark.parametrize(
    "make",
    [auxiliary, auxiliary_unmarked, auto_normal, auto_diagonal_normal, auto_multivariate_normal],
    ids=lambda f: f.__name__,
)
@pytest.mark.parametrize("Loss", [BetaELBO, BetaMeanFieldELBO], ids=["BetaELBO", "BetaMeanFieldELBO"])
def test_per_site_terms_by_hand_auxiliary_guides(Loss, make):
    """The per-site KL and entropy of a model site include the log q of the auxiliary sites standing for it."""
    particles = dict(num_particles=1)
    model, guide, args, max_plate_nesting, layout = _setup(make, particles)
    hand = _hand(
        model,
        guide,
        args,
        particles,
        max_plate_nesting,
        layout,
        seed=11,
        analytic=Loss is BetaMeanFieldELBO,
        sites=None,
        case_aux=CASE_AUX.get(make.__name__),
        beta=1.0,
        free_bits=None,
        capacity=None,
        gamma=1.0,
    )
    loss_fn = Loss()
    pyro.set_rng_seed(11)
    loss_fn.loss(model, guide, *args)
    assert loss_fn.last_terms.per_site.keys() == hand["per_site"].keys()
    assert loss_fn.last_terms.groups == hand["groups"]
    for site, values in hand["per_site"].items():
        for term, value in values.items():
            actual = loss_fn.last_terms.per_site[site][term]
            assert actual == pytest.approx(value.item(), rel=RTOL, abs=ATOL), (site, term)


@pytest.mark.parametrize("Loss", [BetaELBO, BetaMeanFieldELBO], ids=["BetaELBO", "BetaMeanFieldELBO"])
def test_per_site_terms_by_hand_autoguide_list(Loss):
    """An AutoGuideList's parts are attributed one by one: AutoNormal's and AutoDiagonalNormal's auxiliary log q."""
    data = _data()
    guide = AutoGuideList(_constrained_model)
    guide.append(AutoDiagonalNormal(poutine.block(_constrained_model, expose=["mu"])))
    guide.append(AutoNormal(poutine.block(_constrained_model, expose=["sigma"])))
    pyro.set_rng_seed(3)
    guide(data)
    loss_fn = Loss()
    pyro.set_rng_seed(11)
    loss_fn.loss(_constrained_model, guide, data)
    pyro.set_rng_seed(11)
    ((model_trace, guide_trace),) = _draw(_constrained_model, guide, (data,), 1, False, 0)

    def lp(trace, name):
        return trace.nodes[name]["log_prob_sum"].item()

    (latent,) = [n for n, site in guide_trace.nodes.items() if site["type"] == "sample" and n.endswith("_latent")]
    # AutoDiagonalNormal's mu is real: its Delta has log density 0; the mean-field KL of a
    # Delta is -log p(v) (Pyro's registered KL), which leaves out the Delta's log density
    delta = {"sigma": 0.0 if Loss is BetaMeanFieldELBO else lp(guide_trace, "sigma"), "mu": lp(guide_trace, "mu")}
    expected = {
        "sigma": lp(guide_trace, "sigma_unconstrained") + delta["sigma"] - lp(model_trace, "sigma"),
        "mu": lp(guide_trace, latent) + delta["mu"] - lp(model_trace, "mu"),
    }
    terms = loss_fn.last_terms
    assert terms.per_site.keys() == {"x", "mu", "sigma"} and terms.groups == {}
    for site, kl in expected.items():
        assert terms.per_site[site]["kl"] == pytest.approx(kl, rel=RTOL, abs=ATOL), site
        assert terms.per_site[site]["cross_entropy"] == pytest.approx(-lp(model_trace, site), rel=RTOL, abs=ATOL)


@pytest.mark.parametrize("hint", ["nope", ("mu", "x"), 3, ()], ids=["unknown", "observed", "not-a-name", "empty"])
def test_auxiliary_for_must_name_latent_sites(hint):
    model, _, args = auxiliary()

    def guide(data):
        u = pyro.sample("u", dist.Normal(0.1, 1.0), infer={"is_auxiliary": True, "auxiliary_for": hint})
        pyro.sample("mu", dist.Normal(u, 0.5))

    with pytest.raises(
        ValueError, match=r"auxiliary guide site 'u' has infer\['auxiliary_for'\]=.*latent sites: \['mu'\]"
    ):
        BetaELBO().loss(model, guide, *args)


@pytest.mark.parametrize("Loss", [BetaELBO, BetaMeanFieldELBO], ids=["BetaELBO", "BetaMeanFieldELBO"])
def test_free_bits_refuse_a_site_of_several_dimensions_with_an_auxiliary_site(Loss):
    """The auxiliary log q is one number per element: no latent dimension of z owns it."""
    data = _data()

    def model(data):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(z.sum(), 1.0), obs=data)

    def guide(data):
        u = pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True, "auxiliary_for": "z"})
        pyro.sample("z", dist.Normal(u * torch.ones(3), 0.5).to_event(1))

    with pytest.raises(ValueError, match="site 'z' has 3 latent dimensions and the log q of its auxiliary site"):
        Loss(free_bits=0.5).loss(model, guide, data)
    Loss(capacity=1.0).loss(model, guide, data)  # capacity needs the site's KL only


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
    with pytest.raises(NotImplementedError, match="guide site 'b' .*use BetaELBO .* or BetaTraceGraphELBO"):
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


def _wrapped_guides():
    """(autoguide class, wrap(guide) -> (model, guide)): wrappers that hide the autoguide object."""

    def scale(g):
        return poutine.scale(_constrained_model, 0.25), poutine.scale(g, 0.25)

    def nested(g):  # a handler around a handler
        return _constrained_model, poutine.scale(poutine.block(g, hide=["nothing"]), 1.0)

    def partial(g):
        return _constrained_model, functools.partial(g)

    def closure(g):
        def guide(data):
            return g(data)

        return _constrained_model, guide

    def opaque(g):  # nothing leads to the object: AutoNormal is recognised from the trace
        holder = {"guide": g}

        def guide(data):
            return holder["guide"](data)

        return _constrained_model, guide

    cases = [pytest.param(AutoNormal, opaque, id="opaque-AutoNormal")]
    for Guide in (AutoNormal, AutoDiagonalNormal):
        for wrap in (scale, nested, partial, closure):
            cases.append(pytest.param(Guide, wrap, id=f"{wrap.__name__}-{Guide.__name__}"))
    return cases


@pytest.mark.parametrize("Guide, wrap", _wrapped_guides())
def test_per_site_terms_by_hand_wrapped_autoguides(Guide, wrap):
    """
    A wrapped autoguide (poutine.scale, nested handlers, functools.partial, a closure) is attributed
    as the autoguide itself: kl/<site> is the site's KL (not the cross-entropy -log p(z)) and
    the auxiliary latent has no entry of its own.
    """
    data = _data()
    auto = Guide(_constrained_model)
    model, guide = wrap(auto)
    pyro.set_rng_seed(3)
    auto(data)  # the parameters
    loss_fn = BetaELBO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not tell" warning
        pyro.set_rng_seed(11)
        loss_fn.loss(model, guide, data)
    pyro.set_rng_seed(11)
    ((model_trace, guide_trace),) = _draw(model, guide, (data,), 1, False, 0)

    def lp(trace, name):
        return trace.nodes[name]["log_prob_sum"].item()

    if Guide is AutoNormal:
        log_q = {s: lp(guide_trace, f"{s}_unconstrained") + lp(guide_trace, s) for s in ("mu", "sigma")}
    else:  # the latent's log q per dimension (mu first, then sigma, both of size 1), scaled like the site
        site = guide_trace.nodes["_AutoDiagonalNormal_latent"]
        per_dim = site["scale"] * site["fn"].base_dist.log_prob(site["value"])
        log_q = {s: per_dim[i].item() + lp(guide_trace, s) for i, s in enumerate(("mu", "sigma"))}
    terms = loss_fn.last_terms
    assert terms.per_site.keys() == {"x", "mu", "sigma"} and terms.groups == {}
    for s in ("mu", "sigma"):
        assert terms.per_site[s]["kl"] == pytest.approx(log_q[s] - lp(model_trace, s), rel=RTOL, abs=ATOL), s
        assert terms.per_site[s]["entropy"] == pytest.approx(-log_q[s], rel=RTOL, abs=ATOL), s
        assert terms.per_site[s]["cross_entropy"] == pytest.approx(-lp(model_trace, s), rel=RTOL, abs=ATOL), s


def test_unattributable_wrapped_autoguide_warns_once():
    """A wrapper the loss cannot see through leaves the latent unattributed, and says so (once)."""
    data = _data()
    holder = {"guide": AutoDiagonalNormal(_constrained_model)}

    def guide(data):  # holds the autoguide in a dict: neither __wrapped__ nor a closure cell finds it
        return holder["guide"](data)

    loss_fn = BetaELBO()
    with pytest.warns(UserWarning, match=r"'_AutoDiagonalNormal_latent'.*auxiliary_for") as record:
        loss_fn.loss(_constrained_model, guide, data)
        loss_fn.loss(_constrained_model, guide, data)
    assert len([w for w in record if "_AutoDiagonalNormal_latent" in str(w.message)]) == 1
    # the documented fallback: the latent is an entry of its own, mu's kl is the cross-entropy
    assert "_AutoDiagonalNormal_latent" in loss_fn.last_terms.per_site
    assert loss_fn.last_terms.per_site["mu"]["entropy"] == 0.0
