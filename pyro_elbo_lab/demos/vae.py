# SPDX-License-Identifier: Apache-2.0
"""
A β-VAE on scikit-learn's bundled handwritten digits (1797 images of 8×8 pixel counts in
0..16), comparing KL weightings: constant β = 1 (the ELBO), linear warm-up, cyclical
annealing and β = 4.

Model, per image :math:`x_n \\in \\{0..16\\}^{64}`:

.. math::

    z_n \\sim \\mathcal N(0, I_L), \\qquad
    x_{n,i} \\sim \\mathrm{Binomial}(16, \\sigma(f_\\theta(z_n)_i)),

with an MLP decoder :math:`f_\\theta` and an amortised Gaussian guide
:math:`q_\\phi(z_n \\mid x_n)`. The Binomial is the exact likelihood of the pixel counts,
so log-likelihoods are in nats per image of the original data.

Held-out evaluation (300 images): reconstruction :math:`\\mathbb E_q \\log p(x|z)` and
KL :math:`(q(z|x) \\| p(z))` per image (the rate–distortion point), active units
(Burda et al. 2016) and the per-image IWAE log-likelihood
:math:`\\log \\frac1S \\sum_s p(x_n, z_s)/q(z_s|x_n)`.

References

[1] `beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework`,
    Irina Higgins et al. (2017)

[2] `Cyclical Annealing Schedule: A Simple Approach to Mitigating KL Vanishing`, Hao Fu,
    Chunyuan Li, Xiaodong Liu, Jianfeng Gao, Asli Celikyilmaz, Lawrence Carin (2019)

[3] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016)

[4] `Fixing a Broken ELBO`, Alexander A. Alemi, Ben Poole, Ian Fischer, Joshua V. Dillon,
    Rif A. Saurous, Kevin Murphy (2018)
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..datasets import load_digits
from ..diagnostics import ImportanceSamplingWarning, estimate_evidence, posterior_collapse, rate_distortion
from ..inference_data import from_svi_result
from ..losses import BetaMeanFieldELBO
from ..runner import SVIResult, SVIRunner
from ..schedules import Cyclical, LinearWarmup
from .common import Report, fit_converged, output_file, pyplot, seed_everything
from .wording import SMOKE_RUN_NOTE, collapse_criteria, collapse_summary, vae_comparison

__all__ = ["BetaConfig", "DigitsVAE", "VAEStudy", "beta_configs", "evaluate", "fit", "load_split", "run", "run_study"]

TOTAL_COUNT = 16  # pixel counts are in 0..16
NUM_TEST = 300


class DigitsVAE(nn.Module):
    """
    A small VAE for 8×8 digits with a Binomial(16) likelihood.

    :param int latent_dim: L, dimensions of :math:`z`.
    :param int hidden_dim: width of the one hidden layer of encoder and decoder.
    :param str name: prefix of its parameters in Pyro's parameter store, so that several
        VAEs can live side by side.
    """

    def __init__(self, latent_dim: int = 16, hidden_dim: int = 128, name: str = "vae"):
        super().__init__()
        self.latent_dim = latent_dim
        self.name = name
        self.encoder = nn.Sequential(nn.Linear(64, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.Softplus(), nn.Linear(hidden_dim, 64))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Guide parameters for images ``x`` of shape ``(N, 64)``: loc and scale, each ``(N, L)``."""
        h = self.encoder(x / TOTAL_COUNT)
        loc, raw = h.split(self.latent_dim, -1)
        return loc, nn.functional.softplus(raw) + 1e-4

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits, shape ``(..., 64)``."""
        return self.decoder(z)

    def _plate(self, x: torch.Tensor, num_data: int | None) -> pyro.plate:
        # a minibatch of a data set of num_data images: Pyro scales its log_prob by num_data / len(x)
        if num_data is None:
            return pyro.plate("data", x.shape[0], dim=-1)
        return pyro.plate("data", num_data, subsample=torch.arange(x.shape[0]), dim=-1)

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """
        :param torch.Tensor x: images, shape ``(N, 64)``, counts in 0..16.
        :param int num_data: size of the whole data set when ``x`` is a minibatch.
        """
        pyro.module(f"{self.name}.decoder", self.decoder)
        with self._plate(x, num_data):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent_dim]).to_event(1))
            pyro.sample("x", dist.Binomial(TOTAL_COUNT, logits=self.decode(z)).to_event(1), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """
        The amortised mean-field guide :math:`q_\\phi(z_n \\mid x_n) = \\mathcal N(\\mu_\\phi(x_n),
        \\mathrm{diag}\\,\\sigma_\\phi(x_n)^2)`, from :meth:`encode`.

        :param torch.Tensor x: images, shape ``(N, 64)``, counts in 0..16.
        :param int num_data: size of the whole data set when ``x`` is a minibatch.
        """
        pyro.module(f"{self.name}.encoder", self.encoder)
        with self._plate(x, num_data):
            loc, scale = self.encode(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


@dataclass
class BetaConfig:
    """One arm of the study: a name, a label for reports and a β (number or schedule)."""

    name: str
    label: str
    beta: Any


def beta_configs(num_steps: int) -> list[BetaConfig]:
    """
    The four KL weightings compared, for a run of ``num_steps`` steps: β = 1, a linear
    warm-up 0 → 1 over the first half, a cyclical schedule (4 cycles over the first 80%,
    then 1) and β = 4.

    :param int num_steps: optimisation steps of the run the schedules are sized for.
    :returns: four :class:`BetaConfig` s, named ``beta1``, ``warmup``, ``cyclical``, ``beta4``.

    References

    [1] `beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework`,
        Irina Higgins et al. (2017)

    [2] `Cyclical Annealing Schedule: A Simple Approach to Mitigating KL Vanishing`, Hao
        Fu, Chunyuan Li, Xiaodong Liu, Jianfeng Gao, Asli Celikyilmaz, Lawrence Carin (2019)
    """
    return [
        BetaConfig("beta1", "β = 1 (ELBO)", 1.0),
        BetaConfig("warmup", "linear warm-up 0→1", LinearWarmup(num_steps=max(1, num_steps // 2))),
        BetaConfig("cyclical", "cyclical, 4 cycles", Cyclical(num_steps=max(1, (4 * num_steps) // 5), num_cycles=4)),
        BetaConfig("beta4", "β = 4", 4.0),
    ]


def load_split(seed: int = 0, num_test: int = NUM_TEST) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The digits, shuffled with ``seed`` and split into training and held-out images.

    :param int seed: seed of the shuffle.
    :param int num_test: held-out images.
    :returns: ``(x_train, x_test, labels_test)``: pixel counts of shapes
        ``(1797 - num_test, 64)`` and ``(num_test, 64)``, and the digits (0..9) of the
        held-out images, shape ``(num_test,)``.
    :raises MissingExtraError: without scikit-learn (install ``pyro-elbo-lab[examples]``).
    """
    x, labels, _, _ = load_digits()
    if labels is None:  # load_digits always gives the digits; Dataset.target is optional in general
        raise ValueError("load_split: the digits data set came without its labels (Dataset.target is None)")
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    x, labels = x[perm], labels[perm]
    return x[num_test:], x[:num_test], labels[:num_test]


