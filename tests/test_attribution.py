# SPDX-License-Identifier: Apache-2.0
"""
losses.attribution.sample_sites: the one latent list (model order, then guide-only sites in
guide order); Attribution.split_log_q: one model site's slice of AutoDiagonalNormal's
per-dimension log q, against torch's Normal(loc, scale).log_prob of the guide's own draw,
sliced and shaped by hand.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroParam
from pyro.poutine.util import prune_subsample_sites

from pyro_elbo_lab.losses.attribution import attribute, auxiliary_sites, sample_sites


def model(x):
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.param("unused", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(a + b, 1.0), obs=x)
    pyro.sample("y", dist.Normal(a, 1.0), obs=torch.tensor(0.5))


def guide(x):
    # guide order differs from the model's; two auxiliary sites in a known order
    u = pyro.sample("u_aux", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
    pyro.sample("a", dist.Normal(u, 1.0))
    pyro.sample("t_aux", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
    pyro.sample("b", dist.Normal(0.0, 1.0))


def _traces(model, guide, x):
    # as the losses see them (Pyro's get_importance_trace prunes the plates' subsample sites)
    guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(x))
    model_trace = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x))
    return model_trace, guide_trace


def test_sample_sites_order_and_membership():
    x = torch.tensor([0.1, -0.3])
    model_trace, guide_trace = _traces(model, guide, x)
    observed, latent = sample_sites(model_trace, guide_trace)
    # written by hand from the model and guide above
    assert [name for name, _ in observed] == ["x", "y"]
    assert [(name, model_site is None) for name, model_site, _ in latent] == [
        ("b", False),
        ("a", False),
        ("u_aux", True),
        ("t_aux", True),
    ]
    for name, model_site, guide_site in latent:
        assert guide_site is guide_trace.nodes[name]
        assert model_site is None or model_site is model_trace.nodes[name]
    assert observed[0][1] is model_trace.nodes["x"]
    assert [name for name, _ in auxiliary_sites(model_trace, guide_trace)] == ["u_aux", "t_aux"]


def test_autonormal_auxiliary_sites_follow_the_model_sites():
    x = torch.tensor([0.1, -0.3])
    auto = AutoNormal(model)
    model_trace, guide_trace = _traces(model, auto, x)
    _, latent = sample_sites(model_trace, guide_trace)
    # AutoNormal samples in prototype (model) order: "b_unconstrained", "b", "a_unconstrained", "a"
    assert [name for name, _, _ in latent] == ["b", "a", "b_unconstrained", "a_unconstrained"]


def test_missing_guide_site():
    x = torch.tensor([0.1, -0.3])

    def partial_guide(x):
        pyro.sample("b", dist.Normal(0.0, 1.0))

    model_trace, guide_trace = _traces(model, partial_guide, x)
    with pytest.raises(ValueError, match="latent site 'a' has no site in the guide"):
        sample_sites(model_trace, guide_trace)
    observed, latent = sample_sites(model_trace, guide_trace, missing="skip")
    assert [name for name, _, _ in latent] == ["b"]
    assert [name for name, _ in observed] == ["x", "y"]

    def own_error(name, site):
        return RuntimeError(f"custom {name} {site['type']}")

    with pytest.raises(RuntimeError, match="custom a sample"):
        sample_sites(model_trace, guide_trace, missing=own_error)
    with pytest.raises(ValueError, match="missing must be 'raise', 'skip' or a callable.*'ignore'"):
        sample_sites(model_trace, guide_trace, missing="ignore")  # type: ignore[arg-type]


# --- Attribution.split_log_q ---------------------------------------------------------------
# Reference values use torch only: Normal(loc, scale).log_prob(u) of the guide's auxiliary
# draw u, with loc and scale set by hand, sliced at offsets written out below from the sites'
# unconstrained sizes in model order and shaped as AutoContinuous._unpack_latent shapes them
# (batch_shape + site shape, event dims flattened, a trailing 1 for a site without event dims).

N, D = 3, 2


def split_model(x):
    g = pyro.sample("g", dist.Normal(0.0, 1.0))  # global scalar: 1 latent dim
    with pyro.plate("data", N, dim=-1):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))  # N * D dims
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))  # N dims, unconstrained = log
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2, 3]).to_event(2))  # global, 6 dims
    p = pyro.sample("p", dist.Dirichlet(torch.ones(3)))  # simplex: 2 unconstrained dims
    with pyro.plate("data2", N, dim=-1):
        pyro.sample("x", dist.Normal(z.sum(-1) + g + w.sum((-2, -1)) + p[..., 0], s), obs=x)


# site -> (start, stop) in the joint latent, from the sizes above in model order
SPLIT_OFFSETS = {"g": (0, 1), "z": (1, 7), "s": (7, 10), "w": (10, 16), "p": (16, 18)}
# site -> (shape of its slice as _unpack_latent makes it, event dims), without particles
SPLIT_SHAPES = {"g": ((), 0), "z": ((N, D), 1), "s": ((N,), 0), "w": ((2, 3), 2), "p": ((2,), 1)}
# the expected result shapes, written by hand: (no particles, 4 particles in a plate at dim -2)
SPLIT_RESULT = {
    "g": ((1,), (4, 1, 1)),
    "z": ((N, D), (4, N, D)),
    "s": ((N, 1), (4, N, 1)),
    "w": ((6,), (4, 1, 6)),
    "p": ((2,), (4, 1, 2)),
}
LATENT_DIM = 18


def nested_model():
    with pyro.plate("rows", 2, dim=-2):
        pyro.sample("r", dist.Normal(0.0, 1.0))  # (2, 1): 2 dims
        with pyro.plate("cols", N, dim=-1):
            pyro.sample("c", dist.Normal(0.0, 1.0))  # (2, N): 2 * N dims


NESTED_OFFSETS = {"r": (0, 2), "c": (2, 2 + 2 * N)}
NESTED_SHAPES = {"r": ((2, 1), 0), "c": ((2, N), 0)}
NESTED_RESULT = {"r": ((2, 1, 1), (4, 2, 1, 1)), "c": ((2, N, 1), (4, 2, N, 1))}


def _diagonal_guide(model, latent_dim, *args):
    """An AutoDiagonalNormal with loc and scale set by hand to known, distinct values."""
    auto = AutoDiagonalNormal(model)
    auto(*args)  # builds the prototype
    loc = torch.linspace(-1.5, 2.0, latent_dim)
    scale = torch.linspace(0.3, 1.7, latent_dim).flip(0)
    auto.loc = torch.nn.Parameter(loc.clone())
    auto.scale = PyroParam(scale.clone(), constraint=auto.scale_constraint)
    assert torch.allclose(auto.loc.detach(), loc) and torch.allclose(auto.scale.detach(), scale)
    return auto, loc, scale


def _split_traces(model, guide, args, particles, particle_dim):
    def run(fn):
        return fn if particles is None else pyro.plate("particles", particles, dim=particle_dim)(fn)

    guide_trace = prune_subsample_sites(poutine.trace(run(guide)).get_trace(*args))
    model_trace = prune_subsample_sites(poutine.trace(poutine.replay(run(model), trace=guide_trace)).get_trace(*args))
    return model_trace, guide_trace


def _by_hand(log_q, offsets, shape, event_dims, name):
    """The slice of ``name`` in the per-dimension log q, shaped as _unpack_latent does, event dims flattened."""
    start, stop = offsets[name]
    batch = log_q.shape[:-1]
    part = log_q[..., start:stop].reshape(torch.broadcast_shapes(shape, batch + (1,) * event_dims))
    if event_dims:
        return part.reshape(part.shape[: part.dim() - event_dims] + (-1,))
    return part.unsqueeze(-1)


CASES = [
    pytest.param(
        split_model, (torch.tensor([0.2, -0.4, 1.1]),), SPLIT_OFFSETS, SPLIT_SHAPES, SPLIT_RESULT, -2, id="flat"
    ),
    pytest.param(nested_model, (), NESTED_OFFSETS, NESTED_SHAPES, NESTED_RESULT, -3, id="nested-plates"),
]


@pytest.mark.parametrize("particles", [None, 4], ids=["one-particle", "vectorized-4"])
@pytest.mark.parametrize("wrap", ["plain", "scaled"])
@pytest.mark.parametrize("model, args, offsets, shapes, results, particle_dim", CASES)
def test_split_log_q_matches_torch_normal_slices(model, args, offsets, shapes, results, particle_dim, wrap, particles):
    latent_dim = max(stop for _, stop in offsets.values())
    auto, loc, scale = _diagonal_guide(model, latent_dim, *args)
    # poutine.scale must not change split_log_q: it is documented unscaled
    guide = auto if wrap == "plain" else poutine.scale(auto, scale=0.25)
    model_trace, guide_trace = _split_traces(model, guide, args, particles, particle_dim)
    _, latent = sample_sites(model_trace, guide_trace)
    attribution = attribute(guide, model_trace, guide_trace, latent)

    u = guide_trace.nodes["_AutoDiagonalNormal_latent"]["value"].detach()
    expected_batch = () if particles is None else (particles,) + (1,) * (-particle_dim - 1)
    assert u.shape == expected_batch + (latent_dim,)
    log_q = torch.distributions.Normal(loc, scale).log_prob(u)  # (..., latent_dim), by torch alone

    # the offsets written above are the ones the guide unpacks: identity-transformed sites
    # carry their slice of u, the LogNormal site its exp
    for name, (start, stop) in offsets.items():
        value = model_trace.nodes[name]["value"].detach()
        shape, event_dims = shapes[name]
        piece = u[..., start:stop].reshape(torch.broadcast_shapes(shape, u.shape[:-1] + (1,) * event_dims))
        if name == "s":
            piece = piece.exp()
        elif name == "p":
            piece = biject_to(constraints.simplex)(piece)
        assert torch.allclose(value, piece), name

    got = {}
    for name, (shape, event_dims) in shapes.items():
        got[name] = attribution.split_log_q(latent, name)
        assert got[name] is not None, name
        expected = _by_hand(log_q, offsets, shape, event_dims, name)
        assert got[name].shape == results[name][particles is not None], name
        assert got[name].shape == expected.shape, name
        assert torch.allclose(got[name], expected, rtol=1e-12, atol=1e-12), name
        # a slice one dimension off would not match (the test can fail on the offset)
        start, stop = offsets[name]
        step = 1 if stop < latent_dim else -1
        wrong = _by_hand(log_q, {name: (start + step, stop + step)}, shape, event_dims, name)
        assert not torch.allclose(got[name], wrong), name
    # all slices together are the whole per-dimension log q, each dimension once
    total = sum(got[name].sum() for name in shapes)
    assert torch.allclose(total, log_q.sum(), rtol=1e-12, atol=1e-12)
    # two different sites get different numbers
    names = list(shapes)
    first, second = got[names[0]].flatten(), got[names[1]].flatten()
    k = min(first.numel(), second.numel())
    assert not torch.allclose(first[:k], second[:k])
    # an observed site, and a name the model does not have, get no split
    observed = "x" if "x" in model_trace.nodes else None
    for name in filter(None, (observed, "not_a_site")):
        assert attribution.split_log_q(latent, name) is None, name


@pytest.mark.parametrize("particles", [None, 4], ids=["one-particle", "vectorized-4"])
def test_split_log_q_masked_guide_is_zero(particles):
    """The split log q is masked like the guide site: poutine.mask(mask=False) gives zeros."""
    x = torch.tensor([0.2, -0.4, 1.1])
    auto, loc, scale = _diagonal_guide(split_model, LATENT_DIM, x)
    guide = poutine.mask(auto, mask=False)
    model_trace, guide_trace = _split_traces(split_model, guide, (x,), particles, -2)
    _, latent = sample_sites(model_trace, guide_trace)
    attribution = attribute(guide, model_trace, guide_trace, latent)
    u = guide_trace.nodes["_AutoDiagonalNormal_latent"]["value"].detach()
    assert (torch.distributions.Normal(loc, scale).log_prob(u) != 0).all()  # not zero by accident
    for name in SPLIT_SHAPES:
        got = attribution.split_log_q(latent, name)
        assert got is not None and got.shape == SPLIT_RESULT[name][particles is not None], name
        assert torch.equal(got, torch.zeros_like(got)), name
