# SPDX-License-Identifier: Apache-2.0
"""
Post-fit VI diagnostics: is the guide any good, and why.

- :func:`estimate_evidence`: importance-sampled log evidence, ELBO, the KL gap
  :math:`\\mathrm{KL}(q \\| p(z \\mid x))` and the PSIS k̂ of the weights.
"""
from __future__ import annotations

from .evidence import EvidenceEstimate, ImportanceSamplingWarning, estimate_evidence

__all__ = [
    "EvidenceEstimate",
    "ImportanceSamplingWarning",
    "estimate_evidence",
]
