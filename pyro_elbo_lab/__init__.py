# SPDX-License-Identifier: Apache-2.0
"""
pyro-elbo-lab: β-weighted, free-bits and capacity ELBOs for Pyro that report the ELBO's
decompositions on every step, and the diagnostics that say whether a guide is any good.

The public API is flat: ``from pyro_elbo_lab import BetaELBO, estimate_evidence``.
Submodules are imported on first use, so ``import pyro_elbo_lab`` stays cheap and
optional dependencies (matplotlib, scikit-learn) are only needed by what uses them.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0.dev0"

# public name -> module that defines it
_EXPORTS = {
    # losses (objectives)
    "BetaELBO": "pyro_elbo_lab.losses",
    "BetaMeanFieldELBO": "pyro_elbo_lab.losses",
    "JitBetaELBO": "pyro_elbo_lab.losses",
    "JitBetaMeanFieldELBO": "pyro_elbo_lab.losses",
    "JitBetaTraceEnumELBO": "pyro_elbo_lab.losses",
    "BetaTraceEnumELBO": "pyro_elbo_lab.losses",
    "BetaTraceGraphELBO": "pyro_elbo_lab.losses",
    "IWAE": "pyro_elbo_lab.losses",
    "FusedSVI": "pyro_elbo_lab.losses",
    "ELBOTerms": "pyro_elbo_lab.terms",
    # diagnostics
    "estimate_evidence": "pyro_elbo_lab.diagnostics",
    "EvidenceEstimate": "pyro_elbo_lab.diagnostics",
    "posterior_collapse": "pyro_elbo_lab.diagnostics",
    "CollapseReport": "pyro_elbo_lab.diagnostics",
    "aggregate_posterior": "pyro_elbo_lab.diagnostics",
    "AggregatePosteriorReport": "pyro_elbo_lab.diagnostics",
    "rate_distortion": "pyro_elbo_lab.diagnostics",
    "RateDistortion": "pyro_elbo_lab.diagnostics",
    "rate_distortion_sweep": "pyro_elbo_lab.diagnostics",
    "ImportanceSamplingWarning": "pyro_elbo_lab.diagnostics",
    "guide_moments": "pyro_elbo_lab.diagnostics",
    "GuideMoments": "pyro_elbo_lab.diagnostics",
    "vsbc": "pyro_elbo_lab.diagnostics",
    "VSBCReport": "pyro_elbo_lab.diagnostics",
    # runner and ArviZ
    "SVIRunner": "pyro_elbo_lab.runner",
    "SVIResult": "pyro_elbo_lab.runner",
    "SVISummary": "pyro_elbo_lab.summary",
    "NonFiniteError": "pyro_elbo_lab.runner",
    "Convergence": "pyro_elbo_lab.runner",
    "Checkpointing": "pyro_elbo_lab.runner",
    "Evaluation": "pyro_elbo_lab.runner",
    "to_inference_data": "pyro_elbo_lab.inference_data",
    "from_svi_result": "pyro_elbo_lab.inference_data",
    "summarize": "pyro_elbo_lab.summary",
    # data-parallel training (the ``lightning`` extra; imported only when used)
    "ELBOLightningModule": "pyro_elbo_lab.lightning",
    "DiagnosticsCallback": "pyro_elbo_lab.lightning",
    # optional dependencies
    "MissingExtraError": "pyro_elbo_lab.datasets",
}
_SUBMODULES = (
    "schedules",
    "losses",
    "diagnostics",
    "runner",
    "inference_data",
    "summary",
    "arviz_compat",
    "plots",
    "terms",
)

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
