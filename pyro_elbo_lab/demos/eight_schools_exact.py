# SPDX-License-Identifier: Apache-2.0
"""
The eight-schools references, independent of pyro-elbo-lab's estimators: the exact
posterior of μ and τ and the evidence p(y) by quadrature (μ and θ integrate out in closed
form, τ numerically), and the NUTS draws ArviZ ships.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..datasets import EIGHT_SCHOOLS_NAMES, EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y

__all__ = [
    "PRIOR_MU_SCALE",
    "PRIOR_TAU_SCALE",
    "ExactReference",
    "exact_reference",
    "exact_intervals",
    "nuts_reference",
    "rename_schools",
]

PRIOR_MU_SCALE = 5.0
PRIOR_TAU_SCALE = 5.0


# ----------------------------------------------------------------------------------------
# the exact answer, by quadrature, independent of pyro-elbo-lab
# ----------------------------------------------------------------------------------------


@dataclass
class ExactReference:
    """log p(y) in nats, and posterior mean and sd of μ and τ, to quadrature precision."""

    log_evidence: float
    mu_mean: float
    mu_sd: float
    tau_mean: float
    tau_sd: float


def exact_reference(num_nodes: int = 800) -> ExactReference:
    """
    Integrate μ and θ out in closed form and τ numerically.

    Given τ, :math:`y \\sim \\mathcal N(0, \\mathrm{diag}(\\sigma^2 + \\tau^2) + 5^2 \\mathbf 1
    \\mathbf 1^\\top)`, and :math:`\\mu \\mid \\tau, y` is Gaussian. With
    :math:`\\tau = 5 \\tan u` the HalfCauchy(5) prior becomes uniform on :math:`u \\in (0,
    \\pi/2)` with density :math:`2/\\pi`, and the integrand is smooth: Gauss–Legendre with
    ``num_nodes`` nodes.

    :param int num_nodes: Gauss–Legendre nodes in u (at least 1; 800 is ample).
    :returns: :class:`ExactReference`: log p(y) in nats; posterior mean and sd of μ and τ
        (points on the SAT-V scale).
    :raises ValueError: if ``num_nodes`` < 1.

    References

    [1] `Bayesian Data Analysis` (3rd edition), §5.5 "Parallel experiments in eight
        schools", Andrew Gelman, John B. Carlin, Hal S. Stern, David B. Dunson, Aki
        Vehtari, Donald B. Rubin (2013)
    """
    tau, post, mean, prec, log_evidence = _tau_nodes(num_nodes)
    mu_mean = (post * mean).sum()
    mu_var = (post * (1 / prec + mean**2)).sum() - mu_mean**2
    tau_mean = (post * tau).sum()
    tau_var = (post * tau**2).sum() - tau_mean**2
    return ExactReference(
        float(log_evidence), float(mu_mean), float(np.sqrt(mu_var)), float(tau_mean), float(np.sqrt(tau_var))
    )


def _tau_nodes(num_nodes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """
    Gauss–Legendre nodes in :math:`u = \\arctan(\\tau / 5)` and what each carries:
    ``(tau, post, mean, prec, log_evidence)``: τ at the nodes, their posterior weights
    (summing to 1), the mean and precision of :math:`\\mu \\mid \\tau, y`, and log p(y).
    """
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"exact_reference: num_nodes must be a positive integer (800 is ample), got {num_nodes}")
    y = np.asarray(EIGHT_SCHOOLS_Y)
    sigma = np.asarray(EIGHT_SCHOOLS_SIGMA)
    nodes, weights = np.polynomial.legendre.leggauss(num_nodes)
    u = (nodes + 1) * (np.pi / 4)  # (0, pi/2)
    w = weights * (np.pi / 4) * (2 / np.pi)  # du times the prior density of u
    tau = PRIOR_TAU_SCALE * np.tan(u)
    v = sigma**2 + tau[:, None] ** 2  # (T, 8) marginal variances of y_j given mu, tau
    # mu | tau, y: precision 1/25 + sum 1/v, mean (sum y/v) / precision
    prec = 1 / PRIOR_MU_SCALE**2 + (1 / v).sum(-1)
    mean = (y / v).sum(-1) / prec
    # log p(y | tau) = log N(y | 0, diag(v) + 25 11^T) via the matrix determinant lemma
    log_det = np.log(v).sum(-1) + np.log(PRIOR_MU_SCALE**2) + np.log(prec)
    quad = (y**2 / v).sum(-1) - prec * mean**2
    log_lik = -0.5 * (8 * np.log(2 * np.pi) + log_det + quad)
    log_terms = log_lik + np.log(w)
    log_evidence = np.logaddexp.reduce(log_terms)
    post = np.exp(log_terms - log_evidence)  # posterior weights of the nodes
    return tau, post, mean, prec, log_evidence


def exact_intervals(prob: float = 0.9, num_nodes: int = 800) -> dict[str, tuple[float, float]]:
    """
    Central ``prob`` intervals of μ and τ under the exact posterior, by the quadrature of
    :func:`exact_reference`: τ's posterior CDF over the nodes (interpolated), μ's as the
    mixture over τ of the Gaussians :math:`\\mu \\mid \\tau, y`, inverted by bisection.

    :param float prob: the interval's probability, in (0, 1).
    :param int num_nodes: Gauss–Legendre nodes.
    :returns: ``{"mu": (lo, hi), "tau": (lo, hi)}`` in SAT-V points.
    :rtype: dict
    :raises ValueError: for ``prob`` outside (0, 1) or a bad ``num_nodes``.
    """
    if not 0 < prob < 1:
        raise ValueError(f"exact_intervals: prob must be in (0, 1), got {prob!r}; e.g. 0.9 for a 90% interval")
    tau, post, mean, prec, _ = _tau_nodes(num_nodes)
    lo_p, hi_p = (1 - prob) / 2, (1 + prob) / 2
    order = np.argsort(tau)
    cdf = np.cumsum(post[order])
    tau_ci = (float(np.interp(lo_p, cdf, tau[order])), float(np.interp(hi_p, cdf, tau[order])))
    sd, m, w = torch.as_tensor(1 / np.sqrt(prec)), torch.as_tensor(mean), torch.as_tensor(post)

    def inverse(p: float) -> float:
        a, b = -200.0, 200.0
        for _ in range(80):
            c = 0.5 * (a + b)
            if float((w * torch.special.ndtr((c - m) / sd)).sum()) < p:
                a = c
            else:
                b = c
        return 0.5 * (a + b)

    return {"mu": (inverse(lo_p), inverse(hi_p)), "tau": tau_ci}


def nuts_reference() -> pd.DataFrame:
    """
    Posterior means and sds from the NUTS draws ArviZ ships (``non_centered_eight``, 4
    chains × 500 draws; bundled, no download).

    :returns: a DataFrame with columns ``mean`` and ``sd`` (SAT-V points) and rows ``mu``,
        ``tau``, ``theta[0]`` .. ``theta[7]`` (schools in :data:`EIGHT_SCHOOLS_NAMES` order).

    References

    [1] `Bayesian Data Analysis` (3rd edition), §5.5 "Parallel experiments in eight
        schools", Andrew Gelman, John B. Carlin, Hal S. Stern, David B. Dunson, Aki
        Vehtari, Donald B. Rubin (2013)
    """
    from .. import arviz_compat

    idata = arviz_compat.load_arviz_data("non_centered_eight")
    summary = arviz_compat.summary(idata, var_names=["mu", "tau", "theta"], diagnostics=False)
    return rename_schools(summary[["mean", "sd"]])


def rename_schools(frame: pd.DataFrame) -> pd.DataFrame:
    """``theta[Choate]`` / ``theta[0]`` -> ``theta[0]``, so NUTS and VI tables line up."""
    index = []
    for name in frame.index:
        if name.startswith("theta["):
            key = name[len("theta[") : -1]
            if key in EIGHT_SCHOOLS_NAMES:
                key = str(EIGHT_SCHOOLS_NAMES.index(key))
            name = f"theta[{key}]"
        index.append(name)
    frame = frame.copy()
    frame.index = index
    return frame
