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
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:  # what the lazy exports resolve to, for type checkers and IDEs (tests/test_typing.py)
    from . import arviz_compat as arviz_compat
    from . import diagnostics as diagnostics
    from . import inference_data as inference_data
    from . import losses as losses
    from . import plots as plots
    from . import runner as runner
    from . import schedules as schedules
    from . import summary as summary
    from . import terms as terms
    from .datasets import MissingExtraError as MissingExtraError
    from .diagnostics import AggregatePosteriorReport as AggregatePosteriorReport
    from .diagnostics import CollapseReport as CollapseReport
    from .diagnostics import EvidenceEstimate as EvidenceEstimate
    from .diagnostics import GuideMoments as GuideMoments
    from .diagnostics import ImportanceSamplingWarning as ImportanceSamplingWarning
    from .diagnostics import RateDistortion as RateDistortion
    from .diagnostics import VSBCReport as VSBCReport
    from .diagnostics import aggregate_posterior as aggregate_posterior
    from .diagnostics import estimate_evidence as estimate_evidence
    from .diagnostics import guide_moments as guide_moments
    from .diagnostics import posterior_collapse as posterior_collapse
    from .diagnostics import rate_distortion_sweep as rate_distortion_sweep
    from .diagnostics.rate_distortion import rate_distortion as rate_distortion
    from .diagnostics.vsbc import vsbc as vsbc
    from .inference_data import from_svi_result as from_svi_result
    from .inference_data import to_inference_data as to_inference_data
    from .lightning import DiagnosticsCallback as DiagnosticsCallback
    from .lightning import ELBOLightningModule as ELBOLightningModule
    from .losses import IWAE as IWAE
    from .losses import BetaELBO as BetaELBO
    from .losses import BetaMeanFieldELBO as BetaMeanFieldELBO
    from .losses import BetaTraceEnumELBO as BetaTraceEnumELBO
    from .losses import BetaTraceGraphELBO as BetaTraceGraphELBO
    from .losses import FusedSVI as FusedSVI
    from .losses import JitBetaELBO as JitBetaELBO
    from .losses import JitBetaMeanFieldELBO as JitBetaMeanFieldELBO
    from .losses import JitBetaTraceEnumELBO as JitBetaTraceEnumELBO
    from .runner import Checkpointing as Checkpointing
    from .runner import Convergence as Convergence
    from .runner import Evaluation as Evaluation
    from .runner import NonFiniteError as NonFiniteError
    from .runner import SVIResult as SVIResult
    from .runner import SVIRunner as SVIRunner
    from .summary import SVISummary as SVISummary
    from .summary import summarize as summarize
    from .terms import ELBOTerms as ELBOTerms


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
