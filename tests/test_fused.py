# SPDX-License-Identifier: Apache-2.0
"""
The fused training step (FusedSVI: gradients and optimiser update in one inductor graph)
against the uncompiled path, ``pyro.infer.SVI`` + ``BetaELBO`` + the same Pyro optimiser,
for the same seed: losses, parameters, recorded terms and optimiser state over 100 steps,
a checkpoint round trip, a learning-rate schedule, and the closed-form optimum of a
conjugate model. Each case compiles one fused graph (tens of seconds on a shared CPU).
"""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer import SVI

from pyro_elbo_lab import BetaELBO, JitBetaELBO, JitBetaTraceEnumELBO
from pyro_elbo_lab.losses.fused import FusedSVI

# Normal–Normal: mu ~ N(MU0, SIGMA0), x_i ~ N(mu, SIGMA)
MU0, SIGMA0, SIGMA = 0.5, 2.0, 1.5
X = torch.tensor([1.3, 2.1, -0.4, 0.9, 1.7, 2.6])
STEPS = 100


def model(x):
    mu = pyro.sample("mu", dist.Normal(MU0, SIGMA0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu, SIGMA), obs=x)


def guide(x):
    loc = pyro.param("loc", torch.full((), 0.0))
    scale = pyro.param("scale", torch.full((), 1.0), constraint=constraints.positive)
    pyro.sample("mu", dist.Normal(loc, scale))


def posterior(x):
    precision = 1 / SIGMA0**2 + x.shape[0] / SIGMA**2
    return (MU0 / SIGMA0**2 + x.sum().item() / SIGMA**2) / precision, precision**-0.5


OPTIMIZERS = {
    "adam": lambda: pyro.optim.Adam({"lr": 0.05}),
    "clipped_adam": lambda: pyro.optim.ClippedAdam({"lr": 0.05, "clip_norm": 0.5, "lrd": 0.995, "weight_decay": 0.01}),
    "sgd": lambda: pyro.optim.SGD({"lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    # a learning-rate schedule: lr is an input of the fused graph
    "adam_exponential_lr": lambda: pyro.optim.ExponentialLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05, "betas": (0.8, 0.99)}, "gamma": 0.995}
    ),
}


def new_loss(compiled: bool):
    kwargs = dict(num_particles=4, vectorize_particles=True, beta=lambda step: min(1.0, 0.5 + step / 200))
    return JitBetaELBO(compiler="inductor", **kwargs) if compiled else BetaELBO(**kwargs)


