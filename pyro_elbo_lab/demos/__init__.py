# SPDX-License-Identifier: Apache-2.0
"""
The demos behind ``pyro-elbo-lab demo``, and the model code the scripts in ``examples/``
share with them: :mod:`~pyro_elbo_lab.demos.eight_schools` (the default) and
:mod:`~pyro_elbo_lab.demos.vae` (a β-VAE on handwritten digits).

Each demo module has a ``run(output, quick=False, seed=0, steps=None)`` that prints a
report, writes InferenceData (netCDF), PNG plots and ``report.md`` under ``output``, and
returns its results. ``--quick`` is a smoke run: it says so and draws no conclusions.

Shared pieces: :mod:`~pyro_elbo_lab.demos.wording` (every sentence about a fit, computed
from its numbers), :mod:`~pyro_elbo_lab.demos.figures` (the plots),
:mod:`~pyro_elbo_lab.demos.eight_schools_models` (the two parametrisations and the guide
families), :mod:`~pyro_elbo_lab.demos.eight_schools_exact` (quadrature and NUTS references),
:mod:`~pyro_elbo_lab.demos.eight_schools_report` and :mod:`~pyro_elbo_lab.demos.common`.
"""

from __future__ import annotations

__all__ = [
    "common",
    "eight_schools",
    "eight_schools_exact",
    "eight_schools_models",
    "eight_schools_report",
    "figures",
    "vae",
    "wording",
]
