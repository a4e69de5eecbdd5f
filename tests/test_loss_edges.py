# SPDX-License-Identifier: Apache-2.0
"""
Edge cases of the weighted losses (issue 11 §3, §5, §6): an empty model gives Pyro's
loss of 0, bad ``num_particles`` and autoguide weightings that would not be a KL are
refused with a message naming the argument or site.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO, BetaTraceEnumELBO, BetaTraceGraphELBO, JitBetaTraceEnumELBO

LOSSES = pytest.mark.parametrize("Loss", [BetaELBO, BetaMeanFieldELBO], ids=["BetaELBO", "BetaMeanFieldELBO"])
DATA = torch.tensor([0.4, 1.3, -0.2, 0.9])


@LOSSES
@pytest.mark.parametrize("with_param", [False, True], ids=["no-param", "param"])
def test_empty_model_has_loss_zero_like_trace_elbo(Loss, with_param):
    def model():
        if with_param:
            pyro.param("a", torch.tensor(1.0))

    def guide():
        if with_param:
            pyro.param("b", torch.tensor(2.0))

    expected = Trace_ELBO().loss(model, guide)
    assert expected == 0.0
    loss = Loss(beta=3.0)
    assert loss.loss(model, guide) == expected
    assert loss.loss_and_grads(model, guide) == expected
    assert float(loss.differentiable_loss(model, guide)) == expected
    terms = loss.last_terms
    assert (terms.objective, terms.elbo, terms.kl, terms.entropy, terms.reconstruction) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert terms.per_site == {}


@pytest.mark.parametrize(
    "Loss",
    [BetaELBO, BetaMeanFieldELBO, BetaTraceEnumELBO, JitBetaTraceEnumELBO, BetaTraceGraphELBO],
    ids=lambda c: c.__name__,
)
@pytest.mark.parametrize("num_particles", [0, -2, 2.5, True, "3"])
def test_bad_num_particles_is_refused_at_construction(Loss, num_particles):
    with pytest.raises(ValueError, match=f"num_particles must be an integer >= 1, got num_particles={num_particles!r}"):
        Loss(num_particles=num_particles)


def model(data):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(z.sum(), s), obs=data)


@LOSSES
@pytest.mark.parametrize("Guide", [AutoMultivariateNormal, AutoLowRankMultivariateNormal])
def test_free_bits_refuse_a_joint_auxiliary_site(Loss, Guide):
    # one joint log q for z and s: no KL per latent dimension exists (AutoNormal and
    # AutoDiagonalNormal are attributed per site: tests/test_valid_models.py)
    guide = Guide(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Loss(free_bits=0.5))
    name = f"_{Guide.__name__}_latent"
    with pytest.raises(ValueError, match=f"free bits need the KL of each latent dimension, but .* site '{name}'"):
        svi.step(DATA)


@pytest.mark.parametrize("sites", [["z"], ["z", "z_unconstrained"], ["z_unconstrained"]], ids=str)
def test_beta_on_a_site_with_its_auxiliary_partner_is_the_hand_objective(sites):
    # β on z (named by itself or its auxiliary site): β (log q(u) + log|Delta| - log p(z)) is β times z's KL
    guide = AutoNormal(model)
    guide(DATA)
    loss = BetaELBO(beta=4.0, sites=sites)
    pyro.set_rng_seed(1)
    value = loss.loss(model, guide, DATA)
    pyro.set_rng_seed(1)
    guide_trace = pyro.poutine.trace(guide).get_trace(DATA)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(DATA)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()

    def lp(trace, name):
        return float(trace.nodes[name]["log_prob_sum"].detach())

    kl_z = lp(guide_trace, "z_unconstrained") + lp(guide_trace, "z") - lp(model_trace, "z")
    kl_s = lp(guide_trace, "s_unconstrained") + lp(guide_trace, "s") - lp(model_trace, "s")
    assert value == pytest.approx(-(lp(model_trace, "x") - 4.0 * kl_z - kl_s), rel=1e-10)


@LOSSES
def test_differentiable_loss_warns_on_nan_like_trace_elbo(Loss):
    def nan_model():
        pyro.sample("x", dist.Normal(pyro.param("loc", torch.tensor(float("nan"))), 1.0), obs=torch.tensor(0.0))

    def empty_guide():
        pass

    with pyro.validation_enabled(False):
        with pytest.warns(UserWarning, match="Encountered NaN: loss"):
            Trace_ELBO().differentiable_loss(nan_model, empty_guide)
        with pytest.warns(UserWarning, match="Encountered NaN: loss"):
            value = Loss().differentiable_loss(nan_model, empty_guide)
    assert torch.isnan(value)


def test_sites_glob_pattern_weights_the_matching_sites_by_hand():
    # β on "z_*": z_a and z_b weighted, w not; Monte Carlo KL by hand from the same traces
    def model2(data):
        za = pyro.sample("z_a", dist.Normal(0.0, 1.0))
        zb = pyro.sample("z_b", dist.Normal(0.0, 1.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(za + zb + w, 1.0), obs=data)

    def guide2(data):
        for name, loc in (("z_a", 0.3), ("z_b", -0.2), ("w", 0.1)):
            pyro.sample(name, dist.Normal(loc, 0.7))

    pyro.set_rng_seed(2)
    value = BetaELBO(beta=3.0, sites="z_*").loss(model2, guide2, DATA)
    pyro.set_rng_seed(2)
    guide_trace = pyro.poutine.trace(guide2).get_trace(DATA)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model2, trace=guide_trace)).get_trace(DATA)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()

    def kl(name):
        return float(guide_trace.nodes[name]["log_prob_sum"] - model_trace.nodes[name]["log_prob_sum"])

    expected = -(float(model_trace.nodes["x"]["log_prob_sum"]) - 3.0 * (kl("z_a") + kl("z_b")) - kl("w"))
    assert value == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ValueError, match="selects none of the sites"):
        BetaELBO(beta=3.0, sites="q_*").loss(model2, guide2, DATA)


def _chain_model(data, auxiliary=False):
    """A Markov chain whose number of latent sites z_1 … z_T follows the data's length T."""
    z = torch.tensor(0.0)
    for t, x in enumerate(data, 1):
        z = pyro.sample(f"z_{t}", dist.Normal(z, 1.0))
        pyro.sample(f"x_{t}", dist.Normal(z, 1.0), obs=x)