def trajectory(svi_class, loss, optim, steps=STEPS):
    """Losses, recorded terms per step, parameters and optimiser state after ``steps`` steps from seed 0."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = svi_class(model, guide, optim, loss)
    losses, terms = [], []
    for _ in range(steps):
        losses.append(svi.step(X))
        terms.append(loss.last_terms.as_dict())
        if isinstance(optim, pyro.optim.lr_scheduler.PyroLRScheduler):
            optim.step()
    params = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    return svi, losses, terms, params, optim.get_state()


def assert_states_close(actual, expected):
    assert set(actual) == set(expected)
    for name in expected:
        a, e = actual[name], expected[name]
        if "scheduler" in e:
            assert a["scheduler"]["last_epoch"] == e["scheduler"]["last_epoch"]
            a, e = a["optimizer"], e["optimizer"]
        assert a["param_groups"][0]["lr"] == pytest.approx(e["param_groups"][0]["lr"], rel=1e-12)
        for key, value in e["state"][0].items():
            if torch.is_tensor(value):
                assert torch.allclose(a["state"][0][key], value, rtol=1e-9, atol=1e-12), (name, key)
            else:
                assert a["state"][0][key] == value, (name, key)


@pytest.mark.parametrize("optimizer", ["adam", "clipped_adam", "sgd"])
def test_same_as_svi(optimizer):
    _, losses, terms, params, state = trajectory(SVI, new_loss(False), OPTIMIZERS[optimizer]())
    svi, f_losses, f_terms, f_params, f_state = trajectory(FusedSVI, new_loss(True), OPTIMIZERS[optimizer]())
    assert svi.num_fused_steps == STEPS - 1 and svi.num_unfused_steps == 1
    assert f_losses == pytest.approx(losses, rel=1e-10, abs=1e-10)
    for t, f_t in zip(terms, f_terms):
        assert f_t == pytest.approx(t, rel=1e-9, abs=1e-10)
    for name, value in params.items():
        assert torch.allclose(f_params[name], value, rtol=1e-10, atol=1e-12), name
    assert_states_close(f_state, state)
    # the parameters moved (a fused step that did not update them would fail above, but say so)
    assert abs(params["loc"].item()) > 0.5


def test_the_same_fused_svi_follows_a_restored_optimiser_state_and_changed_settings():
    """
    FusedSVI reuses what it planned at the last step while the parameters, optimisers and
    state tensors are the same objects. Mid-run, with the same FusedSVI and optimiser: each
    torch optimiser's ``load_state_dict`` of an earlier state (which replaces the state
    tensors), an in-place change of Adam's betas and eps, ``param.data = ...`` on a 0-dim
    parameter, and ``torch._dynamo.reset()`` (a recompilation). SVI, given the same
    interventions, is the reference; a stale plan would update the replaced tensors, keep
    the old betas, train the old storage, or fail to recompile.
    """

    def by_name(optim):
        store = pyro.get_param_store()
        return {store.param_name(p): obj for p, obj in optim.optim_objs.items()}

    def run(svi_class, loss):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        optim = pyro.optim.Adam({"lr": 0.05})
        svi = svi_class(model, guide, optim, loss)
        losses = []
        for step in range(60):
            if step == 20:
                saved = {name: copy.deepcopy(obj.state_dict()) for name, obj in by_name(optim).items()}
            if step == 30:
                # the moments and step count of step 20, the parameters of step 30
                # (PyroOptim.set_state only reaches optimisers made later)
                for name, obj in by_name(optim).items():
                    obj.load_state_dict(saved[name])
            if step == 45:
                for obj in optim.optim_objs.values():
                    obj.param_groups[0]["betas"] = (0.5, 0.9)
                    obj.param_groups[0]["eps"] = 1e-3
            if step == 50:
                # new storage under the same (0-dim) parameter object
                pyro.get_param_store()["loc"].unconstrained().data = torch.tensor(3.0)
            if step == 55:
                torch._dynamo.reset()  # the fused graph recompiles at the next step
            losses.append(svi.step(X))
        params = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
        return svi, losses, params, optim.get_state()

    _, losses, params, state = run(SVI, new_loss(False))
    svi, f_losses, f_params, f_state = run(FusedSVI, new_loss(True))
    assert svi.num_fused_steps == 59 and svi.num_unfused_steps == 1
    assert f_losses == pytest.approx(losses, rel=1e-10, abs=1e-10)
    for name, value in params.items():
        assert torch.allclose(f_params[name], value, rtol=1e-10, atol=1e-12), name
    assert_states_close(f_state, state)
    assert state["loc"]["state"][0]["step"] == 60 - 10  # the restore rewound the count: the test exercised it


def test_lr_schedule_checkpoint_round_trip_and_closed_form_optimum():
    """
    Adam under Pyro's ExponentialLR. Stop after 50 fused steps, checkpoint (param store
    and ``optim.get_state()``), resume with a new optimiser and a new FusedSVI: the 100-step trajectory equals an
    uninterrupted ``SVI`` run; the fused graph is reused, not recompiled. Then run on to
    the optimum: the guide of a conjugate model converges to the exact posterior.
    """
    _, losses, _, params, state = trajectory(SVI, new_loss(False), OPTIMIZERS["adam_exponential_lr"]())

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    loss = new_loss(True)
    optim = OPTIMIZERS["adam_exponential_lr"]()
    first = FusedSVI(model, guide, optim, loss)
    f_losses = []
    for _ in range(50):
        f_losses.append(first.step(X))
        optim.step()
    checkpoint = (pyro.get_param_store().get_state(), optim.get_state(), loss.state_dict())
    pyro.clear_param_store()
    pyro.get_param_store().set_state(checkpoint[0])
    optim = OPTIMIZERS["adam_exponential_lr"]()
    optim.set_state(checkpoint[1])
    loss.load_state_dict(checkpoint[2])
    second = FusedSVI(model, guide, optim, loss)
    # every step after the restore is fused (the restored parameters get their optimisers
    # and the set_state state without an unfused step) and reuses the compiled fused graph
    for _ in range(50):
        f_losses.append(second.step(X))
        optim.step()
    assert second.num_unfused_steps == 0 and second.num_fused_steps == 50
    assert second.compile_seconds == 0.0 and first.compile_seconds > 0
    assert f_losses == pytest.approx(losses, rel=1e-10, abs=1e-10)
    for name, value in params.items():
        assert torch.allclose(pyro.param(name).detach(), value, rtol=1e-10, atol=1e-12), name
    assert_states_close(optim.get_state(), state)

    # on to the optimum at β = 1 (the schedule reaches 1 at step 100): iterate averages
    # against the exact posterior N(mean, sd)
    locs, scales = [], []
    for _ in range(600):
        second.step(X)
        optim.step()
        locs.append(pyro.param("loc").item())
        scales.append(pyro.param("scale").item())
    mean, sd = posterior(X)
    assert loss.current_beta() == 1.0
    assert sum(locs[200:]) / 400 == pytest.approx(mean, abs=0.03)
    assert sum(scales[200:]) / 400 == pytest.approx(sd, abs=0.03)


def test_refuses_what_it_cannot_fuse():
    with pytest.raises(ValueError, match="compiler='inductor'"):
        FusedSVI(model, guide, pyro.optim.Adam({"lr": 0.1}), BetaELBO())
    with pytest.raises(ValueError, match="compiler='inductor'"):
        FusedSVI(model, guide, pyro.optim.Adam({"lr": 0.1}), JitBetaELBO())
    with pytest.raises(ValueError, match="RMSprop"):
        FusedSVI(model, guide, pyro.optim.RMSprop({"lr": 0.1}), JitBetaELBO(compiler="inductor"))
    with pytest.raises(ValueError, match="clip_args"):
        FusedSVI(model, guide, pyro.optim.Adam({"lr": 0.1}, {"clip_norm": 1.0}), JitBetaELBO(compiler="inductor"))
    # enumeration: refused by name, with the fix, instead of being let through
    with pytest.raises(ValueError, match=r"does not fuse JitBetaTraceEnumELBO(.|\n)*pyro\.infer\.SVI"):
        FusedSVI(
            model, guide, pyro.optim.Adam({"lr": 0.1}), JitBetaTraceEnumELBO(compiler="inductor", max_plate_nesting=1)
        )


@pytest.mark.parametrize("error", [RuntimeError("inductor failed"), KeyboardInterrupt()])
def test_a_failing_fused_call_leaves_clipped_adams_host_state(monkeypatch, error):
    """
    ClippedAdam's learning-rate decay and step count are advanced in Python before the fused
    graph runs. When the graph's call raises (a compile error, Ctrl-C during the first
    compile), no update was applied: the lr, the step count, the moments and the parameters
    are those after Pyro's first (unfused) step, lr = 0.05 * 0.99 and step = 1 by
    ClippedAdam's own rule. No graph is compiled: the fused callable is replaced.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "clip_norm": 0.5, "lrd": 0.99})
    fused = FusedSVI(model, guide, optim, JitBetaELBO(compiler="inductor"))
    fused.step(X)  # unfused: records the gradient graph, creates the optimisers
    assert fused.num_unfused_steps == 1
    before = {n: v.detach().clone() for n, v in pyro.get_param_store().items()}
    state_before = {
        n: (st["state"][0]["exp_avg"].clone(), st["state"][0]["exp_avg_sq"].clone())
        for n, st in optim.get_state().items()
    }
    plan = FusedSVI._plan
    called = []

    def failing_plan(self, args, kwargs):
        found = plan(self, args, kwargs)
        assert found is not None  # the step would be fused

        def fail(*a):
            called.append(True)
            raise error

        found.fused = fail
        return found

    monkeypatch.setattr(FusedSVI, "_plan", failing_plan)
    with pytest.raises(type(error)):
        fused.fused_step(X)
    assert called == [True]
    for name, st in optim.get_state().items():
        assert st["param_groups"][0]["lr"] == pytest.approx(0.05 * 0.99, rel=1e-15), name
        assert st["state"][0]["step"] == 1, name
        assert torch.equal(st["state"][0]["exp_avg"], state_before[name][0]), name
        assert torch.equal(st["state"][0]["exp_avg_sq"], state_before[name][1]), name
    for name, value in pyro.get_param_store().items():
        assert torch.equal(value.detach(), before[name]), name


