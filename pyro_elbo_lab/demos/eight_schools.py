# SPDX-License-Identifier: Apache-2.0
"""
Eight schools (Rubin 1981), the default of ``pyro-elbo-lab demo``: where variational
inference can be trusted and where it cannot.

.. math::

    \\mu \\sim \\mathcal N(0, 5^2), \\quad \\tau \\sim \\mathrm{HalfCauchy}(5), \\quad
    \\theta_j \\sim \\mathcal N(\\mu, \\tau^2), \\quad y_j \\sim \\mathcal N(\\theta_j, \\sigma_j^2),
    \\qquad j = 1..8,

in the centred form above and the non-centred form
:math:`\\tilde\\theta_j \\sim \\mathcal N(0, 1)`, :math:`\\theta_j = \\mu + \\tau \\tilde\\theta_j`.
Both are fitted with a mean-field and a full-rank Gaussian guide (in the unconstrained
space). Both forms define the same marginal likelihood :math:`p(y)`, which is computed
here to quadrature precision (μ and θ integrate out in closed form, τ numerically), so
every guide's evidence estimate is checked against the same exact number. Posterior
means and sds are set beside the NUTS reference bundled with ArviZ
(``az.load_arviz_data("non_centered_eight")``) and the exact values for μ and τ.

References

[1] `Estimation in Parallel Randomized Experiments`, Donald B. Rubin (1981)

[2] `Yes, but Did It Work?: Evaluating Variational Inference`, Yuling Yao, Aki Vehtari,
    Daniel Simpson, Andrew Gelman (2018)

[3] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew Gelman,
    Yuling Yao, Jonah Gabry (2024)

[4] `A General Framework for the Parametrization of Hierarchical Models`, Omiros
    Papaspiliopoulos, Gareth O. Roberts, Martin Sköld (2007)

[5] `Bayesian Data Analysis` (3rd edition), §5.5 "Parallel experiments in eight schools",
    Andrew Gelman, John B. Carlin, Hal S. Stern, David B. Dunson, Aki Vehtari, Donald B.
    Rubin (2013)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyro

from ..datasets import EIGHT_SCHOOLS_NAMES, EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y, eight_schools
from ..diagnostics import ImportanceSamplingWarning, estimate_evidence, guide_moments
from ..losses import BetaELBO
from ..runner import Convergence, SVIResult, SVIRunner
from .common import Report, fit_converged, seed_everything
from .eight_schools_exact import ExactReference, exact_intervals, exact_reference, nuts_reference, rename_schools
from .eight_schools_models import FAMILY, GUIDES, MODELS, centered, non_centered
from .wording import FitFacts, evidence_cell, fit_status

__all__ = [
    "ExactReference",
    "Fit",
    "centered",
    "exact_intervals",
    "exact_reference",
    "fit",
    "nuts_reference",
    "non_centered",
    "run",
    "run_fits",
]


# ----------------------------------------------------------------------------------------
# fitting and diagnostics
# ----------------------------------------------------------------------------------------


#: The stopping rule of every fit; ``num_steps`` is only the cap.
CONVERGENCE = Convergence(window=1000, rhat=1.1, average=1000)
#: ClippedAdam's constant learning rate.
LEARNING_RATE = 0.02
#: Step caps: a fit that reaches its cap is reported as not converged.
STEP_CAP, QUICK_STEP_CAP = 6000, 400


def _evidence(result: SVIResult, chain: int = 0) -> str:
    """The convergence rule's own account of a chain (its statistics in words), or ``""``."""
    records = getattr(result, "convergence", None) or []
    return str(records[chain].get("reason", "")) if chain < len(records) and records[chain] else ""


@dataclass
class Fit:
    """One (parametrisation, guide) fit and its diagnostics."""

    name: str
    model_name: str
    guide_name: str
    guide: Any
    result: Any
    terms: Any
    evidence: Any
    idata: Any
    summary: pd.DataFrame
    seconds: float
    moments: Any = None
    cap: int = 0

    @property
    def converged(self) -> bool:
        """Whether the fit converged (:func:`~pyro_elbo_lab.demos.common.fit_converged`)."""
        return fit_converged(self.result)[0]

    @property
    def steps(self) -> int:
        """Steps run."""
        return int(self.result.num_steps[0])

    @property
    def status(self) -> str:
        """``"converged (step N)"`` or ``"not converged (cap of N steps)"``."""
        converged, reason = fit_converged(self.result)
        return fit_status(converged, self.steps, self.cap, reason)


