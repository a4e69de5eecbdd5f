# SPDX-License-Identifier: Apache-2.0
"""ELBO objectives: β-weighted, free-bits and capacity, each recording its decomposition."""

from .beta_elbo import BetaELBO
from .beta_mean_field_elbo import BetaMeanFieldELBO
from .beta_trace_enum_elbo import BetaTraceEnumELBO
from .beta_trace_graph_elbo import BetaTraceGraphELBO
from .compiled import JitBetaELBO, JitBetaMeanFieldELBO
from .compiled_enum import JitBetaTraceEnumELBO
from .fused import FusedSVI
from .iwae import IWAE

__all__ = [
    "BetaELBO",
    "BetaMeanFieldELBO",
    "BetaTraceEnumELBO",
    "BetaTraceGraphELBO",
    "FusedSVI",
    "IWAE",
    "JitBetaELBO",
    "JitBetaMeanFieldELBO",
    "JitBetaTraceEnumELBO",
]