def test_an_interrupted_first_compile_is_compiled_and_timed_at_the_next_step(monkeypatch):
    """
    Ctrl-C during the first call of a fused graph (the call that compiles it): the next
    step compiles it again and that call is what ``compile_seconds`` counts; the step after
    it is not counted. Its parameters are then those of Pyro's SVI after the same steps.
    """
    import pyro_elbo_lab.losses.fused as fused_module

    make = fused_module._make_fused
    interrupted = []

    def make_interrupted_once(*args, **kwargs):
        real = make(*args, **kwargs)

        def first_call_interrupted(*a):
            if not interrupted:
                interrupted.append(True)
                raise KeyboardInterrupt
            return real(*a)

        return first_call_interrupted

    monkeypatch.setattr(fused_module, "_make_fused", make_interrupted_once)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    fused = FusedSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), new_loss(True))
    fused.step(X)  # unfused
    with pytest.raises(KeyboardInterrupt):
        fused.step(X)
    assert interrupted == [True] and fused.compile_seconds == 0.0
    fused.step(X)
    compiled = fused.compile_seconds
    assert compiled > 0.0  # the compiling call, timed
    for _ in range(3):
        fused.step(X)
    assert fused.compile_seconds == compiled
    assert fused.num_fused_steps == 4 and fused.num_unfused_steps == 1
    params = {n: v.detach().clone() for n, v in pyro.get_param_store().items()}
    # the reference: SVI over the same 5 steps (the interrupted call changed nothing and
    # drew no random numbers before the graph ran)
    *_, ref_params, _ = trajectory(SVI, new_loss(False), pyro.optim.Adam({"lr": 0.05}), steps=5)
    for name, value in ref_params.items():
        assert torch.allclose(params[name], value, rtol=1e-10, atol=1e-12), name