def fit(
    model_name: str,
    guide_name: str,
    num_steps: int,
    seed: int = 0,
    num_samples: int = 2000,
    progress_bar: bool = True,
    convergence: Convergence | None = None,
    learning_rate: float = LEARNING_RATE,
) -> Fit:
    """
    Fit one guide with :class:`~pyro_elbo_lab.SVIRunner` and :class:`~pyro_elbo_lab.BetaELBO`
    (β = 1, 8 vectorised particles) until ``convergence`` stops it or ``num_steps`` (the cap)
    is reached, then decompose the ELBO, estimate the evidence with PSIS, estimate the
    guide's own error (:func:`~pyro_elbo_lab.guide_moments`), and draw the guide's posterior
    as InferenceData.

    :param str model_name: a key of :data:`MODELS`: ``"centred"`` or ``"non-centred"``.
    :param str guide_name: a key of :data:`GUIDES`: ``"mean-field"`` or ``"full-rank"``.
    :param int num_steps: the step cap.
    :param int seed: random seed of the run.
    :param int num_samples: importance samples (at least 100), the same draws for
        :func:`~pyro_elbo_lab.estimate_evidence` and :func:`~pyro_elbo_lab.guide_moments`.
    :param bool progress_bar: show a progress bar while fitting.
    :param Convergence convergence: the stopping rule; None for :data:`CONVERGENCE`.
    :param float learning_rate: the constant step size of ClippedAdam.
    :returns: a :class:`Fit`: the guide, the :class:`~pyro_elbo_lab.SVIResult`, the ELBO's
        decomposition at the fitted guide (1000 particles, nats), the evidence estimate
        with k̂, the guide's moments against the PSIS-corrected ones, InferenceData (1000
        draws) and a mean/sd summary of μ, τ, θ.
    :raises ValueError: for a ``model_name`` or ``guide_name`` not listed above.

    References

    [1] `Bayesian Data Analysis` (3rd edition), §5.5 "Parallel experiments in eight
        schools", Andrew Gelman, John B. Carlin, Hal S. Stern, David B. Dunson, Aki
        Vehtari, Donald B. Rubin (2013)

    [2] `Yes, but Did It Work?: Evaluating Variational Inference`, Yuling Yao, Aki Vehtari,
        Daniel Simpson, Andrew Gelman (2018)
    """
    from .. import arviz_compat
    from ..inference_data import from_svi_result

    if model_name not in MODELS:
        raise ValueError(f"fit: model_name must be one of {', '.join(map(repr, MODELS))}, got {model_name!r}")
    if guide_name not in GUIDES:
        raise ValueError(f"fit: guide_name must be one of {', '.join(map(repr, GUIDES))}, got {guide_name!r}")
    pyro.clear_param_store()
    schools = eight_schools()
    sigma, y = schools.target, schools.data
    model = MODELS[model_name]
    guide = GUIDES[guide_name](model)
    loss = BetaELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    # a constant step size: the stationarity rule detects the phase in which the iterates
    # fluctuate around the optimum, which a decaying step size would freeze before reaching it
    optim = pyro.optim.ClippedAdam({"lr": learning_rate})
    start = time.perf_counter()
    rule = CONVERGENCE if convergence is None else convergence
    runner = SVIRunner(model, guide, optim, loss, progress_bar=progress_bar, seed=seed, convergence=rule)
    result = runner.run(sigma, y, num_steps=num_steps)
    seconds = time.perf_counter() - start
    terms = BetaELBO(num_particles=1000, vectorize_particles=True, max_plate_nesting=1).decompose(
        model, guide, sigma, y
    )
    with warnings.catch_warnings():  # k̂ and its verdict are reported
        warnings.simplefilter("ignore", ImportanceSamplingWarning)
        # the same draws for both (same seed, one batch), so both report the same k̂
        n = max(num_samples, 100)
        pyro.set_rng_seed(seed + 1)
        evidence = estimate_evidence(
            model, guide, sigma, y, psis=True, num_samples=n, batch_size=n, max_plate_nesting=1
        )
        pyro.set_rng_seed(seed + 1)
        moments = guide_moments(model, guide, sigma, y, num_samples=n, batch_size=n, max_plate_nesting=1)
    idata = from_svi_result(result, sigma, y, num_samples=1000, coords={"school": list(EIGHT_SCHOOLS_NAMES)})
    summary = rename_schools(
        arviz_compat.summary(idata, var_names=["mu", "tau", "theta"], diagnostics=False)[["mean", "sd"]]
    )
    name = f"{model_name}, {guide_name}"
    return Fit(
        name, model_name, guide_name, guide, result, terms, evidence, idata, summary, seconds, moments, num_steps
    )


