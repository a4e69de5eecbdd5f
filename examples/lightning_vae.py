# SPDX-License-Identifier: Apache-2.0
"""
A β-VAE on handwritten digits with KL warm-up, trained data-parallel with PyTorch Lightning:
two CPU processes (DDP over gloo), each a shard of the data, gradients averaged.

The VAE, the data and the Binomial(16) likelihood are those of examples/beta_vae_digits.py
(pyro_elbo_lab.demos.vae). What changes for data parallelism:

- ``ELBOLightningModule(vae.model, vae.guide, BetaMeanFieldELBO(beta=LinearWarmup(...)))``
  wraps the loss; β follows the Trainer's optimiser steps, not the batches a rank sees;
- the model's data plate has ``size`` = the full training set and ``subsample`` = the local
  batch (``DigitsVAE.model(x, num_data=N)``), so each rank's loss estimates the full-data
  objective and DDP's average of the two gradients is not double-counted;
- the ELBO's terms are logged to CSV (train/elbo, train/reconstruction, train/kl, train/beta)
  averaged over the ranks, and rank 0 runs the diagnostics on the held-out images at the end
  (per-image IWAE evidence with Pareto k̂, active units).

Lightning starts this script a second time as rank 1; only rank 0 prints. On GPUs, pass
``accelerator="gpu", devices=k`` (NCCL); on several nodes, add ``num_nodes`` and launch one
copy per node (torchrun or a cluster scheduler): the module is the same.

    python examples/lightning_vae.py [--quick] [--seed N] [--steps N] [--output DIR]
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings

import pandas as pd
import torch

from pyro_elbo_lab.demos.common import Report, example_parser, seed_everything
from pyro_elbo_lab.demos.vae import DigitsVAE, load_split

_OUTPUT_ENV = "PYRO_ELBO_LAB_LIGHTNING_OUTPUT"  # rank 1 inherits rank 0's output folder


def main(
    quick: bool = False, seed: int = 0, steps: int | None = None, output: str | None = None, devices: int = 2
) -> dict:
    """
    Train the β-VAE with ``Trainer(strategy="ddp", devices=devices, accelerator="cpu")``.

    :param str output: folder for the CSV log (``metrics.csv``) and the checkpoint; default a
        fresh temporary folder.
    :returns: on rank 0, ``{"metrics": DataFrame of the log, "diagnostics": {name: value},
        "output": folder}``; on other ranks ``{}``.
    """
    import pytorch_lightning as pl

    from pyro_elbo_lab import BetaMeanFieldELBO, DiagnosticsCallback, ELBOLightningModule
    from pyro_elbo_lab.schedules import LinearWarmup

    # the loaders below have no worker processes on purpose (a tiny in-memory data set)
    warnings.filterwarnings("ignore", message=r".*does not have many workers")
    output = output or os.environ.get(_OUTPUT_ENV) or tempfile.mkdtemp(prefix="lightning_vae_")
    os.environ[_OUTPUT_ENV] = output
    seed_everything(seed)
    num_steps = steps or (30 if quick else 3000)
    batch_size = 100  # per rank: 2 x 100 images per optimiser step
    x_train, x_test, _ = load_split(seed)
    vae = DigitsVAE(latent_dim=16, hidden_dim=32 if quick else 128)
    loss = BetaMeanFieldELBO(beta=LinearWarmup(num_steps=max(1, num_steps // 2)))
    module = ELBOLightningModule(
        vae.model,
        vae.guide,
        loss,
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
        model_kwargs={"num_data": x_train.shape[0]},  # rule 4: plate size = full data
    )
    diagnostics = DiagnosticsCallback(x_test, num_samples=32 if quick else 500, per_datapoint="data", collapse=True)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x_train), batch_size=batch_size, shuffle=True, drop_last=True
    )
    trainer = pl.Trainer(
        strategy="ddp" if devices > 1 else "auto",
        devices=devices,
        accelerator="cpu",
        max_steps=num_steps,
        log_every_n_steps=5 if quick else 50,
        logger=pl.loggers.CSVLogger(output, name="", version=""),
        callbacks=[diagnostics],
        default_root_dir=output,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    if not trainer.is_global_zero:
        return {}

    report = Report(True)
    report.heading("β-VAE on handwritten digits, data-parallel with PyTorch Lightning", 1)
    report.text(
        f"{trainer.world_size} processes x {batch_size} images per optimiser step, {trainer.global_step} steps, "
        f"β warm-up over {max(1, num_steps // 2)} steps; log and checkpoint in {output}."
    )
    metrics = pd.read_csv(os.path.join(output, "metrics.csv"))
    train = metrics.dropna(subset=["train/elbo"]).set_index("step")
    table = pd.DataFrame({"β": train["train/beta"]})
    for name in ("elbo", "reconstruction", "kl"):  # logged for the full training set: per image here
        table[name] = train[f"train/{name}"] / x_train.shape[0]
    report.heading("Training terms, nats per training image (averaged over the ranks)")
    report.table(table.iloc[:: max(1, len(table) // 8)], "{:.2f}")
    ((_, result),) = diagnostics.results[-1:]
    report.heading("Held-out images, rank 0, nats per image")
    per_image = x_test.shape[0]
    report.text(
        f"IWAE log p(x) {result['diagnostics/log_evidence'] / per_image:.2f}, "
        f"ELBO {result['diagnostics/elbo'] / per_image:.2f}, Pareto k̂ {result['diagnostics/pareto_k']:.2f}, "
        f"active units {int(result['diagnostics/active_units'])} of 16."
    )
    return {"metrics": metrics, "diagnostics": result, "output": output}


if __name__ == "__main__":
    parser = example_parser(__doc__.strip().splitlines()[0], default_steps=3000)
    parser.add_argument("--output", default=None, help="folder for the CSV log (default: a temporary folder)")
    args = parser.parse_args()
    main(quick=args.quick, seed=args.seed, steps=args.steps, output=args.output)