def test_a_schedule_of_a_compiled_in_setting_keeps_a_bounded_number_of_graphs(monkeypatch):
    """
    SGD's momentum is a constant of the fused graph: changing it compiles another graph. With
    room for one graph per gradient graph, alternating two momenta keeps one, and every step
    still matches Pyro's SVI given the same settings.
    """
    import pyro_elbo_lab.losses.fused as fused_module

    monkeypatch.setattr(fused_module, "_MAX_CONFIGS", 1)

    def run(svi_class, loss):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        optim = pyro.optim.SGD({"lr": 0.01, "momentum": 0.9})
        svi = svi_class(model, guide, optim, loss)
        losses = []
        for k in range(5):
            losses.append(svi.step(X))
            for obj in optim.optim_objs.values():
                obj.param_groups[0]["momentum"] = 0.5 if k % 2 == 0 else 0.9
        return svi, losses, {n: v.detach().clone() for n, v in pyro.get_param_store().items()}

    _, losses, params = run(SVI, new_loss(False))
    loss = new_loss(True)
    fused, f_losses, f_params = run(FusedSVI, loss)
    assert fused.num_fused_steps == 4
    graphs = [cache for compiled, cache in fused_module._FUSED.items() if compiled in loss._compiled.values()]
    assert [len(cache) for cache in graphs] == [1]
    assert f_losses == pytest.approx(losses, rel=1e-10, abs=1e-10)
    for name, value in params.items():
        assert torch.allclose(f_params[name], value, rtol=1e-10, atol=1e-12), name


