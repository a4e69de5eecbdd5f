# SPDX-License-Identifier: Apache-2.0
"""BetaTraceGraphELBO against Pyro's TraceGraph_ELBO and hand-computed score-function gradients."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceGraph_ELBO

from pyro_elbo_lab.losses.beta_trace_graph_elbo import BetaTraceGraphELBO

DATA = torch.tensor([-1.2, -0.4, 0.3, 1.9, 2.4, 3.1])
LOCS = torch.tensor([-1.0, 2.0])


def bernoulli_model(data, scale=1.0):
    # a global reparameterised site and a local discrete (score-function) site
    shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        with poutine.scale(scale=scale):
            z = pyro.sample("z", dist.Bernoulli(0.4))
        pyro.sample("obs", dist.Normal(LOCS[z.long()] + shift, 1.0), obs=data)


def bernoulli_guide(data, scale=1.0, baseline=False):
    m = pyro.param("m", torch.tensor(0.1))
    pyro.sample("shift", dist.Normal(m, 0.3))
    theta = pyro.param("theta", torch.linspace(-1.0, 1.0, len(data)))
    infer = {"baseline": {"use_decaying_avg_baseline": True}} if baseline else {}
    with pyro.plate("data", len(data)):
        with poutine.scale(scale=scale):
            pyro.sample("z", dist.Bernoulli(logits=theta), infer=infer)


def subsample_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    with pyro.plate("data", len(data), subsample_size=3) as idx:
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("obs", dist.Normal(loc + z, 1.0), obs=data[idx])


def subsample_guide(data):
    pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.5)), 0.5))
    p = pyro.param("p", torch.full((len(data),), 0.3), constraint=dist.constraints.unit_interval)
    with pyro.plate("data", len(data), subsample_size=3) as idx:
        pyro.sample("z", dist.Bernoulli(p[idx]))


def nested_model(data):
    with pyro.plate("groups", data.shape[0], dim=-2):
        g = pyro.sample("g", dist.Bernoulli(0.5))
        with pyro.plate("points", data.shape[1], dim=-1):
            pyro.sample("obs", dist.Normal(2.0 * g, 1.0), obs=data)


def nested_guide(data):
    p = pyro.param("gp", torch.full((data.shape[0], 1), 0.4), constraint=dist.constraints.unit_interval)
    with pyro.plate("groups", data.shape[0], dim=-2):
        pyro.sample("g", dist.Bernoulli(p))


CASES = {
    "score_and_reparam": (bernoulli_model, bernoulli_guide, DATA, 1),
    "baseline": (bernoulli_model, lambda d: bernoulli_guide(d, baseline=True), DATA, 1),
    "subsample": (subsample_model, subsample_guide, DATA, 1),
    "nested_plates": (nested_model, nested_guide, DATA.reshape(3, 2), 2),
}


def _params():
    return {name: pyro.param(name).unconstrained() for name in sorted(pyro.get_param_store().keys())}


def _run(elbo, model, guide, data):
    pyro.clear_param_store()
    pyro.set_rng_seed(5)
    elbo.loss(model, guide, data)  # creates the parameters
    pyro.set_rng_seed(5)
    loss = elbo.loss_and_grads(model, guide, data)
    grads = {name: p.grad.clone() for name, p in _params().items() if p.grad is not None}
    pyro.set_rng_seed(5)
    value = elbo.loss(model, guide, data)
    return loss, value, grads


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential_particles", "vectorized_particles"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_beta_one_matches_trace_graph_elbo(case, vectorize):
    model, guide, data, nesting = CASES[case]
    kwargs = dict(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=nesting)
    expected = _run(TraceGraph_ELBO(**kwargs), model, guide, data)
    actual = _run(BetaTraceGraphELBO(1.0, **kwargs), model, guide, data)
    assert actual[0] == pytest.approx(expected[0], rel=1e-12)
    assert actual[1] == pytest.approx(expected[1], rel=1e-12)
    assert actual[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(actual[2][name], expected[2][name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential_particles", "vectorized_particles"])
def test_beta_equals_pyro_with_site_scale(vectorize):
    """β on 'z' equals TraceGraph_ELBO with poutine.scale(β) on 'z' in model and guide (Pyro's DMM pattern)."""
    beta = 0.3
    kwargs = dict(num_particles=4, vectorize_particles=vectorize, max_plate_nesting=1)
    expected = _run(
        TraceGraph_ELBO(**kwargs),
        lambda d: bernoulli_model(d, scale=beta),
        lambda d: bernoulli_guide(d, scale=beta),
        DATA,
    )
    actual = _run(BetaTraceGraphELBO(beta, sites=["z"], **kwargs), bernoulli_model, bernoulli_guide, DATA)
    assert actual[0] == pytest.approx(expected[0], rel=1e-12)
    for name in expected[2]:
        torch.testing.assert_close(actual[2][name], expected[2][name], rtol=1e-10, atol=1e-12)


def test_score_function_gradient_by_hand():
    """One particle: d/dθ of the β-weighted surrogate, written out from the trace's log-probabilities."""
    beta = 2.5
    elbo = BetaTraceGraphELBO(beta, sites=["z"], max_plate_nesting=1)
    pyro.set_rng_seed(1)
    elbo.loss(bernoulli_model, bernoulli_guide, DATA)
    theta = pyro.param("theta").unconstrained()
    theta.grad = None
    pyro.set_rng_seed(7)
    loss = elbo.loss_and_grads(bernoulli_model, bernoulli_guide, DATA)
    grad = theta.grad.clone()

    pyro.set_rng_seed(7)
    guide_trace = poutine.trace(bernoulli_guide).get_trace(DATA)
    z, shift = guide_trace.nodes["z"]["value"], guide_trace.nodes["shift"]["value"].detach()
    t = theta.detach().clone().requires_grad_()
    log_q = dist.Bernoulli(logits=t).log_prob(z)  # per data point
    log_p = dist.Bernoulli(0.4).log_prob(z)
    log_lik = dist.Normal(LOCS[z.long()] + shift, 1.0).log_prob(DATA)
    # downstream cost of z_n: its own point's likelihood and β-weighted KL terms (plate-wise Rao-Blackwellisation)
    downstream = (log_lik + beta * (log_p - log_q)).detach()
    (hand,) = torch.autograd.grad((log_q * downstream).sum(), [t])
    torch.testing.assert_close(grad, -hand, rtol=1e-10, atol=1e-12)

    q_shift = guide_trace.nodes["shift"]["fn"].log_prob(shift)
    p_shift = dist.Normal(0.0, 1.0).log_prob(shift)
    value = log_lik.sum() + beta * (log_p - log_q.detach()).sum() + (p_shift - q_shift)
    assert loss == pytest.approx(-value.item(), rel=1e-12)
    terms = elbo.last_terms
    assert terms.per_site["z"]["kl"] == pytest.approx((log_q.detach() - log_p).sum().item(), rel=1e-12)
    assert terms.per_site["z"]["entropy"] == pytest.approx(-log_q.detach().sum().item(), rel=1e-12)
    assert terms.per_site["shift"]["kl"] == pytest.approx((q_shift - p_shift).item(), rel=1e-12)
    assert terms.per_site["obs"]["reconstruction"] == pytest.approx(log_lik.sum().item(), rel=1e-12)
    assert terms.objective == pytest.approx(-loss, rel=1e-12)


def test_decompose_by_hand_leaves_the_state():
    elbo = BetaTraceGraphELBO(2.5, sites=["z"], max_plate_nesting=1)
    elbo.loss_and_grads(bernoulli_model, bernoulli_guide, DATA)
    before = elbo.last_terms
    pyro.set_rng_seed(7)
    terms = elbo.decompose(bernoulli_model, bernoulli_guide, DATA)
    pyro.set_rng_seed(7)
    guide_trace = poutine.trace(bernoulli_guide).get_trace(DATA)
    z, shift = guide_trace.nodes["z"]["value"], guide_trace.nodes["shift"]["value"].detach()
    log_q = dist.Bernoulli(logits=pyro.param("theta").detach()).log_prob(z)
    log_p = dist.Bernoulli(0.4).log_prob(z)
    log_lik = dist.Normal(LOCS[z.long()] + shift, 1.0).log_prob(DATA)
    q_shift = guide_trace.nodes["shift"]["fn"].log_prob(shift).detach()
    p_shift = dist.Normal(0.0, 1.0).log_prob(shift)
    assert terms.per_site["z"]["kl"] == pytest.approx((log_q - log_p).sum().item(), rel=1e-12)
    assert terms.per_site["shift"]["kl"] == pytest.approx((q_shift - p_shift).item(), rel=1e-12)
    assert terms.per_site["obs"]["reconstruction"] == pytest.approx(log_lik.sum().item(), rel=1e-12)
    elbo_value = log_lik.sum() - (log_q - log_p).sum() - (q_shift - p_shift)
    assert terms.objective == pytest.approx((elbo_value - 1.5 * (log_q - log_p).sum()).item(), rel=1e-12)
    assert elbo.step == 1 and elbo.last_terms is before


def test_gradient_is_unbiased_for_the_beta_objective():
    """Many vectorised particles: the estimate is within 5 standard errors of the enumerated gradient."""
    beta = 0.5
    data = torch.tensor(0.4)

    def model(data):
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("obs", dist.Normal(LOCS[z.long()], 1.0), obs=data)

    def guide(data):
        pyro.sample("z", dist.Bernoulli(logits=pyro.param("theta", torch.tensor(0.2))))

    num = 4000
    elbo = BetaTraceGraphELBO(beta, num_particles=num, vectorize_particles=True, max_plate_nesting=0)
    grads = []
    for _ in range(5):
        loss = elbo.differentiable_loss(model, guide, data)
        (g,) = torch.autograd.grad(loss, [pyro.param("theta").unconstrained()])
        grads.append(g)
    grads = torch.stack(grads)

    t = torch.tensor(0.2, requires_grad=True)
    q1 = torch.sigmoid(t)
    q = torch.stack([1 - q1, q1])
    p = torch.tensor([0.7, 0.3])
    log_lik = dist.Normal(LOCS, 1.0).log_prob(data)
    exact = -(q * (log_lik + beta * (p.log() - q.log()))).sum()
    (exact_grad,) = torch.autograd.grad(exact, [t])
    stderr = grads.std() / 5**0.5
    assert abs(grads.mean() - exact_grad) < 5 * stderr + 1e-3


def test_step_counting():
    elbo = BetaTraceGraphELBO(beta=lambda step: 2.0**step, max_plate_nesting=1)
    elbo.loss(bernoulli_model, bernoulli_guide, DATA)
    assert elbo.step == 0
    elbo.loss_and_grads(bernoulli_model, bernoulli_guide, DATA)
    assert elbo.step == 1 and elbo.current_beta() == 2.0 and elbo.last_terms.beta == 1.0


def test_unknown_site_refused():
    with pytest.raises(ValueError, match="'obs', an observed site"):
        BetaTraceGraphELBO(0.5, sites=["obs"], max_plate_nesting=1).loss(bernoulli_model, bernoulli_guide, DATA)


# -- sites= as a glob pattern or a callable, checked per call (a deep Markov model's z_1 ... z_T) ----


class _ScaleMatching(pyro.poutine.messenger.Messenger):
    """Test helper: Pyro's own site scale on the latent sites whose name starts with a prefix."""

    def __init__(self, prefix, factor):
        super().__init__()
        self.prefix, self.factor = prefix, factor

    def _pyro_sample(self, msg):
        if msg["name"].startswith(self.prefix) and not msg["is_observed"]:
            msg["scale"] = self.factor * msg["scale"]


def chain_model(data):
    z = torch.tensor(0.0)
    for t, x in enumerate(data):
        z = pyro.sample(f"z_{t}", dist.Normal(0.5 * z, 1.0))
        pyro.sample(f"x_{t}", dist.Normal(z, 0.5), obs=x)
    pyro.sample("w", dist.Normal(0.0, 1.0))


def chain_guide(data):
    locs = pyro.param("locs", torch.zeros(10))
    for t in range(len(data)):
        pyro.sample(f"z_{t}", dist.Normal(locs[t], 0.7))
    pyro.sample("w", dist.Normal(0.1, 1.0))


@pytest.mark.parametrize("sites", ["z_*", lambda name: name.startswith("z_")], ids=["glob", "callable"])
def test_sites_pattern_with_varying_sites(sites):
    beta = 0.3
    elbo = BetaTraceGraphELBO(beta, sites=sites, max_plate_nesting=0)
    reference = TraceGraph_ELBO(max_plate_nesting=0)
    for length in (3, 5):  # the number of z_t sites changes between calls
        data = DATA[:length]
        expected = _run(
            reference,
            lambda d: _ScaleMatching("z_", beta)(chain_model)(d),
            lambda d: _ScaleMatching("z_", beta)(chain_guide)(d),
            data,
        )
        actual = _run(elbo, chain_model, chain_guide, data)
        assert actual[0] == pytest.approx(expected[0], rel=1e-12)
        torch.testing.assert_close(actual[2]["locs"], expected[2]["locs"], rtol=1e-10, atol=1e-12)
        assert set(elbo.last_terms.per_site) == {f"z_{t}" for t in range(length)} | {
            f"x_{t}" for t in range(length)
        } | {"w"}


def test_sites_pattern_matching_nothing_refused():
    with pytest.raises(ValueError, match="sites='y_\\*' selects none of the sites"):
        BetaTraceGraphELBO(0.5, sites="y_*", max_plate_nesting=0).loss(chain_model, chain_guide, DATA[:3])


@pytest.mark.parametrize("option", ["free_bits", "capacity"])
def test_free_bits_and_capacity_refused(option):
    with pytest.raises(NotImplementedError, match="free bits and capacity"):
        BetaTraceGraphELBO(**{option: 1.0})
