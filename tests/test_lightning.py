# SPDX-License-Identifier: Apache-2.0
"""
ELBOLightningModule under PyTorch Lightning: two-process DDP (gloo, CPU), resume from a
checkpoint mid-warm-up, gradient accumulation, the diagnostics callback.

The model is a linear-Gaussian VAE, x_n ~ N(W z_n + b, σ² I), z_n ~ N(0, I), with the
amortised guide q(z_n | x_n) = N(A x_n + c, diag s²): its ELBO, KL and evidence have closed
forms, computed here by hand, which the logged values are checked against.

Run as a script (``python tests/test_lightning.py OUT``) it is the DDP worker: Lightning's
subprocess launcher starts it again as rank 1.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import subprocess
import sys
from typing import TYPE_CHECKING

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

pl = pytest.importorskip("pytorch_lightning")

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO  # noqa: E402
from pyro_elbo_lab.lightning import DiagnosticsCallback, ELBOLightningModule  # noqa: E402
from pyro_elbo_lab.schedules import LinearWarmup  # noqa: E402

if TYPE_CHECKING:
    import pandas as pd

N, D, L, SIGMA = 40, 3, 2, 0.5
WARMUP = 10  # steps of the β ramp 0 -> 1
PARTICLES = 64


def make_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    w = torch.tensor([[1.0, 0.0], [0.5, -1.0], [0.0, 2.0]])
    z = torch.randn(N, L, generator=g, dtype=torch.float64)
    return z @ w.T + 0.3 + SIGMA * torch.randn(N, D, generator=g, dtype=torch.float64)


class LinearGaussianVAE(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def init(*shape):
            return nn.Parameter(0.3 * torch.randn(*shape, generator=g, dtype=torch.float64))

        self.W, self.b = init(D, L), init(D)
        self.A, self.c, self.log_s = init(L, D), init(L), init(L)

    def _plate(self, x, num_data):
        if num_data is None:
            return pyro.plate("data", x.shape[0], dim=-1)
        return pyro.plate("data", num_data, subsample=torch.arange(x.shape[0]), dim=-1)

    def model(self, x, num_data=None):
        with self._plate(x, num_data):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([L]).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, SIGMA).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        with self._plate(x, num_data):
            pyro.sample("z", dist.Normal(x @ self.A.T + self.c, self.log_s.exp()).to_event(1))


@pytest.fixture(autouse=True)
def restore_module_local_params():
    """ELBOLightningModule turns module_local_params on for the process: undo it for other tests."""
    before = pyro.settings.get("module_local_params")
    yield
    pyro.settings.set(module_local_params=before)


# -- closed forms, written from the model's equations (no pyro_elbo_lab code) -------------------


def closed_form(state: dict, x: torch.Tensor) -> dict:
    """Full-data ELBO, KL and reconstruction, and log p(x), in nats, from raw parameters."""
    W, b, A, c, s = state["W"], state["b"], state["A"], state["c"], state["log_s"].exp()
    mu = x @ A.T + c
    resid = x - mu @ W.T - b
    rec = -0.5 * D * math.log(2 * math.pi * SIGMA**2) - ((resid**2).sum(-1) + (W**2 * s**2).sum()) / (2 * SIGMA**2)
    kl = (-s.log() + 0.5 * (s**2 + mu**2) - 0.5).sum(-1)
    cov = W @ W.T + SIGMA**2 * torch.eye(D)
    log_px = torch.distributions.MultivariateNormal(b, cov).log_prob(x)
    return {
        "reconstruction": rec.sum().item(),
        "kl": kl.sum().item(),
        "elbo": (rec - kl).sum().item(),
        "log_px": log_px.sum().item(),
    }


def reconstruction_mc_sd(state: dict, x: torch.Tensor, particles: int) -> float:
    """Standard deviation of a ``particles``-draw estimate of the full-data reconstruction."""
    W, b, A, c, s = state["W"], state["b"], state["A"], state["c"], state["log_s"].exp()
    z = x @ A.T + c + s * torch.randn(4000, N, L)
    rec = torch.distributions.Normal(z @ W.T + b, SIGMA).log_prob(x).sum((-1, -2))
    return rec.std().item() / math.sqrt(particles)


def warmup_beta(step: int) -> float:
    return min(step / WARMUP, 1.0)


# -- a run ------------------------------------------------------------------------------------------


class Snapshots(pl.Callback):
    """Parameters at the start of each optimiser step, and β of every micro-batch."""

    def __init__(self, reseed: bool = False):
        self.params, self.betas, self.reseed = {}, [], reseed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.reseed:  # the same Monte Carlo draws at a step, resumed or not
            pyro.set_rng_seed(1000 + trainer.global_step)
        self.params.setdefault(
            trainer.global_step, {k: v.detach().clone() for k, v in pl_module.owners[0].state_dict().items()}
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.betas.append(pl_module.loss.last_terms.beta)


def make_module(seed: int = 0, cls=ELBOLightningModule, **options):
    vae = LinearGaussianVAE(seed)
    loss = BetaMeanFieldELBO(
        beta=LinearWarmup(num_steps=WARMUP), num_particles=PARTICLES, vectorize_particles=True, max_plate_nesting=1
    )
    options.setdefault("model_kwargs", {"num_data": N})
    return cls(vae.model, vae.guide, loss, optimizer=functools.partial(torch.optim.Adam, lr=0.05), **options)


def trainer(out, max_steps: int, callbacks=(), **options):
    options = {
        "accelerator": "cpu",
        "devices": 1,
        "max_steps": max_steps,
        "logger": pl.loggers.CSVLogger(str(out), name="", version=""),
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        "num_sanity_val_steps": 0,
        **options,
    }
    return pl.Trainer(callbacks=list(callbacks), **options)


class Batches:
    """Fixed batches, in order: Lightning iterates it as it is (no sampler, no loader warnings)."""

    def __init__(self, x, batch_size):
        self.items = [(x[i : i + batch_size],) for i in range(0, x.shape[0], batch_size)]

    def __iter__(self):
        return iter(self.items)

    def __len__(self):
        return len(self.items)


batches = Batches


def read_metrics(out) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(os.path.join(str(out), "metrics.csv"))


DDP_STEPS = 60  # far enough for two runs' Monte Carlo noise to average out (spread ~0.1 nats)


def ddp_worker(out: str, steps: int = DDP_STEPS) -> None:
    """Two ranks, each a batch of N/2 (DistributedSampler); rank r writes rank{r}.pt."""
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    x = make_data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=N // 2)
    module, snaps = make_module(), Snapshots()
    t = trainer(out, steps, [snaps], strategy="ddp", devices=2, log_every_n_steps=5)
    t.fit(module, loader)
    state = {k: v.detach().clone() for k, v in module.owners[0].state_dict().items()}
    torch.save(
        {"state": state, "step": module.loss.step, "global_step": t.global_step, "params": snaps.params},
        os.path.join(out, f"rank{t.global_rank}.pt"),
    )


# -- tests ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning.*")
def test_ddp_two_processes_match_closed_form_and_single_process(tmp_path):
    steps = DDP_STEPS
    # both ranks started here at once (Lightning's own launcher would start rank 1 only after
    # rank 0 has imported everything; with LOCAL_RANK set it launches nothing)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0")
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(tmp_path)],
            env={**env, "LOCAL_RANK": str(r), "RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    # both ranks end with identical parameters, and the schedule followed the optimiser
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    for rank in ranks:
        assert rank["step"] == rank["global_step"] == steps
    # logged terms (averaged over ranks) vs the closed form at the parameters of that step
    x = make_data()
    metrics = read_metrics(tmp_path).dropna(subset=["train/elbo"])
    assert list(metrics["step"]) == list(range(4, steps, 5))
    for _, row in metrics.iterrows():
        step = int(row["step"])
        exact = closed_form(ranks[0]["params"][step], x)
        assert row["train/beta"] == pytest.approx(warmup_beta(step), abs=1e-12)
        assert row["train/kl"] == pytest.approx(exact["kl"], rel=1e-9)  # analytic KL: exact
        tol = 5 * reconstruction_mc_sd(ranks[0]["params"][step], x, PARTICLES)
        assert abs(row["train/reconstruction"] - exact["reconstruction"]) < tol
        assert abs(row["train/elbo"] - exact["elbo"]) < tol
    # the same effective batch (all N data per step) in one process
    pyro.set_rng_seed(0)
    module = make_module()
    trainer(tmp_path / "single", steps).fit(module, batches(x, N))
    single = closed_form({k: v.detach() for k, v in module.owners[0].state_dict().items()}, x)
    ddp = closed_form(ranks[0]["state"], x)
    start = closed_form(ranks[0]["params"][0], x)
    assert ddp["elbo"] - start["elbo"] > 200.0  # it trained (from -405 nats)
    # seeds 0..3 of the single-process run end within 0.15 nats of each other (sd 0.06)
    assert abs(ddp["elbo"] - single["elbo"]) < 0.5


def test_resume_mid_warmup_continues_beta_and_matches_uninterrupted_run(tmp_path):
    x = make_data()
    # one batch per epoch: where in an epoch a resumed Trainer starts is Lightning's business
    data = batches(x, N)
    module = make_module(seed=0)
    full = Snapshots(reseed=True)
    trainer(tmp_path / "full", 8, [full]).fit(module, data)
    uninterrupted = {k: v.detach().clone() for k, v in module.owners[0].state_dict().items()}

    first = make_module(seed=0)
    t = trainer(tmp_path / "first", 4, [Snapshots(reseed=True)])
    t.fit(first, data)
    t.save_checkpoint(tmp_path / "mid.ckpt")
    assert first.loss.step == 4 and first.loss.current_beta() == pytest.approx(0.4)

    resumed = make_module(seed=7)  # other initial values: the checkpoint must overwrite them
    second = Snapshots(reseed=True)
    t = trainer(tmp_path / "second", 8, [second])
    t.fit(resumed, data, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert resumed.loss.step == t.global_step == 8
    assert second.betas == pytest.approx([warmup_beta(s) for s in range(4, 8)], abs=1e-12)
    assert full.betas == pytest.approx([warmup_beta(s) for s in range(8)], abs=1e-12)
    for name, value in resumed.owners[0].state_dict().items():
        assert torch.allclose(value, uninterrupted[name], rtol=0, atol=1e-10), name


class ValidatedModule(ELBOLightningModule):
    def validation_step(self, batch, batch_idx):
        self.loss_module(*batch, num_data=N)  # a careless validation step: the loss counts a step
        self.evaluate(batch)


def test_accumulate_grad_batches_advances_beta_once_per_optimiser_step(tmp_path):
    x = make_data()
    snaps = Snapshots()
    module = make_module(val_model_kwargs={"num_data": N}, cls=ValidatedModule)
    t = trainer(tmp_path, 3, [snaps], accumulate_grad_batches=2, limit_val_batches=1, val_check_interval=2)
    t.fit(module, batches(x, N // 4), val_dataloaders=batches(x, N // 4))
    # six micro-batches, three optimiser steps: β(0), β(0), β(1), β(1), β(2), β(2)
    assert snaps.betas == pytest.approx([warmup_beta(s // 2) for s in range(6)], abs=1e-12)
    assert module.loss.step == t.global_step == 3
    metrics = read_metrics(tmp_path)
    logged = metrics.dropna(subset=["train/beta"]).groupby("step")["train/beta"].last()
    assert list(logged.index) == [0, 1, 2]
    assert list(logged) == pytest.approx([warmup_beta(s) for s in range(3)], abs=1e-12)
    # validation ran (and did not move β: see the betas above)
    assert metrics["val/elbo"].notna().any()


def test_diagnostics_callback_logs_evidence_between_elbo_and_log_px(tmp_path):
    x = make_data()
    module = make_module()
    callback = DiagnosticsCallback(
        x, model_kwargs={"num_data": N}, num_samples=500, per_datapoint="data", collapse=True
    )
    trainer(tmp_path, 30, [callback]).fit(module, batches(x, N))
    exact = closed_form({k: v.detach() for k, v in module.owners[0].state_dict().items()}, x)
    ((step, metrics),) = callback.results
    assert step == 30
    assert metrics["diagnostics/elbo"] == pytest.approx(
        exact["elbo"], abs=5 * metrics["diagnostics/elbo_stderr"] + 1e-6
    )
    tol = 5 * metrics["diagnostics/log_evidence_stderr"] + 1e-6
    assert exact["elbo"] - tol <= metrics["diagnostics/log_evidence"] <= exact["log_px"] + tol
    # collapse: the KL per datapoint (analytic for this guide) against the closed form
    assert metrics["diagnostics/collapse_kl"] == pytest.approx(exact["kl"] / N, rel=1e-9)
    logged = read_metrics(tmp_path).dropna(subset=["diagnostics/log_evidence"])
    assert list(logged["step"]) == [30]


def test_errors_name_the_problem():
    vae = LinearGaussianVAE()
    with pytest.raises(ValueError, match="loss must be one of pyro_elbo_lab's losses"):
        ELBOLightningModule(vae.model, vae.guide, pyro.infer.Trace_ELBO())
    with pytest.raises(ValueError, match="guide=.*neither a torch.nn.Module"):
        ELBOLightningModule(vae.model, lambda x: None, BetaELBO())
    with pytest.raises(ValueError, match="optimizer must be a callable"):
        ELBOLightningModule(vae.model, vae.guide, BetaELBO(), optimizer=pyro.optim.Adam({"lr": 0.1}))

    class GlobalParamVAE(LinearGaussianVAE):
        def guide(self, x, num_data=None):
            shift = pyro.param("shift", torch.zeros(L))  # in the global param store, in no module
            with self._plate(x, num_data):
                pyro.sample("z", dist.Normal(x @ self.A.T + shift, 1.0).to_event(1))

    bad = GlobalParamVAE()
    module = ELBOLightningModule(bad.model, bad.guide, BetaELBO())
    with pytest.raises(ValueError, match="param site 'shift' is not a parameter"):
        module.warm_up((make_data(),))


if __name__ == "__main__":
    ddp_worker(sys.argv[1])