def test_a_nonfinite_step_is_not_applied_clipped_adam():
    """
    ClippedAdam (its decayed learning rate and step count live in Python): the data hold
    +inf at step 3, so that step's loss and gradients are infinite. FusedSVI applies
    nothing for it (parameters, moments, lr and step count bit for bit as before) and
    continues as Pyro's SVI run in which that step is left out by hand (its loss still
    evaluated, for the same random draws).
    """
    bad, steps = 3, 12

    def data(step):
        x = X.clone()
        if step == bad:
            x[1] = float("inf")
        return x

    def optim():
        return pyro.optim.ClippedAdam({"lr": 0.05, "clip_norm": 0.5, "lrd": 0.99})

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    ref_loss, ref_optim = BetaELBO(), optim()
    svi = SVI(model, guide, ref_optim, ref_loss)
    losses = [ref_loss.loss(model, guide, data(s)) if s == bad else svi.step(data(s)) for s in range(steps)]
    expected = {name: value.detach().clone() for name, value in pyro.get_param_store().items()}
    expected_state = ref_optim.get_state()

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    fused_optim = optim()
    fused = FusedSVI(model, guide, fused_optim, JitBetaELBO(compiler="inductor"))
    f_losses = []
    for s in range(steps):
        if s == bad:
            before = {n: v.detach().clone() for n, v in pyro.get_param_store().items()}
            state_before = fused_optim.get_state()
            state_before = {
                n: (st["param_groups"][0]["lr"], st["state"][0]["step"], st["state"][0]["exp_avg"].clone())
                for n, st in state_before.items()
            }
            f_losses.append(fused.step(data(s)))  # inf: no warning (Pyro's warn_if_nan warns for NaN only)
            for n, v in pyro.get_param_store().items():
                assert torch.equal(v.detach(), before[n]), n
            for n, st in fused_optim.get_state().items():
                lr, step, exp_avg = state_before[n]
                assert st["param_groups"][0]["lr"] == lr and st["state"][0]["step"] == step == bad, n
                assert torch.equal(st["state"][0]["exp_avg"], exp_avg), n
        else:
            f_losses.append(fused.step(data(s)))
    assert fused.num_fused_steps == steps - 1
    assert f_losses == pytest.approx(losses, rel=1e-12)
    for name, value in expected.items():
        assert torch.allclose(pyro.param(name).detach(), value, rtol=1e-10, atol=1e-12), name
    assert_states_close(fused_optim.get_state(), expected_state)


def bernoulli_model(x):
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    k = pyro.sample("k", dist.Bernoulli(0.5))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(mu + 3.0 * k, 1.0), obs=x)


def bernoulli_guide(x):
    pyro.sample("mu", dist.Normal(pyro.param("m", torch.tensor(0.0)), 0.5))
    kp = pyro.param("kp", torch.tensor(0.5), constraint=constraints.unit_interval)
    pyro.sample("k", dist.Bernoulli(kp))


@pytest.mark.parametrize("runner", ["svi", "fused"])
def test_a_bernoulli_guide_site_draws_as_eager_in_float64(runner):
    """
    A Bernoulli guide site (a score-function site) in float64: the inductor-compiled loss,
    through SVI or FusedSVI, draws the samples eager Pyro draws for the same seed, so the
    losses, the parameters and the random stream after the run are those of SVI +
    BetaELBO. (torch 2.13's inductor decomposes ``torch.bernoulli`` into a float32
    ``rand() < p`` even with ``fallback_random=True``: the third loss differed.)
    """
    assert torch.get_default_dtype() == torch.float64
    x = torch.tensor([-2.1, -1.9, 2.2, 1.8, 2.5])

    def run(svi_class, loss):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        svi = svi_class(bernoulli_model, bernoulli_guide, pyro.optim.Adam({"lr": 0.05}), loss)
        losses = [svi.step(x) for _ in range(8)]
        return losses, pyro.param("m").item(), pyro.param("kp").item(), torch.rand(1).item()

    expected = run(SVI, BetaELBO())
    actual = run(FusedSVI if runner == "fused" else SVI, JitBetaELBO(compiler="inductor"))
    assert actual[0] == pytest.approx(expected[0], rel=1e-10, abs=1e-10)
    assert actual[1:] == pytest.approx(expected[1:], rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_compiled_bernoulli_decomposition_draws_as_eager(dtype):
    """Eager's CPU kernel draws a float64 uniform for a float64 p, a float32 one otherwise."""
    from pyro_elbo_lab.losses.inductor import _bernoulli_as_eager

    p = torch.rand(2000, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    torch.manual_seed(3)
    expected, after = torch.bernoulli(p), torch.rand(2)
    torch.manual_seed(3)
    actual = _bernoulli_as_eager(p)
    assert actual.dtype == dtype and torch.equal(actual, expected) and torch.equal(torch.rand(2), after)