def minibatches(x: torch.Tensor, batch_size: int, seed: int = 0) -> Callable[[int], tuple]:
    """
    ``batches(step) -> (x_batch,)``: shuffled epochs of ``x`` (a fresh permutation per
    epoch, reproducible from ``seed``), for :meth:`~pyro_elbo_lab.SVIRunner.run`.
    """
    per_epoch = max(1, x.shape[0] // batch_size)
    current: dict[str, Any] = {"epoch": None, "perm": None}  # one permutation per epoch, made when it starts

    def batches(step: int) -> tuple:
        epoch, i = divmod(step, per_epoch)
        if current["epoch"] != epoch:
            generator = torch.Generator().manual_seed(seed * 100003 + epoch)
            current["epoch"], current["perm"] = epoch, torch.randperm(x.shape[0], generator=generator)
        return (x[current["perm"][i * batch_size : (i + 1) * batch_size]],)

    return batches


def fit(
    config: BetaConfig,
    x_train: torch.Tensor,
    num_steps: int,
    seed: int = 0,
    progress_bar: bool = True,
    latent_dim: int = 16,
    batch_size: int = 100,
) -> tuple[DigitsVAE, SVIResult]:
    """
    Train one VAE with :class:`~pyro_elbo_lab.BetaMeanFieldELBO` (analytic KL) on
    minibatches of the training set, with :class:`~pyro_elbo_lab.SVIRunner` and Adam
    (learning rate 3e-3).

    :param BetaConfig config: the KL weighting (β or a schedule); its ``name`` prefixes
        the VAE's parameters in Pyro's param store.
    :param torch.Tensor x_train: training images, shape ``(N, 64)``, counts in 0..16.
    :param int num_steps: optimisation steps (one minibatch each).
    :param int seed: seeds the initial weights, the particles and the minibatch order.
    :param bool progress_bar: show a progress bar.
    :param int latent_dim: L, dimensions of :math:`z`.
    :param int batch_size: images per minibatch.
    :returns: ``(vae, result)``: the trained :class:`DigitsVAE` and the
        :class:`~pyro_elbo_lab.SVIResult`; ``result.history`` is per step, in nats for the
        whole training set (Pyro's minibatch scaling).
    """
    pyro.set_rng_seed(seed)
    vae = DigitsVAE(latent_dim=latent_dim, name=config.name)
    loss = BetaMeanFieldELBO(beta=config.beta, max_plate_nesting=1)
    runner = SVIRunner(
        vae.model,
        vae.guide,
        pyro.optim.PyroOptim(torch.optim.Adam, {"lr": 3e-3}),
        loss,
        progress_bar=progress_bar,
        seed=seed,
    )
    result = runner.run(
        num_steps=num_steps, batches=minibatches(x_train, batch_size, seed), model_kwargs={"num_data": x_train.shape[0]}
    )
    return vae, result


def evaluate(vae: DigitsVAE, x_test: torch.Tensor, num_samples: int = 500) -> dict:
    """
    Held-out diagnostics of one VAE, all in nats per image.

    :param DigitsVAE vae: a trained VAE.
    :param torch.Tensor x_test: held-out images, shape ``(N, 64)``, counts in 0..16.
    :param int num_samples: importance samples per image for the IWAE bound.
    :returns: dict with ``reconstruction``, ``kl`` (rate), ``distortion``, ``elbo`` (64
        draws of q per image), ``iwae`` (mean per-image IWAE log-likelihood),
        ``iwae_stderr`` (over images), ``iwae_per_image`` (tensor of shape ``(N,)``),
        ``active_units``, ``kl_per_dimension`` (tensor of shape ``(L,)``), ``collapse`` (a
        :class:`~pyro_elbo_lab.CollapseReport`) and ``rate_distortion`` (a
        :class:`~pyro_elbo_lab.RateDistortion`).

    References

    [1] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan
        Salakhutdinov (2016)

    [2] `Fixing a Broken ELBO`, Alexander A. Alemi, Ben Poole, Ian Fischer, Joshua V.
        Dillon, Rif A. Saurous, Kevin Murphy (2018)
    """
    rd = rate_distortion(vae.model, vae.guide, x_test, plate="data", num_samples=64, max_plate_nesting=1)
    collapse = posterior_collapse(vae.model, vae.guide, x_test, plate="data", num_samples=16, max_plate_nesting=1)
    with warnings.catch_warnings():  # the per-image k̂ is reported, not warned about
        warnings.simplefilter("ignore", ImportanceSamplingWarning)
        evidence = estimate_evidence(
            vae.model,
            vae.guide,
            x_test,
            num_samples=num_samples,
            batch_size=100,
            per_datapoint="data",
            max_plate_nesting=1,
        )
    per_image = evidence.log_evidence_per_datapoint
    if per_image is None:  # set whenever per_datapoint is given
        raise ValueError("evaluate: estimate_evidence(per_datapoint='data') returned no per-image log evidence")
    return {
        "reconstruction": -rd.distortion,
        "kl": rd.rate,
        "distortion": rd.distortion,
        "elbo": rd.elbo,
        "rate_distortion": rd,
        "iwae": per_image.mean().item(),
        "iwae_stderr": (per_image.std() / per_image.shape[0] ** 0.5).item(),
        "iwae_per_image": per_image,
        "active_units": collapse.active_units,
        "kl_per_dimension": collapse.kl_per_dimension,
        "collapse": collapse,
    }


@dataclass
class VAEStudy:
    """What :func:`run_study` found: one row per β configuration, and the fitted models."""

    table: pd.DataFrame
    configs: list[BetaConfig]
    vaes: dict[str, DigitsVAE]
    results: dict[str, Any]
    evaluations: dict[str, dict]
    x_test: torch.Tensor
    num_steps: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def run_study(
    quick: bool = False,
    seed: int = 0,
    steps: int | None = None,
    progress_bar: bool = True,
    log: Callable[[str], None] = print,
) -> VAEStudy:
    """
    Train the four configurations of :func:`beta_configs` and evaluate them on held-out
    images with :func:`evaluate`.

    :param bool quick: 60 steps and 32 importance samples instead of 2000 and 500.
    :param int seed: random seed (data split, weights, minibatches, particles).
    :param int steps: optimisation steps per configuration, overriding the default.
    :param bool progress_bar: show progress bars.
    :param log: called with one line of text per configuration.
    :returns: a :class:`VAEStudy`; its ``table`` has one row per configuration, in nats
        per held-out image.
    :raises MissingExtraError: without scikit-learn (install ``pyro-elbo-lab[examples]``).
    """
    seed_everything(seed)
    num_steps = steps or (60 if quick else 2000)
    num_samples = 32 if quick else 500
    x_train, x_test, _ = load_split(seed)
    configs = beta_configs(num_steps)
    vaes, results, evaluations, rows = {}, {}, {}, {}
    start = time.perf_counter()
    for config in configs:
        log(f"training {config.label}: {num_steps} steps, minibatches of 100 of {x_train.shape[0]} images")
        vae, result = fit(config, x_train, num_steps, seed, progress_bar)
        ev = evaluate(vae, x_test, num_samples)
        vaes[config.name], results[config.name], evaluations[config.name] = vae, result, ev
        rows[config.label] = {
            "reconstruction": ev["reconstruction"],
            "KL (rate)": ev["kl"],
            "ELBO": ev["elbo"],
            "IWAE log p(x)": ev["iwae"],
            "± se": ev["iwae_stderr"],
            "active units": f"{ev['active_units']}/{vae.latent_dim}",
            "collapsed": f"{int((ev['kl_per_dimension'] < ev['collapse'].threshold / 2).sum())}/{vae.latent_dim}",
            "training": "converged" if _converged(result) else "NOT CONVERGED",
        }
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "KL weighting"
    study = VAEStudy(table, configs, vaes, results, evaluations, x_test, num_steps, time.perf_counter() - start)
    study.extra["quick"] = quick
    study.extra["num_train"] = x_train.shape[0]
    return study


def _converged(result: SVIResult) -> bool:
    """Whether the runner judged the (only) chain's objective stationary at its end, and not rising."""
    return fit_converged(result)[0]


def comparison(study: VAEStudy) -> str:
    """
    What the held-out numbers say, in words, from the numbers
    (:func:`~pyro_elbo_lab.demos.wording.vae_comparison`).
    """
    ev = study.evaluations
    names = [c.name for c in study.configs]
    return vae_comparison(
        labels={c.name: c.label for c in study.configs},
        iwae_per_image={n: ev[n]["iwae_per_image"].tolist() for n in names},
        converged={n: _converged(study.results[n]) for n in names},
        rate={n: ev[n]["kl"] for n in names},
        reconstruction={n: ev[n]["reconstruction"] for n in names},
    )


def collapse_text(study: VAEStudy) -> list[str]:
    """One line per weighting: active units and collapsed dimensions under one stated pair of criteria."""
    lines = []
    for c in study.configs:
        report = study.evaluations[c.name]["collapse"]
        lines.append(
            collapse_summary(
                c.label,
                report.kl_per_dimension.tolist(),
                report.activity.tolist(),
                report.threshold,
                list(report.dimensions),
            )
        )
    return lines


# ----------------------------------------------------------------------------------------
# the demo: report and files
# ----------------------------------------------------------------------------------------


def write_outputs(study: VAEStudy, output: str, report: Report) -> list[str]:
    """PNG plots and one netCDF InferenceData per configuration; returns the paths."""
    from .figures import vae_decomposition, vae_images, vae_rate_distortion

    plt = pyplot()
    os.makedirs(output, exist_ok=True)
    paths = []
    path = os.path.join(output, "vae_decomposition.png")
    with output_file(path) as tmp:
        converged = {c.name: _converged(study.results[c.name]) for c in study.configs}
        vae_decomposition(plt, study, tmp, converged=converged)
    paths.append(path)
    report.image(path, "ELBO decomposition over training, nats per image, per KL weighting")
    path = os.path.join(output, "vae_rate_distortion.png")
    with output_file(path) as tmp:
        vae_rate_distortion(plt, study, tmp)
    paths.append(path)
    report.image(path, "Rate-distortion points on held-out images, one per KL weighting")
    x = study.x_test[:10]
    for config in study.configs:
        path = os.path.join(output, f"vae_{config.name}_images.png")
        with output_file(path) as tmp:
            vae_images(plt, study.vaes[config.name], x, config.label, tmp)
        paths.append(path)
        report.image(
            path, f"{config.label}: rows are held-out images, their reconstructions, and samples from the prior"
        )
        idata = from_svi_result(study.results[config.name], x, num_samples=100)
        path = os.path.join(output, f"vae_{config.name}.nc")
        with output_file(path) as tmp:
            idata.to_netcdf(tmp)
        paths.append(path)
    return paths


def run(
    output: str,
    quick: bool = False,
    seed: int = 0,
    steps: int | None = None,
    verbose: bool = True,
    progress_bar: bool = True,
) -> VAEStudy:
    """
    ``pyro-elbo-lab demo vae``: the study, printed, with plots, netCDF and ``report.md``
    in ``output``.

    :param str output: directory for the files (created if missing).
    :param bool quick: a smoke run (see :func:`run_study`).
    :param int seed: random seed.
    :param int steps: optimisation steps per configuration, overriding the default.
    :param bool verbose: print the report as it is made.
    :param bool progress_bar: show progress bars (only when ``verbose``).
    :returns: the :class:`VAEStudy` that the report shows.
    :raises MissingExtraError: without scikit-learn or matplotlib (install
        ``pyro-elbo-lab[examples]``).
    """
    report = Report(verbose)
    report.heading("pyro-elbo-lab demo: a β-VAE on handwritten digits", 1)
    if quick:
        report.text("SMOKE RUN (--quick): a few steps per configuration, far from converged; no conclusions are drawn.")
    report.text(
        "1797 scikit-learn digits (8x8, pixel counts 0..16, Binomial likelihood), 300 held out; "
        "latent dimension 16; four KL weightings. All numbers in nats per held-out image."
    )
    log = report.text if verbose else (lambda text: None)
    study = run_study(quick, seed, steps, progress_bar=verbose and progress_bar, log=log)
    report.heading("Held-out results")
    report.table(study.table, "{:.2f}")
    threshold = study.evaluations[study.configs[0].name]["collapse"].threshold
    report.text(
        "Reconstruction = E_q log p(x|z) (higher is better), KL = rate in nats, ELBO = reconstruction - KL, "
        "IWAE = importance-weighted log p(x) per image (the tighter estimate of the model's fit; ± se over images). "
        "training: whether the runner judged the objective's trace stationary over the last steps. "
        + collapse_criteria(threshold)
    )
    report.heading("KL per latent dimension (nats per image)")
    kl_dims = pd.DataFrame(
        {c.label: study.evaluations[c.name]["kl_per_dimension"].tolist() for c in study.configs},
        index=pd.Index([f"z[{i}]" for i in range(study.vaes[study.configs[0].name].latent_dim)], name="dimension"),
    ).T
    kl_dims.index.name = "KL weighting"
    report.table(kl_dims, "{:.3f}")
    report.heading("Active units and collapsed dimensions")
    for line in collapse_text(study):
        report.text("- " + line)
    report.heading("Conclusions, from the numbers above")
    report.text(SMOKE_RUN_NOTE if quick else comparison(study))
    report.finish(output, write_outputs(study, output, report), study.extra, note=f"trained in {study.seconds:.0f} s; ")
    return study
