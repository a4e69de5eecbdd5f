# SPDX-License-Identifier: Apache-2.0
"""
The demos behind ``pyro-elbo-lab demo``, and the model code the scripts in ``examples/``
share with them: :mod:`~pyro_elbo_lab.demos.eight_schools` (the default) and
:mod:`~pyro_elbo_lab.demos.vae` (a β-VAE on handwritten digits).

Each demo module has a ``run(output, quick=False, seed=0, steps=None)`` that prints a
report, writes InferenceData (netCDF), PNG plots and ``report.md`` under ``output``, and
returns its results.
"""
from __future__ import annotations

__all__ = ["common", "eight_schools", "vae"]
