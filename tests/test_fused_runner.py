# SPDX-License-Identifier: Apache-2.0
"""
``SVIRunner(fused=True)``: the gradients and the optimiser's update as one inductor graph
(FusedSVI) inside the runner. References computed without the fused step: Pyro's own
``SVI`` + ``Trace_ELBO`` loop (β = 1) with the non-finite step skipped by hand, and the
unfused runner over the same data and seed. Each test compiles one fused graph (seconds
with inductor's on-disk cache, tens of seconds cold, on a shared CPU): keep them few.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from _models import adam, normal_guide, normal_mean_model, svi_runner
from pyro.infer import SVI, Trace_ELBO

from pyro_elbo_lab import BetaELBO, JitBetaELBO, JitBetaTraceEnumELBO, NonFiniteError, SVIRunner
from pyro_elbo_lab.losses.fused import FusedSVI
from pyro_elbo_lab.runner import Checkpointing
from pyro_elbo_lab.schedules import LinearWarmup

X = torch.linspace(-1.0, 3.0, 12)
BAD = 4  # the step whose data holds an infinite value


model = normal_mean_model(prior_scale=1.5)
guide = normal_guide()


def batches(step: int) -> tuple:
    """The data, with +inf in one observation at step BAD: log p(x | z) = -inf, its gradient infinite."""
    x = X + 0.01 * step
    if step == BAD:
        x = x.clone()
        x[3] = math.inf
    return (x,)


def adam_state(optim) -> dict:
    """Copies of the torch optimisers' per-parameter state (exp_avg, exp_avg_sq, step), by parameter name."""
    return {
        name: {k: v.clone() if torch.is_tensor(v) else v for k, v in s["state"][0].items()}
        for name, s in optim.get_state().items()
    }


@pytest.fixture
def fused_outcomes(monkeypatch) -> list:
    """
    The ``finite`` flag of every step FusedSVI took fused (``None`` for a step it left to the
    unfused path), in order: the unfused fallback gives the same numbers, so the tests
    below check with it that the steps they compare really ran in the fused graph.
    """
    seen: list = []
    original = FusedSVI.fused_step

    def recording(self, *args, **kwargs):
        outcome = original(self, *args, **kwargs)
        seen.append(None if outcome is None else outcome.finite)
        return outcome

    monkeypatch.setattr(FusedSVI, "fused_step", recording)
    return seen


