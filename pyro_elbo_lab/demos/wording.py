# SPDX-License-Identifier: Apache-2.0
"""
The demos' sentences, computed from the numbers: pure functions of plain numbers, so that
each can be tested on made-up results whose truth is known.

Rules the sentences keep:

- a fit that did not converge is labelled "not converged", and no conclusion is drawn
  from it about its guide family;
- an evidence standard error is marked unreliable when Pareto :math:`\\hat k > 0.7`
  (the importance weights then have no finite variance, so the standard error measures
  nothing);
- "accurate" is said of a guide only when its own estimated errors (or its errors against
  an exact reference) are inside stated tolerances;
- active units (Burda et al. 2016) and collapsed dimensions use one stated pair of
  criteria, and a dimension on which they disagree is named and explained.

References

[1] `Yes, but Did It Work?: Evaluating Variational Inference`, Yuling Yao, Aki Vehtari,
    Daniel Simpson, Andrew Gelman (2018)

[2] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew Gelman,
    Yuling Yao, Jonah Gabry (2024)

[3] `Importance Weighted Autoencoders`, Yuri Burda, Roger Grosse, Ruslan Salakhutdinov (2016)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..diagnostics.psis import PARETO_K_GOOD

__all__ = [
    "PARETO_K_RELIABLE",
    "MEAN_ERROR_TOL",
    "SD_RATIO_TOL",
    "FitFacts",
    "fit_status",
    "evidence_cell",
    "fit_conclusion",
    "collapse_criteria",
    "collapse_summary",
    "paired_difference",
    "vae_comparison",
    "SMOKE_RUN_NOTE",
]

#: Above this Pareto k̂ importance sampling is unreliable (its standard error already from
#: ``PARETO_K_GOOD`` = 0.5 on, see :func:`evidence_cell`).
PARETO_K_RELIABLE = 0.7
#: A guide's mean is called accurate when within this many posterior sds of the reference.
MEAN_ERROR_TOL = 0.1
#: A guide's sd is called accurate when its ratio to the reference sd is within 1 ± this.
SD_RATIO_TOL = 0.1

#: What ``--quick`` prints instead of conclusions.
SMOKE_RUN_NOTE = (
    "This was a smoke run (--quick): too few steps for the fits to converge. The numbers show that "
    "the code runs; no conclusion is drawn from them. Run without --quick for the study."
)


def fit_status(converged: bool, steps: int, cap: int, reason: str = "") -> str:
    """
    How a fit stopped, for tables and reports.

    :param bool converged: whether the fit converged.
    :param int steps: steps run.
    :param int cap: the step cap.
    :param str reason: why it did not converge, when it stopped before the cap.
    :returns: ``"converged (step N)"``, ``"not converged (cap of N steps)"`` or
        ``"not converged (stopped at step N: reason)"``.
    :rtype: str
    """
    if converged:
        return f"converged (step {steps})"
    if steps >= cap:
        return f"not converged (cap of {cap} steps)"
    return f"not converged (stopped at step {steps}" + (f": {reason})" if reason else ")")


def evidence_cell(log_evidence: float, stderr: float, pareto_k: float) -> str:
    """
    An importance-sampled log-evidence with its standard error, marked unreliable from
    Pareto k̂ = 0.5 on (``EvidenceEstimate.stderr_reliable``'s rule): the weights then have
    infinite variance and the "± se" would read as an accuracy it is not (the estimate may be
    far below the truth).

    :param float log_evidence: the estimate, nats.
    :param float stderr: its delta-method standard error, nats.
    :param float pareto_k: Pareto k̂ of the importance weights.
    :rtype: str
    """
    if math.isnan(pareto_k):
        return f"{log_evidence:.3f} (± {stderr:.3f}: se unreliable, k̂ not fitted)"
    if not pareto_k < PARETO_K_GOOD:  # (k̂ = -inf, constant weights: reliable, as stderr_reliable)
        return f"{log_evidence:.3f} (± {stderr:.3f}: se unreliable, k̂ = {pareto_k:.2f} ≥ {PARETO_K_GOOD})"
    return f"{log_evidence:.3f} ± {stderr:.3f}"


@dataclass
class FitFacts:
    """
    The numbers a fit's conclusion is drawn from.

    :ivar str name: the fit, e.g. ``"centred, full-rank"``.
    :ivar str family: the guide family in words, e.g. ``"full-rank Gaussian"``.
    :ivar bool converged: whether the convergence rule stopped it.
    :ivar int steps: steps run.
    :ivar int cap: the step cap.
    :ivar float pareto_k: k̂ of the importance weights.
    :ivar float k_threshold: above it the PSIS-estimated errors are not computed.
    :ivar float est_mean_error: the largest |estimated standardised mean error| over the
        latent elements (guide against PSIS); NaN when k̂ is above the threshold.
    :ivar float est_sd_ratio: the estimated sd ratio (guide / PSIS) farthest from 1; NaN
        likewise.
    :ivar float gap: exact log p(y) − ELBO, nats (NaN when the evidence is not known).
    :ivar dict ref_mean_error: ``{parameter: (guide mean − reference mean) / reference sd}``
        against an exact or NUTS reference.
    :ivar dict ref_sd_ratio: ``{parameter: guide sd / reference sd}``.
    """

    name: str
    family: str
    converged: bool
    steps: int
    cap: int
    pareto_k: float
    k_threshold: float = PARETO_K_RELIABLE
    est_mean_error: float = math.nan
    est_sd_ratio: float = math.nan
    gap: float = math.nan
    ref_mean_error: dict | None = None
    ref_sd_ratio: dict | None = None


def _off(facts: FitFacts) -> list[str]:
    """Reference comparisons outside the tolerances, in words."""
    out = []
    for p, e in (facts.ref_mean_error or {}).items():
        if math.isfinite(e) and abs(e) > MEAN_ERROR_TOL:
            out.append(f"{p} mean {e:+.2f} sd")
    for p, r in (facts.ref_sd_ratio or {}).items():
        if math.isfinite(r) and abs(r - 1) > SD_RATIO_TOL:
            out.append(f"{p} sd ×{r:.2f}")
    return out


def fit_conclusion(facts: FitFacts) -> str:
    """
    One fit's conclusion, from its numbers only.

    - Not converged: says so, and draws no conclusion about the guide family.
    - Converged, k̂ above the threshold: importance sampling cannot estimate the guide's
      error; the errors against the reference (when given) say how far off it is, and a
      large error of a converged fit is a limit of the family in this parametrisation.
    - Converged, k̂ at or below it: the guide's estimated errors against the tolerances
      (|mean error| ≤ 0.1 posterior sd, sd ratio in [0.9, 1.1]): accurate, or inaccurate
      and then use the PSIS-corrected moments.

    :param FitFacts facts: the numbers.
    :rtype: str
    """
    head = f"{facts.name}: "
    if not facts.converged:
        return (
            head + f"not converged after {facts.steps} steps, so its numbers describe an unfinished fit; no "
            f"conclusion about the {facts.family} guide is drawn from it (rerun with a larger step cap, --steps)."
        )
    k = facts.pareto_k
    off = _off(facts)
    gap = f" (gap to the exact log-evidence {facts.gap:.2f} nats)" if math.isfinite(facts.gap) else ""
    if not math.isfinite(k) or k > facts.k_threshold:
        text = (
            head + f"converged at step {facts.steps}; Pareto k̂ = {k:.2f} > {facts.k_threshold:.2f}: importance "
            f"sampling is unreliable, so the guide's own error cannot be estimated from its draws{gap}."
        )
        if off:
            return text + (
                " Against the reference it is off (" + ", ".join(off) + "): a limit of the "
                f"{facts.family} family for this parametrisation, not of the optimisation."
            )
        if facts.ref_mean_error:
            return text + " Against the reference its moments are nevertheless within the tolerances."
        return text + " Do not use it as the posterior without another check (MCMC)."
    est = ""
    if math.isfinite(facts.est_mean_error):
        est = (
            f"; its estimated largest |mean error| is {facts.est_mean_error:.2f} posterior sd and sd ratio "
            f"{facts.est_sd_ratio:.2f}"
        )
    text = head + f"converged at step {facts.steps}; Pareto k̂ = {k:.2f} ≤ {facts.k_threshold:.2f}{est}{gap}."
    est_bad = math.isfinite(facts.est_mean_error) and (
        facts.est_mean_error > MEAN_ERROR_TOL or abs(facts.est_sd_ratio - 1) > SD_RATIO_TOL
    )
    if off or est_bad:
        detail = f" Against the reference: {', '.join(off)}." if off else ""
        return (
            text
            + detail
            + (
                f" The {facts.family} guide's own moments are off by more than the tolerances "
                f"(|mean error| ≤ {MEAN_ERROR_TOL} sd, sd ratio within 1 ± {SD_RATIO_TOL}): use the PSIS-corrected "
                "moments, which k̂ says are reliable."
            )
        )
    return text + (
        f" Its moments are accurate (|mean error| ≤ {MEAN_ERROR_TOL} sd, sd ratio within 1 ± {SD_RATIO_TOL})."
    )


# ----------------------------------------------------------------------------------------
# active units and collapsed dimensions
# ----------------------------------------------------------------------------------------


def collapse_criteria(activity_threshold: float) -> str:
    """
    The two stated criteria, made consistent: a unit is *active* when the variance over
    the data of its posterior mean exceeds ``activity_threshold`` (Burda et al. 2016); a
    dimension is *collapsed* when its KL to the prior is below ``activity_threshold / 2``
    nats. For a Gaussian guide and a standard normal prior
    :math:`\\mathrm{KL}_u \\ge \\tfrac12 \\overline{m_u^2} \\ge \\tfrac12 A_u`, so no
    dimension can be both.

    :param float activity_threshold: the activity threshold (0.01 in Burda et al.).
    :rtype: str
    """
    return (
        f"active unit: variance over the images of the posterior mean > {activity_threshold:g} (Burda et al. 2016); "
        f"collapsed dimension: KL(q || prior) < {activity_threshold / 2:g} nats per image. With a Gaussian guide and "
        "a N(0, 1) prior, KL >= (variance of the posterior mean) / 2, so an active unit cannot be collapsed; a "
        "dimension can be neither (it costs KL but carries little information about the image)."
    )


def collapse_summary(
    label: str,
    kl_per_dimension: Sequence[float],
    activity: Sequence[float],
    activity_threshold: float,
    names: Sequence[str] | None = None,
) -> str:
    """
    Active, collapsed and in-between dimensions of one fit, with any contradiction
    between the two criteria named and explained.

    :param str label: the fit.
    :param kl_per_dimension: KL(q || prior) per dimension, nats per image, shape ``(D,)``.
    :param activity: variance over the data of each dimension's posterior mean, ``(D,)``.
    :param float activity_threshold: activity above which a unit is active.
    :param names: dimension names (default ``z[i]``).
    :rtype: str
    """
    kl = [float(v) for v in kl_per_dimension]
    act = [float(v) for v in activity]
    if len(kl) != len(act):
        raise ValueError(
            f"collapse_summary: kl_per_dimension has {len(kl)} entries and activity {len(act)}; pass one per dimension"
        )
    names = list(names) if names is not None else [f"z[{i}]" for i in range(len(kl))]
    kl_tol = activity_threshold / 2
    active = [a > activity_threshold for a in act]
    collapsed = [k < kl_tol for k in kl]
    both = [i for i in range(len(kl)) if active[i] and collapsed[i]]
    neither = [i for i in range(len(kl)) if not active[i] and not collapsed[i]]
    text = f"{label}: {sum(active)}/{len(kl)} active units, {sum(collapsed)}/{len(kl)} collapsed dimensions"
    if neither:
        text += (
            f"; {len(neither)} neither active nor collapsed ("
            + ", ".join(f"{names[i]}: KL {kl[i]:.3f} nats, activity {act[i]:.3f}" for i in neither[:4])
            + (" ..." if len(neither) > 4 else "")
            + "): their guide moves little with the image yet differs from the prior, so they cost rate while "
            "carrying little information"
        )
    if both:
        text += (
            f". Contradiction on {len(both)} dimension(s) ("
            + ", ".join(f"{names[i]}: KL {kl[i]:.4f} nats, activity {act[i]:.4f}" for i in both[:4])
            + "): active by the variance of the posterior mean yet collapsed by KL. For a Gaussian guide and a "
            "N(0, 1) prior KL >= activity / 2, so this means the KL or the activity is a noisy Monte Carlo "
            "estimate, or the guide or prior is not of that form; trust neither count for these dimensions"
        )
    return text + "."


# ----------------------------------------------------------------------------------------
# comparing the VAE's KL weightings
# ----------------------------------------------------------------------------------------


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """
    Mean and standard error of the per-item differences ``a - b`` (paired: the same
    held-out images under two models), in the units of ``a``.
    """
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return (d[0] if d else math.nan), math.nan
    mean = math.fsum(d) / n
    var = math.fsum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, math.sqrt(var / n)


def vae_comparison(labels: dict, iwae_per_image: dict, converged: dict, rate: dict, reconstruction: dict) -> str:
    """
    What the held-out numbers say about the KL weightings, and nothing more.

    The best weighting by mean held-out IWAE log-likelihood is named only if it beats each
    other by more than 2 paired standard errors (the same images under both); weightings
    within 2 se are called indistinguishable. Weightings whose training did not converge
    are named and left out of the comparison.

    :param dict labels: ``{name: label}``.
    :param dict iwae_per_image: ``{name: per-image IWAE log-likelihoods, nats}``, the same
        images for every name.
    :param dict converged: ``{name: bool}``.
    :param dict rate: ``{name: KL per image, nats}``.
    :param dict reconstruction: ``{name: E_q log p(x|z) per image, nats}``.
    :rtype: str
    """
    done = [n for n in labels if converged.get(n)]
    out = []
    unconverged = [labels[n] for n in labels if not converged.get(n)]
    if unconverged:
        out.append(
            "Not converged (the objective was still changing at the last step; no conclusion drawn from them): "
            + ", ".join(unconverged)
            + "."
        )
    if len(done) < 2:
        out.append("Fewer than two converged weightings: no comparison is made.")
        return " ".join(out)
    mean = {n: math.fsum(map(float, iwae_per_image[n])) / len(iwae_per_image[n]) for n in done}
    best = max(done, key=lambda n: mean[n])
    diffs = {n: paired_difference(iwae_per_image[best], iwae_per_image[n]) for n in done if n != best}
    tied = [n for n, (d, se) in diffs.items() if not d > 2 * se]
    detail = ", ".join(f"{labels[n]} by {d:.2f} ± {se:.2f}" for n, (d, se) in diffs.items())
    if tied:
        out.append(
            f"Highest held-out IWAE log-likelihood: {labels[best]} ({mean[best]:.2f} nats per image), "
            f"but within 2 paired standard errors of {', '.join(labels[n] for n in tied)}: "
            f"not distinguishable on these images (differences: {detail} nats per image)."
        )
    else:
        out.append(
            f"Highest held-out IWAE log-likelihood: {labels[best]} ({mean[best]:.2f} nats per image), ahead of every "
            f"other converged weighting by more than 2 paired standard errors ({detail} nats per image)."
        )
    lo = min(done, key=lambda n: rate[n])
    hi = max(done, key=lambda n: rate[n])
    if lo != hi:
        out.append(
            f"Rate (KL) runs from {rate[lo]:.1f} nats ({labels[lo]}) to {rate[hi]:.1f} ({labels[hi]}); the "
            f"reconstruction from {reconstruction[lo]:.1f} to {reconstruction[hi]:.1f} nats per image."
        )
    return " ".join(out)
