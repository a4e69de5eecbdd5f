# SPDX-License-Identifier: Apache-2.0
"""
Post-fit VI diagnostics: is the guide any good, and why.

- :func:`estimate_evidence`: importance-sampled log evidence, ELBO, the KL gap
  :math:`\\mathrm{KL}(q \\| p(z \\mid x))` and the PSIS k̂ of the weights.
- :mod:`.psis`: the importance-weight statistics (PSIS k̂ and its verdict, log mean
  weight, ESS, PSIS-corrected means), shared by every caller.
- :func:`posterior_collapse`: KL per latent dimension and active units of local latents.
- :func:`aggregate_posterior`: ELBO surgery and the β-TCVAE split of the average KL
  (index-code mutual information, total correlation, dimension-wise KL).
- :func:`~.rate_distortion.rate_distortion`, :func:`rate_distortion_sweep`: rate and distortion
  per datapoint.
- :func:`guide_moments`: the guide's mean and sd per latent element against the
  PSIS-corrected ones, its estimated standardised mean error and sd ratio, and a verdict.
- :func:`~.vsbc.vsbc`: variational simulation-based calibration (symmetry of the true parameters'
  quantiles under guides refitted to prior-predictive data).
"""

from __future__ import annotations

from .aggregate import AggregatePosteriorReport, aggregate_posterior
from .collapse import CollapseReport, posterior_collapse
from .evidence import EvidenceEstimate, ImportanceSamplingWarning, estimate_evidence
from .moments import GuideMoments, guide_moments
from .psis import (
    PARETO_K_BAD,
    PARETO_K_GOOD,
    importance_diagnostics,
    pareto_k_threshold,
    psis_diagnostics,
    psis_means,
    verdict,
)
from .rate_distortion import RateDistortion, rate_distortion, rate_distortion_sweep
from .vsbc import VSBCReport, vsbc

__all__ = [
    "PARETO_K_BAD",
    "PARETO_K_GOOD",
    "AggregatePosteriorReport",
    "CollapseReport",
    "EvidenceEstimate",
    "GuideMoments",
    "ImportanceSamplingWarning",
    "RateDistortion",
    "VSBCReport",
    "aggregate_posterior",
    "estimate_evidence",
    "guide_moments",
    "importance_diagnostics",
    "pareto_k_threshold",
    "posterior_collapse",
    "psis_diagnostics",
    "psis_means",
    "rate_distortion",
    "rate_distortion_sweep",
    "verdict",
    "vsbc",
]
