# SPDX-License-Identifier: Apache-2.0
"""
JitBetaTraceEnumELBO (TorchScript and inductor) against Pyro: at β = 1 the losses and
gradients of TraceEnum_ELBO for the same seed (and of JitTraceEnum_ELBO where the guide draws
nothing at random), at β ≠ 1 those of TraceEnum_ELBO with poutine.scale(β) on the weighted
sites in model and guide, and the recorded decomposition against hand enumeration.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import JitTraceEnum_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.ops.indexing import Vindex

from pyro_elbo_lab import JitBetaTraceEnumELBO
from pyro_elbo_lab.schedules import LinearWarmup

DATA = torch.tensor([-1.2, -0.4, 0.3, 1.9, 2.4, 3.1])
W0 = torch.tensor([0.4, 0.6])
M0 = torch.tensor([-0.5, 2.0])
S0 = torch.tensor([0.5, 0.7])
LOGITS0 = torch.tensor([[0.3, -0.2], [1.0, 0.1], [-0.5, 0.5], [0.2, 0.0], [0.0, 1.5], [-1.0, 2.0]])
WEIGHTS = torch.tensor([0.3, 0.7])
LOCS = torch.tensor([-1.0, 2.0])


class _scale_site(poutine.messenger.Messenger):
    """Multiply one named site's scale: Pyro's own scale semantics, applied by name."""

    def __init__(self, name, factor):
        super().__init__()
        self.name, self.factor = name, factor

    def _pyro_sample(self, msg):
        if msg["name"] == self.name:
            msg["scale"] = self.factor * msg["scale"]


def mixture_model(data):
    w = pyro.param("w", W0.clone(), constraint=dist.constraints.simplex)
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with pyro.plate("data", data.shape[0]):
        c = pyro.sample("c", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(Vindex(loc)[..., c], 1.0), obs=data)


def mixture_guide(data):
    m = pyro.param("m", M0.clone())
    s = pyro.param("s", S0.clone(), constraint=dist.constraints.positive)
    pyro.sample("loc", dist.Normal(m, s).to_event(1))


def guide_enum_model(data):
    w = pyro.param("w", W0.clone(), constraint=dist.constraints.simplex)
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with pyro.plate("data", data.shape[0]):
        c = pyro.sample("c", dist.Categorical(w))
        pyro.sample("obs", dist.Normal(Vindex(loc)[..., c], 1.0), obs=data)


def guide_enum_guide(data):
    mixture_guide(data)
    logits = pyro.param("logits", LOGITS0.clone())
    with pyro.plate("data", data.shape[0]):
        pyro.sample("c", dist.Categorical(logits=logits))


CASES = {
    "model_enum": (mixture_model, mixture_guide, 1),
    "guide_enum_parallel": (guide_enum_model, config_enumerate(guide_enum_guide, "parallel"), 1),
    "guide_enum_sequential": (guide_enum_model, config_enumerate(guide_enum_guide, "sequential"), 1),
}


def _params():
    return {name: pyro.param(name).unconstrained() for name in sorted(pyro.get_param_store().keys())}


def _steps(elbo, model, guide, num_steps=3):
    """Per step (seed = step): loss_and_grads's loss and gradients, then loss and differentiable_loss."""
    pyro.clear_param_store()
    out = []
    for step in range(num_steps):
        pyro.set_rng_seed(step)
        loss = elbo.loss_and_grads(model, guide, DATA)
        grads = {name: p.grad.clone() for name, p in _params().items() if p.grad is not None}
        for p in _params().values():
            p.grad = None
        pyro.set_rng_seed(100 + step)
        value = elbo.loss(model, guide, DATA)
        pyro.set_rng_seed(200 + step)
        diff = elbo.differentiable_loss(model, guide, DATA)
        params = _params()
        diff_grads = torch.autograd.grad(diff, list(params.values()), allow_unused=True)
        diff_grads = {n: g for n, g in zip(params, diff_grads) if g is not None}
        out.append((loss, value, diff.item(), grads, diff_grads))
    return out


