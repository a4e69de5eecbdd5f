# SPDX-License-Identifier: Apache-2.0
"""
Self-normalised importance-sampling moments and their Monte Carlo standard errors: the
estimators behind :func:`~pyro_elbo_lab.diagnostics.moments.guide_moments` (the one home
of these formulas). Imports only torch.
"""

from __future__ import annotations

import torch

__all__ = ["guide_error_mcse", "self_normalized_moments"]


def self_normalized_moments(values: torch.Tensor, log_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """
    Self-normalised importance-sampling mean and sd of each column of ``values`` with their
    delta-method Monte Carlo standard errors.

    With normalised weights :math:`\\tilde w_s` and :math:`\\hat\\mu = \\sum_s \\tilde w_s h_s`,

    .. math::

        \\mathrm{MCSE}(\\hat\\mu)^2 \\approx \\sum_s \\tilde w_s^2 (h_s - \\hat\\mu)^2,
        \\qquad
        \\mathrm{MCSE}(\\hat\\sigma^2)^2 \\approx \\sum_s \\tilde w_s^2
            \\big((h_s - \\hat\\mu)^2 - \\hat\\sigma^2\\big)^2,
        \\qquad \\mathrm{MCSE}(\\hat\\sigma) = \\mathrm{MCSE}(\\hat\\sigma^2) / (2\\hat\\sigma),

    the variance of a self-normalised ratio estimate (Vehtari et al. 2024, section on the
    Monte Carlo error of self-normalised importance sampling; :math:`r_\\text{eff} = 1` for
    independent draws), applied to :math:`h` and to :math:`(h - \\hat\\mu)^2`. Equal weights
    give the plain sample moments and their usual standard errors.

    Validity: these are central-limit standard errors, so they need the weighted terms
    :math:`w_s (h_s - \\hat\\mu)` and :math:`w_s (h_s - \\hat\\mu)^2` to have finite variance;
    weights with a Pareto tail of shape :math:`k` give that only for :math:`k < 1/2`
    (Vehtari et al. 2024). Measured on a Gaussian guide of sd :math:`r` times a Normal
    posterior's (exact :math:`k = 1 - r^2`, 4000 draws, 100 replications each), the sd's
    estimate fell more than 2 MCSE from the truth in 1 % of runs at :math:`k = 0.19`,
    9-11 % at :math:`k = 0.28`-:math:`0.44`, 26 % at 0.51 and 37 % at 0.64, mostly below it;
    the mean's stayed within 2 MCSE in 94-98 % throughout.
    :attr:`~pyro_elbo_lab.diagnostics.moments.GuideMoments.sd_mcse_reliable` is k̂ < 0.5.

    :param torch.Tensor values: shape ``(S, D)``.
    :param torch.Tensor log_weights: shape ``(S,)``, in nats (unnormalised).
    :returns: ``{"mean", "sd", "mean_mcse", "sd_mcse"}``, each of shape ``(D,)``.
    :rtype: dict

    References

    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    """
    w = torch.softmax(log_weights, 0).unsqueeze(-1)  # (S, 1), sums to 1
    mean = (w * values).sum(0)
    dev2 = (values - mean) ** 2
    var = (w * dev2).sum(0)
    sd = var.sqrt()
    w2 = w**2
    mean_mcse = (w2 * dev2).sum(0).sqrt()
    var_mcse = (w2 * (dev2 - var) ** 2).sum(0).sqrt()
    sd_mcse = var_mcse / (2 * sd)
    return {"mean": mean, "sd": sd, "mean_mcse": mean_mcse, "sd_mcse": sd_mcse}


def guide_error_mcse(values: torch.Tensor, log_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """
    Delta-method MCSE of the guide's estimated standardised mean error
    :math:`e = (\\hat\\mu_q - \\hat\\mu_p)/\\hat\\sigma_p` and sd ratio
    :math:`r = \\hat\\sigma_q/\\hat\\sigma_p`, where the guide's moments
    :math:`\\hat\\mu_q, \\hat\\sigma_q^2` are the sample moments of the same draws
    :math:`h_s` that give the self-normalised :math:`\\hat\\mu_p, \\hat\\sigma_p^2` (normalised
    weights :math:`\\tilde w_s`). The two sets of moments are positively correlated, so the
    error's MCSE is that of a difference, not of :math:`\\hat\\mu_p` alone. Each estimate is
    linearised in per-draw influence terms,

    .. math::

        a_s = \\frac{h_s - \\hat\\mu_q}{S}, \\quad
        b_s = \\tilde w_s (h_s - \\hat\\mu_p), \\quad
        c_s = \\frac{(h_s - \\hat\\mu_q)^2 - \\hat\\sigma_q^2}{S}, \\quad
        d_s = \\tilde w_s \\big((h_s - \\hat\\mu_p)^2 - \\hat\\sigma_p^2\\big),

        \\mathrm{MCSE}(e)^2 = \\sum_s \\Big(\\frac{a_s - b_s}{\\hat\\sigma_p}
            - e\\,\\frac{d_s}{2\\hat\\sigma_p^2}\\Big)^2, \\qquad
        \\mathrm{MCSE}(r)^2 = r^2 \\sum_s \\Big(\\frac{c_s}{2\\hat\\sigma_q^2}
            - \\frac{d_s}{2\\hat\\sigma_p^2}\\Big)^2

    (:math:`b, d`: the self-normalised ratio's linearisation, Vehtari et al. 2024; :math:`r`
    through :math:`\\log r`; independent draws, the smoothing taken as fixed). The exact
    guide (constant weights) has :math:`a = b`, :math:`c = d`: MCSE 0, as its errors are 0 in
    every replication. Analytic guide moments would drop :math:`a` and :math:`c`.

    :param torch.Tensor values: shape ``(S, D)``, draws from the guide.
    :param torch.Tensor log_weights: shape ``(S,)``, (smoothed) log weights in nats.
    :returns: ``{"mean_error_mcse", "sd_ratio_mcse"}``, each of shape ``(D,)``.
    :rtype: dict

    References

    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    - *Asymptotic Statistics*, A. W. van der Vaart (1998), chapter 3 (the delta method)
    """
    w = torch.softmax(log_weights, 0).unsqueeze(-1)  # (S, 1)
    S = values.shape[0]
    dq, dp = values - values.mean(0), values - (w * values).sum(0)
    vq, vp = (dq**2).mean(0), (w * dp**2).sum(0)
    d = w * (dp**2 - vp)
    e = (dp - dq).mean(0) / vp.sqrt()  # (mu_q - mu_p) / sd_p
    mean_if = (dq / S - w * dp) / vp.sqrt() - e * d / (2 * vp)  # (S, D)
    log_ratio_if = (dq**2 - vq) / (2 * S * vq) - d / (2 * vp)
    ratio = (vq / vp).sqrt()
    return {
        "mean_error_mcse": (mean_if**2).sum(0).sqrt(),
        "sd_ratio_mcse": ratio * (log_ratio_if**2).sum(0).sqrt(),
    }
