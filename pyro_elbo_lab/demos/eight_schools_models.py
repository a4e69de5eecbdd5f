# SPDX-License-Identifier: Apache-2.0
"""
The eight-schools models in their two parametrisations and the two guide families the demo
and ``examples/eight_schools.py`` fit to each (:mod:`~pyro_elbo_lab.demos.eight_schools`).

References

[1] `Bayesian Data Analysis` (3rd edition), §5.5 "Parallel experiments in eight schools",
    Andrew Gelman, John B. Carlin, Hal S. Stern, David B. Dunson, Aki Vehtari, Donald B.
    Rubin (2013)

[2] `A General Framework for the Parametrization of Hierarchical Models`, Omiros
    Papaspiliopoulos, Gareth O. Roberts, Martin Sköld (2007)
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

from .eight_schools_exact import PRIOR_MU_SCALE, PRIOR_TAU_SCALE

__all__ = ["FAMILY", "GUIDES", "MODELS", "centered", "non_centered"]


def centered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """
    The centred model: θ drawn around μ with scale τ (a funnel in (τ, θ)).

    :param torch.Tensor sigma: standard errors of the schools' estimates, shape ``(8,)``.
    :param torch.Tensor y: estimated effects, shape ``(8,)``; ``None`` to sample them.

    References: [1] of the module (BDA §5.5).
    """
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_MU_SCALE))
    tau = pyro.sample("tau", dist.HalfCauchy(PRIOR_TAU_SCALE))
    with pyro.plate("school", sigma.shape[-1], dim=-1):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def non_centered(sigma: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """
    The non-centred model: standardised effects θ̃ (site ``theta_t``) and θ = μ + τ θ̃
    (deterministic site ``theta``); no funnel.

    :param torch.Tensor sigma: standard errors of the schools' estimates, shape ``(8,)``.
    :param torch.Tensor y: estimated effects, shape ``(8,)``; ``None`` to sample them.

    References: [1] and [2] of the module (BDA §5.5; Papaspiliopoulos et al. 2007).
    """
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_MU_SCALE))
    tau = pyro.sample("tau", dist.HalfCauchy(PRIOR_TAU_SCALE))
    with pyro.plate("school", sigma.shape[-1], dim=-1):
        theta_t = pyro.sample("theta_t", dist.Normal(0.0, 1.0))
        theta = pyro.deterministic("theta", mu + tau * theta_t)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


#: The two parametrisations, by name.
MODELS: dict[str, Callable] = {"centred": centered, "non-centred": non_centered}
#: The guide families: ``GUIDES[name](model)`` builds an autoguide (in the unconstrained space).
GUIDES: dict[str, Callable] = {
    "mean-field": lambda model: AutoNormal(model, init_scale=0.1),
    "full-rank": lambda model: AutoMultivariateNormal(model, init_scale=0.1),
}
#: The guide families in words, by the keys of :data:`GUIDES`.
FAMILY = {"mean-field": "mean-field Gaussian", "full-rank": "full-rank Gaussian"}