def _assert_same(actual, expected):
    assert len(actual) == len(expected)
    for a_step, e_step in zip(actual, expected):
        for a, e in zip(a_step[:3], e_step[:3]):
            assert a == pytest.approx(e, rel=1e-10, abs=1e-12)
        for a, e in zip(a_step[3:], e_step[3:]):
            assert a.keys() == e.keys()
            for name in e:
                torch.testing.assert_close(a[name], e[name], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential_particles", "vectorized_particles"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_beta_one_matches_trace_enum_elbo(case, vectorize):
    model, guide, nesting = CASES[case]
    if vectorize and case == "guide_enum_sequential":
        pytest.skip("Pyro cannot vectorise particles over sequentially enumerated sites")
    kwargs = dict(num_particles=2, vectorize_particles=vectorize, max_plate_nesting=nesting + vectorize)
    expected = _steps(TraceEnum_ELBO(**kwargs), model, guide)
    # sequential enumeration iterates over the support (Pyro's TracerWarning: the support is frozen, as intended)
    elbo = JitBetaTraceEnumELBO(ignore_jit_warnings=case == "guide_enum_sequential", **kwargs)
    _assert_same(_steps(elbo, model, guide), expected)
    assert elbo.num_compilations == 1  # one TorchScript function serves every entry point and step


def test_matches_jit_trace_enum_elbo_on_a_guide_without_random_draws():
    """Every latent site enumerated (model and guide): no random draws, so Pyro's compiled class gives our numbers."""

    def model(data):
        w = pyro.param("w", W0.clone(), constraint=dist.constraints.simplex)
        with pyro.plate("data", data.shape[0]):
            c = pyro.sample("c", dist.Categorical(w))
            pyro.sample("obs", dist.Normal(LOCS[c], 1.0), obs=data)

    def guide(data):
        logits = pyro.param("logits", LOGITS0.clone())
        with pyro.plate("data", data.shape[0]):
            pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})

    with warnings.catch_warnings():  # Pyro's own call of torch.jit.trace, deprecated in torch >= 2.9
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=DeprecationWarning)
        expected = _steps(JitTraceEnum_ELBO(max_plate_nesting=1), model, guide)
    _assert_same(_steps(JitBetaTraceEnumELBO(max_plate_nesting=1), model, guide), expected)


def _scaled(fn, betas, name):
    """``fn`` under poutine.scale(β_t) on site ``name``, with β_t the next of ``betas`` at each call."""
    calls = iter(betas)

    def wrapped(data):
        with _scale_site(name, next(calls)):
            fn(data)

    return wrapped


@pytest.mark.parametrize("compiler", ["torchscript", "inductor"])
def test_beta_schedule_equals_pyro_with_site_scale(compiler):
    """
    β on 'loc' following a schedule equals TraceEnum_ELBO with poutine.scale(β_t) on 'loc' in
    model and guide (the DMM annealing pattern), step by step, compiled once per graph.
    """
    schedule = LinearWarmup(8, start=0.2, end=1.0)
    # per _steps iteration at step s: loss_and_grads at β(s) (then s + 1), loss at β(s + 1)
    # (no count), differentiable_loss at β(s + 1) (then s + 2); model and guide run once per call
    betas = [b for s in (0, 2, 4) for b in (schedule(s), schedule(s + 1), schedule(s + 1))]
    assert len(set(betas)) == 6
    expected = _steps(
        TraceEnum_ELBO(max_plate_nesting=1),
        _scaled(mixture_model, betas, "loc"),
        _scaled(mixture_guide, betas, "loc"),
    )
    elbo = JitBetaTraceEnumELBO(schedule, sites="loc", max_plate_nesting=1, compiler=compiler)
    _assert_same(_steps(elbo, mixture_model, mixture_guide), expected)
    assert elbo.num_compilations == (1 if compiler == "torchscript" else 2)  # inductor: gradient + forward graphs


def _log_joint():
    return WEIGHTS.log() + dist.Normal(LOCS, 1.0).log_prob(DATA.unsqueeze(-1))


def known_model(data):
    with pyro.plate("data", data.shape[0]):
        c = pyro.sample("c", dist.Categorical(WEIGHTS))
        pyro.sample("obs", dist.Normal(LOCS[c], 1.0), obs=data)


def exact_posterior_guide(data):
    posterior = pyro.param("posterior", _log_joint().softmax(-1), constraint=dist.constraints.simplex)
    with pyro.plate("data", data.shape[0]):
        pyro.sample("c", dist.Categorical(posterior), infer={"enumerate": "parallel"})


