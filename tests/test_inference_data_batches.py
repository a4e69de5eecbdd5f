# SPDX-License-Identifier: Apache-2.0
"""to_inference_data in batches (issue 11 §4): every stored log density against a hand computation
from poutine.trace at the stored draws, fresh draws in every batch, the draws' distribution
against the guide's closed form, and the batch_size argument checked."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import scipy.stats
import torch
from _models import normal_guide, normal_mean_model

from pyro_elbo_lab import draws as draws_module
from pyro_elbo_lab import to_inference_data

N = 6
LOC, SCALE = 0.4, 0.7


model = normal_mean_model()
guide = normal_guide(LOC, SCALE)


def local_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=x)


def local_guide(x):
    loc = pyro.param("loc_i", torch.linspace(-1.0, 1.0, x.shape[0]))
    scale = pyro.param("scale_i", torch.full((x.shape[0],), 0.3), constraint=dist.constraints.positive)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(loc, scale))


@pytest.fixture
def x():
    return torch.linspace(-1.0, 2.0, N)


@pytest.fixture
def batch_sizes(monkeypatch) -> list:
    """The number of draws in each vectorised pass that ``draws.vectorized_traces`` makes, in order."""
    sizes: list = []
    vectorized = draws_module.vectorized_traces

    def counting(*args, **kwargs):
        traces = vectorized(*args, **kwargs)
        sizes.append(traces.num_samples)
        return traces

    monkeypatch.setattr(draws_module, "vectorized_traces", counting)
    return sizes


def by_hand(model_fn, guide_fn, x, z):
    """log p(x, z), log q(z) and the per-point log p(x_i | z) of one draw, from poutine.trace alone."""
    with torch.no_grad():
        model_trace = poutine.trace(poutine.condition(model_fn, data={"z": z})).get_trace(x)
        guide_trace = poutine.trace(poutine.condition(guide_fn, data={"z": z})).get_trace(x)
        pointwise = model_trace.nodes["x"]["fn"].log_prob(x)
        log_joint, log_guide = model_trace.log_prob_sum(), guide_trace.log_prob_sum()
    return float(log_joint), float(log_guide), pointwise.numpy()


@pytest.mark.parametrize("batch_size", [7, 20, 50], ids=["7-of-20", "one-batch", "larger-than-num_samples"])
def test_log_densities_by_hand_in_every_batch(x, batch_size):
    idata = to_inference_data(model, guide, x, num_samples=20, batch_size=batch_size)
    z = idata.posterior["z"].values
    assert z.shape == (1, 20)
    # fresh draws in every batch: batches 7 + 7 + 6 are not one batch repeated
    assert len(np.unique(z)) == 20
    stats = idata.sample_stats
    for s in range(20):
        log_joint, log_guide, pointwise = by_hand(model, guide, x, torch.tensor(z[0, s]))
        assert stats["log_joint"].values[0, s] == pytest.approx(log_joint, rel=1e-12)
        assert stats["log_guide"].values[0, s] == pytest.approx(log_guide, rel=1e-12)
        assert stats["log_importance_weight"].values[0, s] == pytest.approx(log_joint - log_guide, rel=1e-12)
        assert np.allclose(idata.log_likelihood["x"].values[0, s], pointwise, rtol=1e-12, atol=0)


def test_local_latents_and_replicas_in_batches(x):
    idata = to_inference_data(local_model, local_guide, x, num_samples=10, batch_size=3, posterior_predictive=True)
    z = idata.posterior["z"].values
    assert z.shape == (1, 10, N) and idata.posterior["z"].dims == ("chain", "draw", "data")
    assert len(np.unique(z[0, :, 0])) == 10
    for s in range(10):
        log_joint, log_guide, pointwise = by_hand(local_model, local_guide, x, torch.tensor(z[0, s]))
        assert idata.sample_stats["log_joint"].values[0, s] == pytest.approx(log_joint, rel=1e-12)
        assert idata.sample_stats["log_guide"].values[0, s] == pytest.approx(log_guide, rel=1e-12)
        assert np.allclose(idata.log_likelihood["x"].values[0, s], pointwise, rtol=1e-12, atol=0)
    # replicas: x_rep - z ~ N(0, 0.5) for every draw and point (60 values, one batch of 3 at a time)
    residual = (idata.posterior_predictive["x"].values - z).reshape(-1)
    assert idata.posterior_predictive["x"].shape == (1, 10, N)
    assert scipy.stats.kstest(residual / 0.5, "norm").pvalue > 1e-3
    assert np.array_equal(idata.observed_data["x"].values, x.numpy())


def test_batched_draws_follow_the_guide(x, batch_sizes):
    S = 4000
    idata = to_inference_data(model, guide, x, num_samples=S, batch_size=333)
    assert batch_sizes == [333] * 12 + [4]
    z = idata.posterior["z"].values.reshape(-1)
    # the draws are N(LOC, SCALE), the guide's closed form: mean within 4 standard errors, sd within
    # 4 standard errors of the sd (normal data: se(sd) = sd / sqrt(2 (S - 1))), and a KS test
    assert abs(z.mean() - LOC) < 4 * SCALE / math.sqrt(S)
    assert abs(z.std(ddof=1) - SCALE) < 4 * SCALE / math.sqrt(2 * (S - 1))
    assert scipy.stats.kstest(z, "norm", args=(LOC, SCALE)).pvalue > 1e-3


def test_automatic_batch_size_follows_the_element_budget(x, monkeypatch, batch_sizes):
    # batch_size=None: batches of ELEMENT_BUDGET // (SAFETY_FACTOR * entries per draw), as estimate_evidence;
    # one draw holds value + log_prob entries: model z 1 + 1, x 6 + 6, guide z 1 + 1: 16
    import pyro_elbo_lab.diagnostics.local as local

    monkeypatch.setattr(local, "ELEMENT_BUDGET", local.SAFETY_FACTOR * 16 * 5)  # 5 draws per batch
    to_inference_data(model, guide, x, num_samples=12)
    assert batch_sizes == [5, 5, 2]


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True, "7"])
def test_bad_batch_size_is_refused(x, batch_size):
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1 or None \(automatic\), got batch_size="):
        to_inference_data(model, guide, x, num_samples=20, batch_size=batch_size)


def test_subsampled_data_across_batches_is_refused(x):
    def subsampled(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0], subsample_size=3) as idx:
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match=r"observed site 'x' holds other data in another batch.*subsampl"):
        to_inference_data(subsampled, guide, x, num_samples=40, batch_size=1)


def test_from_svi_result_peak_memory_is_one_output(monkeypatch):
    # the draws of every chain go into (chains, S, ...) arrays allocated once; stacking per-chain arrays
    # held the output twice. tracemalloc sees NumPy's allocations (not torch's): its peak up to the
    # ArviZ build must stay near the output's size, by hand C * S * (N latents + N log-likelihoods + 4
    # sample stats) float64 values (plus the observed data)
    import tracemalloc
    from contextlib import contextmanager
    from types import SimpleNamespace

    from pyro_elbo_lab import arviz_compat, from_svi_result

    C, S, n = 2, 400, 2000
    x = torch.linspace(-1.0, 2.0, n)
    pyro.clear_param_store()

    @contextmanager
    def use_params(chain):
        yield

    result = SimpleNamespace(
        model=local_model, guide=local_guide, args=(x,), model_kwargs={}, num_chains=C, use_params=use_params
    )
    seen = {}

    class Built(Exception):
        pass

    def from_dict(groups, **options):
        seen["peak"] = tracemalloc.get_traced_memory()[1]
        seen["z"] = groups["posterior"]["z"].shape
        raise Built

    monkeypatch.setattr(arviz_compat, "from_dict", from_dict)
    output = C * S * (n + n + 4) * 8
    tracemalloc.start()
    try:
        with pytest.raises(Built):
            from_svi_result(result, num_samples=S, batch_size=S // 4)
    finally:
        tracemalloc.stop()
    assert seen["z"] == (C, S, n)
    assert seen["peak"] < 1.25 * output, (seen["peak"], output)  # was about 2 x output


def test_a_chain_outside_the_output_is_refused(x):
    out = draws_module.GuideDraws(num_chains=2)
    with pytest.raises(ValueError, match=r"chain must be in 0 \.\. 1 \(out holds 2 chains\), got chain=2"):
        draws_module.draw_guide(model, guide, (x,), {}, num_samples=10, out=out, chain=2)