def pyro_reference(num_steps: int, skip: set, seed: int = 0) -> tuple[list, dict, dict]:
    """Pyro's SVI with Trace_ELBO; the steps in `skip` compute the loss (same draws) but apply nothing."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    optim = adam()
    elbo = Trace_ELBO()
    svi = SVI(model, guide, optim, elbo)
    losses = []
    for step in range(num_steps):
        if step in skip:
            losses.append(elbo.loss(model, guide, *batches(step)))
        else:
            losses.append(svi.step(*batches(step)))
    params = {n: v.detach().clone() for n, v in pyro.get_param_store().items()}
    return losses, params, adam_state(optim)


def test_skip_applies_nothing_and_matches_pyro_and_the_unfused_runner(fused_outcomes):
    steps = 12
    ref_losses, ref_params, ref_state = pyro_reference(steps, skip={BAD})

    def fit(fused: bool):
        pyro.clear_param_store()
        seen = {}

        def snapshot(step, row):
            if step in (BAD - 1, BAD):
                params = {n: v.detach().clone() for n, v in pyro.get_param_store().items()}
                seen[step] = (params, adam_state(runner.optim))

        loss = JitBetaELBO(compiler="inductor") if fused else BetaELBO()
        runner = svi_runner(model, guide, loss=loss, seed=0, on_nonfinite="skip", fused=fused, callbacks=[snapshot])
        return runner.run(num_steps=steps, batches=batches), runner, seen

    unfused, _, _ = fit(False)
    result, runner, seen = fit(True)
    # step 0 unfused (it records the gradient graph); every later one fused, the bad one included
    assert fused_outcomes == [None] + [step != BAD for step in range(1, steps)]
    assert runner.loss.num_compilations == 1
    assert runner.loss.step == steps - 1  # the skipped step is no schedule step
    history = result.history
    assert history["skipped"].tolist() == [step == BAD for step in range(steps)]
    assert math.isinf(history["loss"][BAD])
    assert history["loss"].tolist() == pytest.approx(ref_losses, rel=1e-12, abs=1e-12)
    for column in ("loss", "elbo", "kl", "reconstruction"):
        assert history[column].tolist() == pytest.approx(unfused.history[column].tolist(), rel=1e-12), column
    for name, value in ref_params.items():
        assert torch.allclose(result.params[name], value, rtol=1e-10, atol=1e-12), name
    # the skipped step left the parameters and Adam's state (its step count too) bit for bit
    (before, state_before), (after, state_after) = seen[BAD - 1], seen[BAD]
    for name in before:
        assert torch.equal(before[name], after[name]), name
        for key in state_before[name]:
            assert torch.equal(state_before[name][key], state_after[name][key]), (name, key)
    final = adam_state(runner.optim)
    for name, state in ref_state.items():
        assert float(final[name]["step"]) == float(state["step"]) == steps - 1
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(final[name][key], state[key], rtol=1e-9, atol=1e-12), (name, key)


def test_raise_carries_the_partial_result(fused_outcomes):
    ref_losses, ref_params, _ = pyro_reference(BAD, skip=set())
    pyro.clear_param_store()
    loss = JitBetaELBO(compiler="inductor")
    runner = svi_runner(model, guide, loss=loss, seed=0, fused=True)
    with pytest.raises(NonFiniteError, match=rf"step {BAD}\b(.|\n)*'x'") as info:
        runner.run(num_steps=10, batches=batches)
    assert fused_outcomes == [None] + [True] * (BAD - 1) + [False]  # the bad step ran fused
    err = info.value
    assert err.step == BAD and "reconstruction" in err.sites["x"] and sorted(err.grads) == ["loc", "scale"]
    partial = err.result
    assert partial.stop_reason == "nonfinite"
    assert partial.history["loss"].tolist() == pytest.approx(ref_losses, rel=1e-12)
    for name, value in ref_params.items():
        # the last finite parameters: those of Pyro's run up to the step before
        assert torch.allclose(partial.params[name], value, rtol=1e-10, atol=1e-12), name
        assert torch.equal(pyro.param(name).detach(), partial.params[name]), name
    assert loss.step == BAD  # the failed step is not counted by the β schedule


def test_100_steps_with_a_schedule_and_a_resume_equal_the_unfused_runner(tmp_path):
    """
    A β warm-up and an Adam learning-rate schedule over 100 steps: the unfused runner's
    losses, terms, parameters and optimiser state, to float64 rounding; then the same run
    cut at step 50 by a checkpoint and resumed with a new optimiser.
    """

    def optim():
        return pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.05}, "gamma": 0.99})

    def fit(loss, fused, num_steps, **options):
        pyro.clear_param_store()
        runner = svi_runner(model, guide, optim=optim(), loss=loss, seed=3, fused=fused, **options)
        result = runner.run(X, num_steps=num_steps)
        return result, runner.optim.get_state()  # named while the store holds the parameters

    def schedule():
        return LinearWarmup(60, start=0.1)

    reference, expected = fit(BetaELBO(beta=schedule(), num_particles=3, vectorize_particles=True), False, 100)
    loss = JitBetaELBO(beta=schedule(), num_particles=3, vectorize_particles=True, compiler="inductor")
    path = tmp_path / "fit.ckpt"
    first, _ = fit(loss, True, 50, checkpoint=Checkpointing(path, every=20))
    assert loss.num_compilations == 1
    pyro.clear_param_store()
    runner = svi_runner(
        model, guide, optim=optim(), loss=loss, seed=3, fused=True, checkpoint=Checkpointing(path, every=20)
    )
    resumed = runner.run(X, num_steps=100, resume_from=path)
    # the resumed run is fused from its first step (the restored optimiser state is loaded
    # without a step): the gradient graph alone was never compiled, only run eagerly once
    # when recorded (the fused graph is compiled from it)
    assert loss.gradient_graph(model, guide, (X,), {}).info["compiled_modes"] == set()
    for result, n in ((first, 50), (resumed, 100)):
        assert len(result.history) == n
        for column in ("loss", "elbo", "kl", "reconstruction", "beta"):
            assert result.history[column].tolist() == pytest.approx(
                reference.history[column].tolist()[:n], rel=1e-11, abs=1e-12
            ), column
    for name, value in reference.params.items():
        assert torch.allclose(resumed.params[name], value, rtol=1e-10, atol=1e-12), name
    actual = runner.optim.get_state()
    for name, state in expected.items():
        assert actual[name]["scheduler"]["last_epoch"] == state["scheduler"]["last_epoch"] == 100
        for key, value in state["optimizer"]["state"][0].items():
            assert torch.allclose(actual[name]["optimizer"]["state"][0][key], value, rtol=1e-9, atol=1e-12), key


def test_chains_are_pyro_fits_seeded_seed_plus_chain(fused_outcomes):
    steps = 15
    references = [pyro_reference(steps, skip={BAD}, seed=5 + chain) for chain in range(2)]
    pyro.clear_param_store()
    runner = svi_runner(
        model,
        guide,
        loss=JitBetaELBO(compiler="inductor"),
        num_chains=2,
        seed=5,
        on_nonfinite="skip",
        fused=True,
    )
    result = runner.run(num_steps=steps, batches=batches)
    # each chain: step 0 unfused, every later one fused (the bad one included)
    assert fused_outcomes == 2 * ([None] + [step != BAD for step in range(1, steps)])
    for chain, (losses, params, _) in enumerate(references):
        history = result.chain_history(chain)
        assert history["skipped"].tolist() == [step == BAD for step in range(steps)]
        assert history["loss"].tolist() == pytest.approx(losses, rel=1e-12, abs=1e-12)
        with result.use_params(chain):
            for name, value in params.items():
                assert torch.allclose(pyro.param(name).detach(), value, rtol=1e-10, atol=1e-12), (chain, name)


def test_refused_without_a_fusable_loss_or_optimiser():
    with pytest.raises(ValueError, match=r"fused=True(.|\n)*compiler='inductor'(.|\n)*fused=False"):
        SVIRunner(model, guide, pyro.optim.Adam({"lr": 0.1}), BetaELBO(), fused=True)
    with pytest.raises(ValueError, match=r"fused=True(.|\n)*RMSprop"):
        SVIRunner(model, guide, pyro.optim.RMSprop({"lr": 0.1}), JitBetaELBO(compiler="inductor"), fused=True)
    with pytest.raises(ValueError, match=r"fused=True(.|\n)*does not fuse JitBetaTraceEnumELBO(.|\n)*fused=False"):
        SVIRunner(model, guide, pyro.optim.Adam({"lr": 0.1}), JitBetaTraceEnumELBO(compiler="inductor"), fused=True)
    with pytest.raises(ValueError, match="fused must be True or False, got fused='yes'"):
        SVIRunner(model, guide, pyro.optim.Adam({"lr": 0.1}), fused="yes")