def _by_fit(rows: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """A table with one row per fit, ``{fit name: {column: value}}``, indexed by ``fit``."""
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "fit"
    return frame


@dataclass
class EightSchools:
    """Everything :func:`run_fits` found."""

    fits: list[Fit]
    exact: ExactReference
    nuts: pd.DataFrame
    num_steps: int
    extra: dict = field(default_factory=dict)
    quick: bool = False

    def status_table(self) -> pd.DataFrame:
        """How each fit stopped: steps, status, seconds."""
        return _by_fit(
            {
                f.name: {"steps": f.steps, "status": f.status, "seconds": f.seconds, "evidence": _evidence(f.result)}
                for f in self.fits
            }
        )

    def diagnostics_table(self) -> pd.DataFrame:
        rows = {}
        for f in self.fits:
            ev = f.evidence
            rows[f.name] = {
                "ELBO": f.terms.elbo,
                "log p(y) est. ± se": evidence_cell(ev.log_evidence, ev.log_evidence_stderr, ev.pareto_k),
                "log p(y) exact": self.exact.log_evidence,
                "gap est.": ev.gap,
                "gap exact": self.exact.log_evidence - f.terms.elbo,
                "Pareto k̂": ev.pareto_k,
                "importance sampling": "reliable" if ev.pareto_k <= 0.7 else "unreliable",
                "fit": "converged" if f.converged else "NOT CONVERGED",
            }
        return _by_fit(rows)

    def decomposition_table(self) -> pd.DataFrame:
        rows = {}
        for f in self.fits:
            t = f.terms
            rows[f.name] = {
                "ELBO": t.elbo,
                "reconstruction": t.reconstruction,
                "KL(q||prior)": t.kl,
                "E log p(y,z)": t.expected_log_joint,
                "entropy": t.entropy,
                "se(ELBO)": t.stderr.get("elbo", float("nan")),
                "status": f.status,
            }
        return _by_fit(rows)

    def posterior_table(self) -> pd.DataFrame:
        frame = pd.DataFrame({"NUTS mean": self.nuts["mean"], "NUTS sd": self.nuts["sd"]})
        for f in self.fits:
            frame[f"{f.name} mean"] = f.summary["mean"]
            frame[f"{f.name} sd"] = f.summary["sd"]
        frame.index.name = "parameter"
        return frame

    def reference_errors(self, f: Fit) -> tuple[dict, dict]:
        """
        The guide's errors against the exact (quadrature) μ and τ and the NUTS θ:
        ``({parameter: standardised mean error}, {parameter: sd ratio})``; θ as the
        largest |error| and the ratio farthest from 1 over the schools.
        """
        m = f.moments
        guide = dict(zip(m.names, zip(m.guide_mean, m.guide_sd))) if m is not None else {}
        ex = self.exact
        err, ratio = {}, {}
        for p, mean, sd in (("mu", ex.mu_mean, ex.mu_sd), ("tau", ex.tau_mean, ex.tau_sd)):
            gm, gs = guide.get(p, (f.summary.loc[p, "mean"], f.summary.loc[p, "sd"]))
            err[p], ratio[p] = (float(gm) - mean) / sd, float(gs) / sd
        thetas = [i for i in f.summary.index if i.startswith("theta[")]
        e = [(f.summary.loc[i, "mean"] - self.nuts.loc[i, "mean"]) / self.nuts.loc[i, "sd"] for i in thetas]
        r = [f.summary.loc[i, "sd"] / self.nuts.loc[i, "sd"] for i in thetas]
        err["theta"] = float(max(e, key=abs))
        ratio["theta"] = float(max(r, key=lambda v: abs(v - 1)))
        return err, ratio

    def error_table(self) -> pd.DataFrame:
        """The guide's own error, estimated (PSIS) beside the error against the references."""
        rows = {}
        for f in self.fits:
            m = f.moments
            ok = m.reliable
            idx = {n: i for i, n in enumerate(m.names)}
            err, ratio = self.reference_errors(f)
            unknown = f"unknown (k̂ > {m.k_threshold:.2f})"

            def est(values, p, fmt="{:+.2f}", idx=idx, ok=ok, unknown=unknown):
                return fmt.format(values[idx[p]]) if ok else unknown

            rows[f.name] = {
                "fit": "converged" if f.converged else "NOT CONVERGED",
                "k̂": m.pareto_k,
                "μ mean err. est.": est(m.mean_error, "mu"),
                "μ mean err. exact": f"{err['mu']:+.2f}",
                "τ mean err. est.": est(m.mean_error, "tau"),
                "τ mean err. exact": f"{err['tau']:+.2f}",
                "τ sd ratio est.": est(m.sd_ratio, "tau", "{:.2f}"),
                "τ sd ratio exact": f"{ratio['tau']:.2f}",
                "θ worst mean err. (NUTS)": f"{err['theta']:+.2f}",
                "θ worst sd ratio (NUTS)": f"{ratio['theta']:.2f}",
            }
        return _by_fit(rows)

    def facts(self, f: Fit) -> FitFacts:
        """The numbers :func:`~pyro_elbo_lab.demos.wording.fit_conclusion` reads, for one fit."""
        m = f.moments
        err, ratio = self.reference_errors(f)
        if m.reliable:
            est_err = float(np.nanmax(np.abs(m.mean_error)))
            est_ratio = float(m.sd_ratio[int(np.nanargmax(np.abs(m.sd_ratio - 1)))])
        else:
            est_err = est_ratio = float("nan")
        return FitFacts(
            name=f.name,
            family=f"{FAMILY[f.guide_name]} ({f.model_name})",
            converged=f.converged,
            steps=f.steps,
            cap=f.cap,
            pareto_k=m.pareto_k,
            k_threshold=m.k_threshold,
            est_mean_error=est_err,
            est_sd_ratio=est_ratio,
            gap=self.exact.log_evidence - f.terms.elbo,
            ref_mean_error=err,
            ref_sd_ratio=ratio,
        )


def run_fits(
    quick: bool = False,
    seed: int = 0,
    steps: int | None = None,
    progress_bar: bool = True,
    log: Callable[[str], None] = print,
) -> EightSchools:
    """
    The four fits (centred / non-centred × mean-field / full-rank), each run until
    :data:`CONVERGENCE` stops it or the step cap is reached, and the references.

    :param bool quick: a smoke run: a cap of :data:`QUICK_STEP_CAP` steps (too few to
        converge) and 1000 importance samples per fit instead of :data:`STEP_CAP` and 4000.
    :param int seed: random seed (every fit starts from it).
    :param int steps: the step cap per fit, overriding the default.
    :param bool progress_bar: show progress bars.
    :param log: called with one line of text per fit.
    :returns: an :class:`EightSchools` with the four :class:`Fit` s, the
        :func:`exact_reference` and the :func:`nuts_reference`.

    References

    [1] `Bayesian Data Analysis` (3rd edition), §5.5 "Parallel experiments in eight
        schools", Andrew Gelman, John B. Carlin, Hal S. Stern, David B. Dunson, Aki
        Vehtari, Donald B. Rubin (2013)
    """
    seed_everything(seed)
    num_steps = steps or (QUICK_STEP_CAP if quick else STEP_CAP)
    num_samples = 1000 if quick else 4000
    fits = []
    for model_name in MODELS:
        for guide_name in GUIDES:
            f = fit(model_name, guide_name, num_steps, seed, num_samples, progress_bar)
            log(f"- {model_name} model, {guide_name} guide: {f.status}, {f.seconds:.0f} s")
            fits.append(f)
    return EightSchools(fits, exact_reference(), nuts_reference(), num_steps, quick=quick)


# ----------------------------------------------------------------------------------------
# the demo: report and files
# ----------------------------------------------------------------------------------------


def run(
    output: str,
    quick: bool = False,
    seed: int = 0,
    steps: int | None = None,
    verbose: bool = True,
    progress_bar: bool = True,
) -> EightSchools:
    """
    ``pyro-elbo-lab demo``: fits, report, plots, netCDF and ``report.md`` in ``output``.

    :param str output: directory for the files (created if missing).
    :param bool quick: a smoke run (see :func:`run_fits`): no conclusions are printed.
    :param int seed: random seed.
    :param int steps: the step cap per fit, overriding the default.
    :param bool verbose: print the report as it is made.
    :param bool progress_bar: show progress bars (only when ``verbose``).
    :returns: the :class:`EightSchools` study that the report shows.
    :raises MissingExtraError: without matplotlib (install ``pyro-elbo-lab[examples]``).

    References

    [1] `Bayesian Data Analysis` (3rd edition), §5.5 "Parallel experiments in eight
        schools", Andrew Gelman, John B. Carlin, Hal S. Stern, David B. Dunson, Aki
        Vehtari, Donald B. Rubin (2013)
    """
    report = Report(verbose)
    report.heading("pyro-elbo-lab demo: eight schools", 1)
    if quick:
        report.text("SMOKE RUN (--quick): the fits are capped far below convergence; no conclusions are drawn.")
    report.text(
        "y = "
        + ", ".join(f"{v:g}" for v in EIGHT_SCHOOLS_Y)
        + "; sigma = "
        + ", ".join(f"{v:g}" for v in EIGHT_SCHOOLS_SIGMA)
    )
    report.text(
        "mu ~ N(0, 5), tau ~ HalfCauchy(5), theta_j ~ N(mu, tau), y_j ~ N(theta_j, sigma_j); "
        "centred and non-centred, each with a mean-field (AutoNormal) and a full-rank "
        "(AutoMultivariateNormal) guide, fitted with SVIRunner and BetaELBO."
    )
    log = report.text if verbose else (lambda text: None)
    study = run_fits(quick, seed, steps, progress_bar=verbose and progress_bar, log=log)
    from .eight_schools_report import report_fits, write_outputs

    report_fits(study, report)
    report.finish(output, write_outputs(study, output, report), study.extra)
    return study