@pytest.mark.parametrize("compiler", ["torchscript", "inductor"])
def test_decomposition_recorded_each_compiled_step_by_hand(compiler):
    """
    A guide-enumerated mixture, β = 2.5: the compiled steps' loss, gradient and recorded terms
    against the sums over c written out by hand; the guide is the exact posterior at the
    first step, so the ELBO there is log p(x).
    """
    beta = 2.5
    elbo = JitBetaTraceEnumELBO(beta, max_plate_nesting=1, compiler=compiler)
    optim = pyro.optim.SGD({"lr": 0.05})
    svi = pyro.infer.SVI(known_model, exact_posterior_guide, optim, elbo)
    log_lik = dist.Normal(LOCS, 1.0).log_prob(DATA.unsqueeze(-1))
    for step in range(3):
        q_unconstrained = pyro.param("posterior").unconstrained() if step else None
        q = pyro.param("posterior").detach() if step else _log_joint().softmax(-1)
        recon = (q * log_lik).sum().item()
        kl = (q * (q.log() - WEIGHTS.log())).sum().item()
        entropy = -(q * q.log()).sum().item()
        if step:
            before = q_unconstrained.detach().clone()
            x = before.clone().requires_grad_()
            qx = torch.distributions.transform_to(dist.constraints.simplex)(x)
            hand = -(qx * (log_lik + beta * (WEIGHTS.log() - qx.log()))).sum()
            (hand_grad,) = torch.autograd.grad(hand, [x])
        loss = svi.step(DATA)
        assert loss == pytest.approx(-(recon - beta * kl), rel=1e-10)
        terms = elbo.last_terms
        assert terms.per_site["obs"]["reconstruction"] == pytest.approx(recon, rel=1e-10)
        assert terms.per_site["c"]["kl"] == pytest.approx(kl, rel=1e-10)
        assert terms.per_site["c"]["entropy"] == pytest.approx(entropy, rel=1e-10)
        assert terms.beta == beta
        if step == 0:
            assert terms.elbo == pytest.approx(torch.logsumexp(_log_joint(), -1).sum().item(), rel=1e-10)
        else:  # SGD moved the parameter by -lr * gradient
            after = pyro.param("posterior").unconstrained().detach()
            torch.testing.assert_close(after, before - 0.05 * hand_grad, rtol=1e-9, atol=1e-12)
    assert elbo.num_compilations == 1


def test_sites_none_beta_schedule_refused_for_an_inseparable_site():
    """A guide site whose prior depends on a model-enumerated site: β may weight it only at a constant 1."""
    locs = LOCS.clone()

    def model(data):
        with pyro.plate("data", data.shape[0]):
            c = pyro.sample("c", dist.Categorical(WEIGHTS), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(locs[c], 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data)

    def guide(data):
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Normal(data, 1.0))

    with pytest.raises(NotImplementedError, match="β weights every guide site"):
        JitBetaTraceEnumELBO(LinearWarmup(10, start=1.0, end=1.0 - 1e-9), max_plate_nesting=1).loss(model, guide, DATA)
    expected = []
    for seed in range(2):
        pyro.set_rng_seed(seed)
        expected.append(TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, DATA))
    elbo = JitBetaTraceEnumELBO(max_plate_nesting=1)
    for seed in range(2):
        pyro.set_rng_seed(seed)
        assert elbo.loss(model, guide, DATA) == pytest.approx(expected[seed], rel=1e-12)


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_used_compiled_enum_loss_copies_and_pickles(copier):
    """
    A JitBetaTraceEnumELBO that has compiled (ScriptFunctions cannot be pickled) copies and
    pickles; the copy recompiles and gives TraceEnum_ELBO's loss at the same seed (the runner
    deep-copies the loss once per chain).
    """
    import copy
    import pickle

    elbo = JitBetaTraceEnumELBO(max_plate_nesting=1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    elbo.loss(mixture_model, mixture_guide, DATA)
    assert elbo.num_compilations == 1
    twin = copy.deepcopy(elbo) if copier == "deepcopy" else pickle.loads(pickle.dumps(elbo))
    pyro.set_rng_seed(3)
    expected = TraceEnum_ELBO(max_plate_nesting=1).loss(mixture_model, mixture_guide, DATA)
    pyro.set_rng_seed(3)
    assert twin.loss(mixture_model, mixture_guide, DATA) == pytest.approx(expected, rel=1e-10)
    assert len(elbo._compiled) == 1  # the original keeps its compiled function
