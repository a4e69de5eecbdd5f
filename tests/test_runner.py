# SPDX-License-Identifier: Apache-2.0
"""SVIRunner: history, non-finite handling, interrupts, checkpoints, chains, minibatches."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO, JitBetaMeanFieldELBO, NonFiniteError, SVIResult, SVIRunner
from pyro_elbo_lab.inference_data import from_svi_result
from pyro_elbo_lab.runner import Convergence, Evaluation
from pyro_elbo_lab.schedules import LinearWarmup
from pyro_elbo_lab.summary import summarize

N = 20


@pytest.fixture
def data():
    return torch.linspace(-1.0, 3.0, N)  # mean 1, fixed: exact answers below are deterministic


def model(x, prior_scale=1.0, lik_scale=1.0):
    z = pyro.sample("z", dist.Normal(0.0, prior_scale))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(z, lik_scale), obs=x)


def guide(x, prior_scale=1.0, lik_scale=1.0):
    loc = pyro.param("loc", torch.tensor(0.0))
    scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def exact_posterior(x):
    """z ~ N(0, 1), x_i ~ N(z, 1): z | x ~ N(sum x / (n + 1), 1 / (n + 1))."""
    n = x.shape[0]
    return float(x.sum() / (n + 1)), math.sqrt(1.0 / (n + 1))


def exact_terms(x, m, s):
    """Closed-form reconstruction E_q log p(x|z), KL(q||p) for q = N(m, s^2)."""
    recon = float((-0.5 * math.log(2 * math.pi) - 0.5 * ((x - m) ** 2 + s**2)).sum())
    kl = math.log(1.0 / s) + (s**2 + m**2) / 2 - 0.5
    return recon, kl


def adam(lr=0.05):
    return pyro.optim.Adam({"lr": lr})


# -- history -------------------------------------------------------------------------------


def test_history_rows_equal_a_hand_computation(data):
    # every row against log-densities computed here from the z the guide drew at that step
    # and the parameters it drew it with (one particle, so the row is that one draw)
    seen = []

    def recording_guide(x):
        loc = pyro.param("loc", torch.tensor(0.3))
        scale = pyro.param("scale", torch.tensor(0.8), constraint=dist.constraints.positive)
        z = pyro.sample("z", dist.Normal(loc, scale))
        seen.append((loc.detach().clone(), scale.detach().clone(), z.detach().clone()))

    loss = BetaELBO(beta=LinearWarmup(4, start=0.5, end=1.0))
    result = SVIRunner(model, recording_guide, adam(), loss, progress_bar=False).run(data, num_steps=6)
    h = result.history
    assert h["step"].tolist() == list(range(6)) and len(seen) == 6
    betas = [0.5, 0.625, 0.75, 0.875, 1.0, 1.0]  # the warm-up 0.5 -> 1 over 4 steps, by hand
    for step, (loc, scale, z) in enumerate(seen):
        row = h.iloc[step]
        log_lik = float(dist.Normal(z, 1.0).log_prob(data).sum())
        log_prior = float(dist.Normal(0.0, 1.0).log_prob(z))
        log_q = float(dist.Normal(loc, scale).log_prob(z))
        kl = log_q - log_prior
        assert row["beta"] == betas[step]
        assert row["reconstruction"] == pytest.approx(log_lik, rel=1e-12)
        assert row["reconstruction/x"] == pytest.approx(log_lik, rel=1e-12)
        assert row["kl"] == pytest.approx(kl, rel=1e-12, abs=1e-12)
        assert row["kl/z"] == pytest.approx(kl, rel=1e-12, abs=1e-12)
        assert row["entropy"] == pytest.approx(-log_q, rel=1e-12, abs=1e-12)
        assert row["cross_entropy"] == pytest.approx(-log_prior, rel=1e-12, abs=1e-12)
        assert row["elbo"] == pytest.approx(log_lik + log_prior - log_q, rel=1e-12)
        assert row["loss"] == pytest.approx(-(log_lik - betas[step] * kl), rel=1e-12)
    assert h["wall_time"].is_monotonic_increasing
    assert result.stop_reason == "num_steps" and isinstance(result, SVIResult)


def test_history_first_row_matches_closed_form(data):
    # step 0 evaluates the guide at its initial parameters N(0.3, 0.8^2): with 4000 vectorised
    # particles the recorded terms must match the closed form within 5 of their standard errors
    pyro.param("loc", torch.tensor(0.3))
    pyro.param("scale", torch.tensor(0.8), constraint=dist.constraints.positive)
    loss = BetaELBO(num_particles=4000, vectorize_particles=True)
    result = SVIRunner(model, guide, adam(), loss, progress_bar=False).run(data, num_steps=1)
    row = result.history.iloc[0]
    recon, kl = exact_terms(data, 0.3, 0.8)
    assert row["reconstruction"] == pytest.approx(recon, abs=5 * row["reconstruction_stderr"])
    assert row["kl"] == pytest.approx(kl, abs=5 * row["kl_stderr"])
    assert row["elbo"] == pytest.approx(recon - kl, abs=5 * row["elbo_stderr"])


def test_plain_pyro_loss_records_loss_only(data):
    result = SVIRunner(model, guide, adam(), Trace_ELBO(), progress_bar=False).run(data, num_steps=3)
    assert list(result.history.columns) == ["step", "loss", "wall_time"]
    assert result.terms == [None]


def test_matches_pyro_svi(data):
    # the runner's step is SVI.step: same seed, same parameters after 5 steps
    pyro.set_rng_seed(3)
    svi = pyro.infer.SVI(model, guide, adam(), BetaELBO())
    losses = [svi.step(data) for _ in range(5)]
    expected = {k: v.detach().clone() for k, v in pyro.get_param_store().items()}
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    result = SVIRunner(model, guide, adam(), BetaELBO(), progress_bar=False).run(data, num_steps=5)
    assert result.history["loss"].tolist() == pytest.approx(losses, rel=1e-12)
    for name, value in result.params.items():
        assert torch.allclose(value, expected[name], rtol=1e-12, atol=0)


def test_inductor_compiled_loss_matches_uncompiled_run(data):
    # the runner drives the compiled step (gradients written by the compiled graph) like
    # any loss: the history and parameters of the uncompiled class for the same seed, to
    # float64 rounding (inductor fuses sums, so not bit for bit)
    def fit(loss):
        pyro.clear_param_store()
        pyro.set_rng_seed(4)
        return SVIRunner(model, guide, adam(), loss, progress_bar=False).run(data, num_steps=25)

    ref = fit(BetaMeanFieldELBO(beta=LinearWarmup(10, start=0.2)))
    loss = JitBetaMeanFieldELBO(beta=LinearWarmup(10, start=0.2), compiler="inductor")
    out = fit(loss)
    assert loss.num_compilations == 1
    for column in ("loss", "elbo", "kl", "reconstruction", "beta"):
        assert out.history[column].tolist() == pytest.approx(ref.history[column].tolist(), rel=1e-12, abs=1e-12), column
    for name, value in out.params.items():
        assert torch.allclose(value, ref.params[name], rtol=1e-10, atol=1e-12), name


def test_fit_recovers_exact_posterior(data):
    # Correctness anchor: the Normal guide family contains the exact posterior N(m, s^2),
    # m = 20/21, s = 0.218. After a long fit with a decaying rate (final lr 5.5e-4) the
    # guide's draws match it: 4000 draws give Monte Carlo standard errors s/sqrt(4000) =
    # 0.0035 for the mean and s/sqrt(2*4000) = 0.0024 for the sd; we allow 5 of those plus
    # 0.01 for the optimiser's remaining noise (measured |loc - m| <= 0.0035 and
    # |scale - s| <= 0.002 over seeds 0-2).
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.997})
    loss = BetaMeanFieldELBO(num_particles=32, vectorize_particles=True)
    result = SVIRunner(model, guide, optim, loss, progress_bar=False).run(data, num_steps=1500)
    m, s = exact_posterior(data)
    idata = from_svi_result(result, num_samples=4000)
    z = idata.posterior["z"].values.reshape(-1)
    assert z.mean() == pytest.approx(m, abs=5 * s / math.sqrt(4000) + 0.01)
    assert z.std() == pytest.approx(s, abs=5 * s / math.sqrt(8000) + 0.01)


# -- non-finite values -----------------------------------------------------------------------


def injecting_model(bad_step, site):
    """The model with an infinite scale at `site` on call number `bad_step` (0-based)."""
    calls = [0]

    def m(x):
        bad = calls[0] == bad_step
        calls[0] += 1
        scale = math.inf if bad else 1.0
        model(x, prior_scale=scale if site == "z" else 1.0, lik_scale=scale if site == "x" else 1.0)

    return m


@pytest.mark.parametrize("site,term", [("x", "reconstruction"), ("z", "kl")])
def test_nonfinite_names_step_site_and_keeps_history(data, site, term):
    pyro.set_rng_seed(1)
    clean = SVIRunner(model, guide, adam(), BetaELBO(), progress_bar=False).run(data, num_steps=3)
    clean_params = clean.params
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    runner = SVIRunner(injecting_model(3, site), guide, adam(), BetaELBO(), progress_bar=False)
    with pytest.raises(NonFiniteError, match=rf"step 3\b(.|\n)*'{site}'") as info:
        runner.run(data, num_steps=10)
    err = info.value
    assert err.step == 3
    assert site in err.sites and term in err.sites[site]
    assert term in err.terms and "elbo" in err.terms
    # the history before the bad step is intact, and the parameters are the last finite ones
    partial = err.result
    assert partial.stop_reason == "nonfinite"
    assert len(partial.history) == 3
    for column in ("loss", "elbo", "kl"):
        assert partial.history[column].tolist() == clean.history[column].tolist()
    for name, value in partial.params.items():
        assert torch.equal(value, clean_params[name])
    assert runner.loss.step == 3  # the failed step is not counted by the schedule


def test_nonfinite_gradient_names_parameter(data):
    def bad_guide(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        # value 0, gradient 0 * d sqrt(0) = 0 * inf = NaN
        loc = loc + 0.0 * torch.sqrt(loc - loc)
        pyro.sample("z", dist.Normal(loc, 1.0))

    with pytest.raises(NonFiniteError, match="non-finite gradients: 'loc'") as info:
        SVIRunner(model, bad_guide, adam(), BetaELBO(), progress_bar=False).run(data, num_steps=5)
    assert info.value.step == 0 and info.value.grads == ["loc"] and info.value.terms == []
    assert float(info.value.result.params["loc"]) == 0.0


def test_nonfinite_parameter_caught_by_validation(data):
    pyro.param("loc", torch.tensor(math.nan))
    with pytest.raises(NonFiniteError, match="non-finite values: 'loc'") as info:
        SVIRunner(model, guide, adam(), BetaELBO(), progress_bar=False).run(data, num_steps=5)
    assert info.value.params == ["loc"] and info.value.step == 0
    assert isinstance(info.value.__cause__, ValueError)


def test_skip_nonfinite_steps(data):
    locs = []
    runner = SVIRunner(
        injecting_model(2, "x"),
        guide,
        adam(),
        BetaELBO(),
        progress_bar=False,
        on_nonfinite="skip",
        callbacks=[lambda step, row: locs.append(pyro.param("loc").detach().item())],
    )
    result = runner.run(data, num_steps=5)
    assert result.history["skipped"].tolist() == [False, False, True, False, False]
    assert math.isinf(result.history["loss"][2])
    assert locs[2] == locs[1]  # the update of the skipped step was not applied
    assert locs[3] != locs[2]
    assert runner.loss.step == 4  # a skipped step is no schedule step (README: the schedule does not advance)


# -- interrupts, time, convergence -----------------------------------------------------------


def test_keyboard_interrupt_from_callback(data):
    def stop_at_4(step, row):
        if step == 4:
            raise KeyboardInterrupt

    runner = SVIRunner(model, guide, adam(), BetaELBO(), progress_bar=False, callbacks=[stop_at_4])
    with pytest.warns(UserWarning, match="interrupted.*after 5 completed steps"):
        result = runner.run(data, num_steps=100)
    assert result.stop_reason == "interrupted"
    assert result.history["step"].tolist() == list(range(5))


def test_keyboard_interrupt_from_model(data):
    calls = [0]

    def m(x):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        model(x)

    runner = SVIRunner(m, guide, adam(), BetaELBO(), progress_bar=False)
    with pytest.warns(UserWarning, match="interrupted"):
        result = runner.run(data, num_steps=100)
    assert len(result.history) == 3
    assert runner.loss.step == 3  # the half-done step is not counted
    assert all(p.grad is None or bool((p.grad == 0).all()) for _, p in pyro.get_param_store().named_parameters())


def test_max_time(data):
    result = SVIRunner(model, guide, adam(), BetaELBO(), progress_bar=False, max_time=0.05).run(data, num_steps=10**6)
    assert result.stop_reason == "max_time"
    assert 0 < len(result.history) < 10**6


def test_convergence_stops_near_optimum(data):
    runner = SVIRunner(
        model, guide, adam(0.05), BetaMeanFieldELBO(), progress_bar=False, convergence=Convergence(window=200)
    )
    result = runner.run(data, num_steps=20000)
    assert result.stop_reason == "converged" and result.converged == [True]
    assert len(result.history) < 20000 and len(result.history) % 50 == 0
    m, s = exact_posterior(data)
    # converged means near the optimum of the Normal family, which is the exact posterior
    # N(m, s^2). Adam at lr 0.05 keeps loc jittering about m by roughly lr (one step moves a
    # parameter by about lr); half a posterior sd (0.11) is two such steps.
    assert float(result.params["loc"]) == pytest.approx(m, abs=0.5 * s)


def test_convergence_waits_for_the_beta_schedule(data):
    # the objective falls while β warms up over 400 steps: that is not convergence
    runner = SVIRunner(
        model,
        guide,
        adam(0.05),
        BetaMeanFieldELBO(beta=LinearWarmup(400, start=0.0)),
        progress_bar=False,
        convergence=Convergence(window=100),
    )
    result = runner.run(data, num_steps=5000)
    assert result.stop_reason == "converged"
    # the first window without a β change ends at step 499; patience 2 at every 25 steps
    assert len(result.history) >= 400 + 100 + 25


def test_callback_stop(data):
    result = SVIRunner(
        model, guide, adam(), BetaELBO(), progress_bar=False, callbacks=[lambda step, row: step == 2]
    ).run(data, num_steps=10)
    assert result.stop_reason == "callback" and len(result.history) == 3


def test_empty_list_of_batches_is_rejected():
    with pytest.raises(ValueError, match=r"batches=\[\] is empty"):
        SVIRunner(model, guide, adam(), progress_bar=False).run(num_steps=3, batches=[])


# -- chains ------------------------------------------------------------------------------------


def test_chains_are_independent_seeded_fits(data):
    result = SVIRunner(model, AutoNormal(model), adam(), BetaELBO(), progress_bar=False, num_chains=2, seed=5).run(
        data, num_steps=10
    )
    assert result.num_chains == 2 and result.num_steps == [10, 10]
    assert result.history["chain"].tolist() == [0] * 10 + [1] * 10
    h0, h1 = result.chain_history(0), result.chain_history(1)
    assert not h0["loss"].equals(h1["loss"])
    # chain 1 is the fit a single chain seeded 5 + 1 gives
    pyro.clear_param_store()
    single = SVIRunner(model, AutoNormal(model), adam(), BetaELBO(), progress_bar=False, seed=6).run(data, num_steps=10)
    assert single.history["loss"].tolist() == pytest.approx(h1["loss"].tolist(), abs=1e-12)
    with result.use_params(1):
        for name, value in single.params.items():
            assert torch.allclose(pyro.param(name).detach(), value)


def test_chains_with_pyro_module_in_a_plain_function(data):
    # regression: a module registered with pyro.module inside a plain function is shared by
    # the chains; chain 1 used to start from chain 0's final weights, and every chain's
    # draws came from the module's weights (the last chain's)
    torch.manual_seed(0)
    net = torch.nn.Linear(1, 1)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}

    def net_guide(x):
        pyro.module("net", net)
        loc = net(torch.ones(1))[0]
        scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale))

    result = SVIRunner(model, net_guide, adam(), BetaELBO(), progress_bar=False, num_chains=2, seed=5).run(
        data, num_steps=10
    )
    # chain c's draws come from chain c's parameters: log q(z_s) at the stored draws equals
    # the closed-form Normal log density with that chain's loc = w + b and scale (float64
    # rounding only: w * 1 + b in the module against w + b here, so 1e-12 relative)
    idata = from_svi_result(result, num_samples=50)
    for c in range(2):
        params = result.chain_states[c]["params"]
        loc = float(params["net$$$weight"].sum() + params["net$$$bias"].sum())
        scale = float(params["scale"].exp())
        z = torch.as_tensor(idata.posterior["z"].sel(chain=c).values)
        expected = dist.Normal(loc, scale).log_prob(z).numpy()
        assert idata.sample_stats["log_guide"].sel(chain=c).values == pytest.approx(expected, rel=1e-12, abs=1e-12)
        with result.use_params(c):
            assert float(net(torch.ones(1)).detach()[0]) == pytest.approx(loc, rel=1e-12)
    # the store and the module are back to the best chain afterwards
    best = result.chain_states[result.best_chain]["params"]
    assert torch.equal(net.weight.detach(), best["net$$$weight"])
    assert pyro.get_param_store().get_state()["params"]["net$$$weight"] is net.weight
    # each chain is the fit of a single chain seeded 5 + c from the same initial weights:
    # the same operations on the same numbers, so bit-equal
    for c in range(2):
        net.load_state_dict(start)
        pyro.clear_param_store()
        single = SVIRunner(model, net_guide, adam(), BetaELBO(), progress_bar=False, seed=5 + c).run(data, num_steps=10)
        assert result.chain_history(c)["loss"].tolist() == single.history["loss"].tolist()
        for name, value in single.chain_states[0]["params"].items():
            assert torch.equal(result.chain_states[c]["params"][name], value), (c, name)


def test_chains_flag_multimodality():
    # x ~ N(z^2, 0.1^2) with x = 4: modes z = +2 and z = -2. Chains started on either side
    # of 0 (random init of the guide's loc: seeds 2..5 draw inits 0.78, 1.61, -3.21, -0.97)
    # end in different modes, so R-hat >> 1.01.
    x = torch.tensor(4.0)

    def bimodal(x):
        z = pyro.sample("z", dist.Normal(0.0, 3.0))
        pyro.sample("x", dist.Normal(z**2, 0.1), obs=x)

    def init_guide(x):
        loc = pyro.param("loc", lambda: 2.0 * torch.randn(()))
        scale = pyro.param("scale", torch.tensor(0.1), constraint=dist.constraints.positive)
        pyro.sample("z", dist.Normal(loc, scale))

    result = SVIRunner(bimodal, init_guide, adam(0.05), BetaELBO(), progress_bar=False, num_chains=4, seed=2).run(
        x, num_steps=300
    )
    locs = [float(state["params"]["loc"]) for state in result.chain_states]
    assert min(locs) == pytest.approx(-2.0, abs=0.1) and max(locs) == pytest.approx(2.0, abs=0.1)
    summary = summarize(from_svi_result(result, num_samples=200))
    assert summary.posterior.loc["z", "r_hat"] > 1.5
    assert (summary.vi["r_hat"] > 1.5).all()


# -- minibatches, schedulers, evaluation -----------------------------------------------------------


def test_batches_list_callable_and_iterator(data):
    seen = []

    def m(x):
        seen.append(x.shape[0])
        model(x)

    batches = [data[:5], data[5:12], data[12:]]
    # a list of tensors: each batch is appended to the (empty) args; re-iterated per epoch
    SVIRunner(m, guide, adam(), progress_bar=False).run(num_steps=7, batches=batches)
    assert seen == [5, 7, 8, 5, 7, 8, 5]
    seen.clear()
    SVIRunner(m, guide, adam(), progress_bar=False).run(num_steps=4, batches=lambda step: (data[: step + 1],))
    assert seen == [1, 2, 3, 4]
    seen.clear()
    with pytest.warns(UserWarning, match="ran out after 3 of num_steps=10") as caught:
        result = SVIRunner(m, guide, adam(), progress_bar=False).run(num_steps=10, batches=iter(batches))
    assert seen == [5, 7, 8] and result.stop_reason == "exhausted"
    assert caught[0].filename == __file__  # points at the caller's line
    assert result.args is None  # a minibatch run has no data set of its own


def test_a_one_shot_iterator_is_refused_with_several_chains(data):
    # the chains would share it: the first gets its 3 batches, the others none
    batches = [data[:5], data[5:12], data[12:]]
    with pytest.raises(ValueError, match="batches=.*one-shot iterator and num_chains=3.*list, a callable"):
        SVIRunner(model, guide, adam(), progress_bar=False, num_chains=3, seed=0).run(
            num_steps=3, batches=iter(batches)
        )
    # a list is re-iterated by each chain: every chain runs its 3 steps
    result = SVIRunner(model, guide, adam(), progress_bar=False, num_chains=3, seed=0).run(num_steps=3, batches=batches)
    assert result.num_steps == [3, 3, 3]


def test_dataloader_batches(data):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=8)
    result = SVIRunner(model, guide, adam(), progress_bar=False).run(num_steps=5, batches=loader)
    assert len(result.history) == 5 and result.history["loss"].notna().all()


def test_lr_scheduler_is_stepped(data):
    optim = pyro.optim.ExponentialLR({"optimizer": torch.optim.SGD, "optim_args": {"lr": 0.01}, "gamma": 0.5})
    SVIRunner(model, guide, optim, progress_bar=False).run(data, num_steps=3)
    lrs = [s.get_last_lr()[0] for s in optim.optim_objs.values()]
    assert lrs == pytest.approx([0.01 * 0.5**3] * 2)


def test_evaluation_rows(data):
    # exact log evidence: x ~ N(0, I + 11^T)
    cov = torch.eye(N) + torch.ones(N, N)
    exact = float(dist.MultivariateNormal(torch.zeros(N), cov).log_prob(data))
    runner = SVIRunner(
        model,
        guide,
        adam(0.1),
        BetaMeanFieldELBO(),
        progress_bar=False,
        evaluation=Evaluation(every=100, num_samples=2000),
    )
    h = runner.run(data, num_steps=200).history
    rows = h[h["eval_log_evidence"].notna()]
    assert rows["step"].tolist() == [99, 199]
    last = rows.iloc[-1]
    # importance sampling from a near-exact guide: within 5 delta-method standard errors
    # (measured |error| <= 2.6 of them over seeds 0-5; the log-mean's own bias, about
    # -se^2/2 = -5e-5 nats, is far below)
    assert last["eval_log_evidence"] == pytest.approx(exact, abs=5 * last["eval_log_evidence_stderr"])
    assert last["eval_pareto_k"] < 0.7  # Vehtari et al.'s reliability threshold
    # the gap estimates KL(q || p(z|x)) of the final guide N(mu, sig^2) from the exact
    # posterior N(m, s^2), in closed form. Its error is that of the log evidence plus that of
    # the mean of log w over S draws; with z = mu + sig * eps, log w = const + a eps^2 + b eps,
    # a = (1 - sig^2/s^2)/2, b = -sig (mu - m)/s^2, so sd(log w) = sqrt(2 a^2 + b^2).
    # 5 of the summed standard errors (measured |error| <= 0.5 of them over seeds 0-7).
    m, s = exact_posterior(data)
    mu, sig = float(pyro.param("loc").detach()), float(pyro.param("scale").detach())
    kl = math.log(s / sig) + (sig**2 + (mu - m) ** 2) / (2 * s**2) - 0.5
    a, b = (1 - sig**2 / s**2) / 2, -sig * (mu - m) / s**2
    se = last["eval_log_evidence_stderr"] + math.sqrt(2 * a**2 + b**2) / math.sqrt(2000)
    assert last["eval_gap"] == pytest.approx(kl, abs=5 * se)
    assert h["eval_gap"].isna().sum() == 198


def test_a_model_warning_shows_once_per_run(data):
    # regression: the runner entered warnings.catch_warnings() on every step, which resets
    # Python's warning registry, so a "default" (once per location) warning fired each step
    def chatty(x):
        warnings.warn("model says hi", UserWarning, stacklevel=1)
        model(x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        SVIRunner(chatty, guide, adam(), progress_bar=False).run(data, num_steps=5)
    assert [str(w.message) for w in caught] == ["model says hi"]


def test_evaluation_with_batches_needs_eval_args_before_any_step(data):
    # regression: the missing eval_args was reported only at the first evaluation, after
    # evaluate_every steps of training (here never: 3 steps < evaluate_every)
    runner = SVIRunner(model, guide, adam(), progress_bar=False, evaluation=Evaluation(every=10))
    with pytest.raises(ValueError, match=r"Evaluation\(every=10\) with batches needs Evaluation.args"):
        runner.run(num_steps=3, batches=[data])
    assert list(pyro.get_param_store().keys()) == []


def test_model_kwargs_reach_the_model(data):
    # a model keyword passed as model_kwargs, including one named like an option
    # (num_samples), reaches the model at every step: the recorded reconstruction is the
    # log-likelihood under lik_scale=2 at the z the guide drew
    seen = []

    def m(x, lik_scale=1.0, num_samples=None):
        assert num_samples == 7
        model(x, lik_scale=lik_scale)

    def g(x, lik_scale=1.0, num_samples=None):
        loc = pyro.param("loc", torch.tensor(0.0))
        seen.append(pyro.sample("z", dist.Normal(loc, 1.0)).detach())

    kwargs = {"lik_scale": 2.0, "num_samples": 7}
    result = SVIRunner(m, g, adam(), progress_bar=False).run(data, num_steps=2, model_kwargs=kwargs)
    for step, z in enumerate(seen):
        expected = float(dist.Normal(z, 2.0).log_prob(data).sum())
        assert result.history["reconstruction"][step] == pytest.approx(expected, rel=1e-12)
    assert result.model_kwargs == kwargs and result.args == (data,)
    with pytest.raises(ValueError, match="model_kwargs must be a dict"):
        SVIRunner(m, g, adam(), progress_bar=False).run(data, num_steps=1, model_kwargs=[("lik_scale", 2.0)])


def test_from_svi_result_keeps_the_run_data_with_keyword_arguments(data):
    # regression: keyword arguments alone replaced the run's data, so the model got no x
    result = SVIRunner(model, guide, adam(), progress_bar=False).run(data, num_steps=2)
    idata = from_svi_result(result, num_samples=10, model_kwargs={"lik_scale": 2.0})
    z = torch.as_tensor(idata.posterior["z"].values)
    # log p(x_i | z) = Normal(z, 2).log_prob(x_i) in closed form at the stored draws
    expected = dist.Normal(z.unsqueeze(-1), 2.0).log_prob(data).numpy()
    assert idata.log_likelihood["x"].values == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="chain must be an integer in \\[0, 1\\)"):
        SVIRunner(model, guide, adam(), progress_bar=False).run(data, num_steps=1).chain_history(5)
    with pytest.raises(ValueError, match="pyro.optim"):
        SVIRunner(model, guide, torch.optim.Adam)
    with pytest.raises(ValueError, match="on_nonfinite"):
        SVIRunner(model, guide, adam(), on_nonfinite="ignore")
    with pytest.raises(ValueError, match="convergence must be a Convergence"):
        SVIRunner(model, guide, adam(), convergence=1e-3)
    with pytest.raises(ValueError, match=r"Convergence.rhat must be a finite number > 1 \(e.g. 1.1\), got rhat=0.9"):
        Convergence(rhat=0.9)
    with pytest.raises(ValueError, match=r"Convergence.window must be an integer >= 1"):
        Convergence(window=0)
    with pytest.raises(ValueError, match=r"Evaluation.every must be an integer >= 1"):
        Evaluation(every=0)
    with pytest.raises(ValueError, match=r"Evaluation.args must be a tuple"):
        Evaluation(every=5, args=data)
    with pytest.raises(ValueError, match="max_time"):
        SVIRunner(model, guide, adam(), max_time=-1.0)
    with pytest.raises(ValueError, match="seed"):
        SVIRunner(model, guide, adam(), seed=-1)
    with pytest.raises(ValueError, match="num_steps"):
        SVIRunner(model, guide, adam()).run(data, num_steps=-1)
    with pytest.raises(ValueError, match="num_chains"):
        SVIRunner(model, guide, adam(), num_chains=0)


class _FakeTerminal:
    def __init__(self):
        import io

        self.buffer = io.StringIO()

    def isatty(self):
        return True

    def write(self, text):
        return self.buffer.write(text)

    def flush(self):
        pass


def test_progress_bar_only_on_a_terminal(data, monkeypatch, capsys):
    SVIRunner(model, guide, adam(), progress_bar=True).run(data, num_steps=3)
    assert capsys.readouterr().err == ""  # pytest's stderr is not a terminal
    terminal = _FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    SVIRunner(model, guide, adam(), progress_bar=True).run(data, num_steps=3)
    shown = terminal.buffer.getvalue()
    assert "3/3" in shown and "loss=" in shown and "kl=" in shown and "β=" in shown
    terminal = _FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    SVIRunner(model, guide, adam(), progress_bar=False).run(data, num_steps=3)
    assert terminal.buffer.getvalue() == ""
