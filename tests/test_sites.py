# SPDX-License-Identifier: Apache-2.0
"""
pyro_elbo_lab.sites, the one per-site estimator, against closed forms (Gaussian KL and
entropy), hand computations from the traces' distributions, and hand sums; scale and
mask by the documented rule.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_elbo_lab import sites

N, D = 5, 3
LOC = torch.linspace(-1.0, 1.5, N * D).reshape(N, D)
SCALE = torch.linspace(0.3, 1.2, N * D).reshape(N, D)
KEEP = torch.tensor([True, False, True, True, False])


def gaussian_kl(m, s):
    """KL(N(m, s²) ‖ N(0, 1)), closed form."""
    return torch.log(1 / s) + (s**2 + m**2) / 2 - 0.5


def _pair(model, guide):
    guide_trace = poutine.trace(guide).get_trace()
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace()
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    return model_trace.nodes["z"], guide_trace.nodes["z"]


def _masked_scaled_pair(prior=None):
    prior = dist.Normal(torch.zeros(N, D), 1.0) if prior is None else prior

    def model():
        with pyro.plate("data", N), poutine.mask(mask=KEEP), poutine.scale(scale=4.0):
            pyro.sample("z", prior.to_event(1))

    def guide():
        with pyro.plate("data", N), poutine.mask(mask=KEEP), poutine.scale(scale=4.0):
            pyro.sample("z", dist.Normal(LOC, SCALE).to_event(1))

    return _pair(model, guide)


def test_analytic_kl_scale_and_mask():
    model_site, guide_site = _masked_scaled_pair()
    exact = gaussian_kl(LOC, SCALE)  # (N, D)
    per_dim, analytic = sites.kl(model_site, guide_site, scaled=False, per_dim=True)
    assert analytic
    assert torch.allclose(per_dim, torch.where(KEEP[:, None], exact, torch.zeros(())), atol=1e-12)
    scaled, _ = sites.kl(model_site, guide_site)
    assert torch.allclose(scaled, 4.0 * torch.where(KEEP, exact.sum(-1), torch.zeros(())), atol=1e-12)
    assert sites.count(guide_site).tolist() == [4.0, 0.0, 4.0, 4.0, 0.0]
    assert sites.count(guide_site, scaled=False).tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]


def test_monte_carlo_kl_where_none_is_registered():
    prior = dist.StudentT(4.0, torch.zeros(N, D), 1.0)
    model_site, guide_site = _masked_scaled_pair(prior)
    z = guide_site["value"]
    hand = dist.Normal(LOC, SCALE).log_prob(z) - dist.StudentT(4.0, 0.0, 1.0).log_prob(z)
    per_dim, analytic = sites.kl(model_site, guide_site, scaled=False, per_dim=True)
    assert not analytic
    assert torch.allclose(per_dim, torch.where(KEEP[:, None], hand, torch.zeros(())), atol=1e-12)
    total, analytic = sites.kl(model_site, guide_site)
    assert not analytic
    assert torch.allclose(total, 4.0 * torch.where(KEEP, hand.sum(-1), torch.zeros(())), atol=1e-12)


def test_entropy_and_cross_entropy():
    model_site, guide_site = _masked_scaled_pair()
    exact = (0.5 * math.log(2 * math.pi * math.e) + torch.log(SCALE)).sum(-1)
    entropy, analytic = sites.entropy(guide_site, model_site, scaled=False)
    assert analytic
    assert torch.allclose(entropy, torch.where(KEEP, exact, torch.zeros(())), atol=1e-12)
    z = guide_site["value"]
    cross = -dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert torch.allclose(sites.cross_entropy(model_site, guide_site), 4.0 * torch.where(KEEP, cross, torch.zeros(())))


def test_mask_on_either_site_excludes_the_element():
    # the model masks (missing data), the guide does not: the element is still left out
    def model():
        with pyro.plate("data", N), poutine.mask(mask=KEEP):
            pyro.sample("z", dist.Normal(torch.zeros(N, D), 1.0).to_event(1))

    def guide():
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(LOC, SCALE).to_event(1))

    model_site, guide_site = _pair(model, guide)
    kl, _ = sites.kl(model_site, guide_site, scaled=False)
    assert torch.allclose(kl, torch.where(KEEP, gaussian_kl(LOC, SCALE).sum(-1), torch.zeros(())), atol=1e-12)
    assert sites.element_mask(model_site, guide_site).tolist() == KEEP.tolist()


def test_distribution_mask_inside_to_event_masks_dimensions():
    dim_keep = torch.tensor([True, False, True])

    def model():
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(torch.zeros(N, D), 1.0).mask(dim_keep).to_event(1))

    def guide():
        with pyro.plate("data", N):
            pyro.sample("z", dist.Normal(LOC, SCALE).to_event(1))

    model_site, guide_site = _pair(model, guide)
    per_dim, _ = sites.kl(model_site, guide_site, scaled=False, per_dim=True)
    assert torch.allclose(per_dim, torch.where(dim_keep, gaussian_kl(LOC, SCALE), torch.zeros(())), atol=1e-12)
    assert sites.element_mask(model_site, guide_site, per_dim=True).tolist() == [dim_keep.tolist()] * N


def test_log_prob_per_dimension_and_scale():
    model_site, guide_site = _masked_scaled_pair()
    z = guide_site["value"]
    hand = dist.Normal(LOC, SCALE).log_prob(z)
    got = sites.log_prob(guide_site, scaled=False, per_dim=True)
    assert torch.allclose(got, torch.where(KEEP[:, None], hand, torch.zeros(())), atol=1e-12)
    assert torch.allclose(sites.log_prob(guide_site), 4.0 * torch.where(KEEP, hand.sum(-1), torch.zeros(())))


def test_subsampled_plate_count_is_the_data_size():
    def guide():
        with pyro.plate("data", 40, subsample_size=8):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    trace = poutine.trace(guide).get_trace()
    trace.compute_log_prob()
    assert float(sites.count(trace.nodes["z"]).sum()) == pytest.approx(40.0)
    assert float(sites.count(trace.nodes["z"], scaled=False).sum()) == 8.0


def test_stack_per_particle():
    # shapes mixed as in a vectorised eight-schools step: (P, 1) globals, (P, 8) plate sites,
    # a tensor outside the particle plate, one in float64, and a -inf that stays in its row
    g = torch.Generator().manual_seed(0)
    xs = [
        torch.randn(4, 1, generator=g),
        torch.randn(4, 8, generator=g),
        torch.randn(4, 1, generator=g),
        torch.randn(8, generator=g),
        torch.randn(4, 8, generator=g, dtype=torch.float64),
        torch.randn(4, 8, generator=g),
    ]
    xs[5][2, 3] = -math.inf
    stacked, order = sites.stack_per_particle(xs, 4, 1)
    assert stacked.shape == (6, 4) and sorted(order) == list(range(6))
    for row, i in enumerate(order):
        x = xs[i].double()
        expected = [float(x[p].sum()) for p in range(4)] if x.dim() == 2 else [float(x.sum())] * 4
        assert stacked[row].double().tolist() == pytest.approx(expected, rel=1e-6)
    assert math.isinf(stacked[order.index(5), 2]) and torch.isfinite(stacked[order.index(1)]).all()
    # rows grouped by shape; no particle plate: one value per tensor, in the given order
    assert sites.stack_per_particle([xs[0], xs[1], xs[2]], 4, 1)[1] == (0, 2, 1)
    flat, flat_order = sites.stack_per_particle([xs[1], xs[5]], None)
    assert flat_order is None and flat.tolist() == [float(xs[1].sum()), -math.inf]


def test_sum_per_particle():
    x = torch.arange(24.0).reshape(4, 3, 2)
    # particle plate at dim -3 (max_plate_nesting 2): one value per particle
    assert sites.sum_per_particle(x, 4, 2).tolist() == [float(x[i].sum()) for i in range(4)]
    # particle plate at dim -2 with one trailing event dim kept
    y = x[0]
    assert sites.sum_per_particle(y, 3, 0, event_dims=1).tolist() == y.tolist()
    # a tensor outside the particle plate is shared by every particle
    assert sites.sum_per_particle(torch.ones(2), 5, 1).tolist() == [2.0] * 5
    # no particle plate: a scalar
    assert float(sites.sum_per_particle(x)) == float(x.sum())