def _chain_guide(data, auxiliary=False):
    for t in range(1, len(data) + 1):
        pyro.sample(f"z_{t}", dist.Normal(0.5, 1.0))
    if auxiliary:
        pyro.sample("u", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})


def _enum_loss(**kw):
    from pyro_elbo_lab import BetaTraceEnumELBO

    return BetaTraceEnumELBO(max_plate_nesting=0, strict_enumeration_warning=False, **kw)


def _graph_loss(**kw):
    from pyro_elbo_lab import BetaTraceGraphELBO

    return BetaTraceGraphELBO(**kw)


@pytest.mark.parametrize("make", [BetaELBO, BetaMeanFieldELBO, _enum_loss, _graph_loss])
def test_sites_are_checked_on_every_call_against_the_sites_present(make):
    # sites names z_2: right for a length-2 sequence, wrong for a length-1 one that comes later
    loss = make(beta=2.0, sites=["z_2"])
    two, one = torch.tensor([0.3, -0.2]), torch.tensor([0.3])
    loss.loss(_chain_model, _chain_guide, two)
    loss.loss(_chain_model, _chain_guide, two)  # the same sites again: the cached check passes
    with pytest.raises(ValueError, match="z_2"):
        loss.loss(_chain_model, _chain_guide, one)
    # β = 1 on a glob, sequences of every length: Pyro's own ELBO with the same draws
    glob = make(beta=1.0, sites="z_*")
    reference = TraceMeanField_ELBO() if make is BetaMeanFieldELBO else Trace_ELBO()
    for data in (two, one, torch.tensor([0.3, -0.2, 0.9])):
        pyro.set_rng_seed(3)
        ours = glob.loss(_chain_model, _chain_guide, data)
        pyro.set_rng_seed(3)
        assert ours == pytest.approx(reference.loss(_chain_model, _chain_guide, data), rel=1e-9)


def test_auxiliary_sites_are_checked_on_every_call():
    # the first call has no auxiliary guide site; the second has one, which sites= must then name
    loss = BetaELBO(beta=2.0, sites=["z_1"])
    data = torch.tensor([0.3])
    loss.loss(_chain_model, _chain_guide, data)
    with pytest.raises(ValueError, match="auxiliary"):
        loss.loss(_chain_model, _chain_guide, data, auxiliary=True)


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential", "vectorized"])
@pytest.mark.parametrize("name", ["BetaELBO", "BetaMeanFieldELBO", "BetaTraceGraphELBO", "BetaTraceEnumELBO", "IWAE"])
def test_empty_data_names_the_plate(name, vectorize):
    import pyro_elbo_lab

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

    options = {"num_particles": 2, "vectorize_particles": vectorize}
    if name == "BetaTraceEnumELBO":
        options["max_plate_nesting"] = 1
    elbo = getattr(pyro_elbo_lab, name)(**options)
    empty = torch.zeros(0)
    for call in (elbo.loss, elbo.differentiable_loss, elbo.loss_and_grads):
        with pytest.raises(ValueError, match=r"plate 'data' has size 0: the data are empty"):
            call(model, guide, empty)
