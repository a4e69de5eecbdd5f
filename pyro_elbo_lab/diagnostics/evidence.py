# SPDX-License-Identifier: Apache-2.0
"""
Importance-sampled evidence, the KL gap and the PSIS k̂ of a fitted guide.

One vectorised guide/model trace per batch of importance samples (the sample plate of
:mod:`pyro_elbo_lab.diagnostics.traces`), never a Python loop over samples; the Pareto
k̂ and the importance statistics come from :mod:`pyro_elbo_lab.diagnostics.psis`.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..checks import check_int, check_model_kwargs
from .local import plan
from .log_weights import draw_log_weights, sequential_log_weights
from .psis import PARETO_K_GOOD, explain_k, importance_stats, pareto_k_threshold, psis_fit, verdict

__all__ = ["EvidenceEstimate", "ImportanceSamplingWarning", "estimate_evidence"]

logger = logging.getLogger(__name__)


class ImportanceSamplingWarning(UserWarning):
    """
    The importance weights of a guide are too heavy-tailed (Pareto k̂ above
    :func:`~pyro_elbo_lab.diagnostics.psis.pareto_k_threshold`, at most 0.7) for the
    evidence and KL gap estimates to be trusted, or too few samples were drawn to tell.
    """


@dataclass(frozen=True)
class EvidenceEstimate:
    """
    The importance-sampled evidence of a model under a guide, and how far the guide is
    from the posterior. All values in nats, with Pyro's data scaling (see
    :func:`estimate_evidence`).

    :ivar float log_evidence: :math:`\\log \\frac{1}{S} \\sum_s w_s`, the importance-weighted
        bound :math:`\\mathcal{L}_S` of Burda et al. (2016), :math:`w_s = p(x, z_s)/q(z_s)`
        (PSIS-smoothed weights when ``psis=True``).
    :ivar float log_evidence_stderr: delta-method standard error,
        :math:`\\mathrm{sd}(w) / (\\sqrt{S}\\, \\bar w)`.
    :ivar float elbo: :math:`\\frac{1}{S}\\sum_s \\log w_s`.
    :ivar float elbo_stderr: :math:`\\mathrm{sd}(\\log w)/\\sqrt{S}`.
    :ivar float gap: ``log_evidence - elbo``, an estimate of
        :math:`\\mathrm{KL}(q(z) \\| p(z \\mid x))`; biased low for finite ``S``.
    :ivar float pareto_k: Pareto k̂ of the weights (Yao et al. 2018); ``-inf`` when the
        weights are constant (the guide is the posterior) or bounded (a flat tail), ``nan``
        when it cannot be fitted: ``S < 25``, or a tail of too few distinct values that is not
        flat (:func:`~pyro_elbo_lab.diagnostics.psis.psis_fit`; the warning says which).
        Per-datapoint mode: the largest k̂ over the data (``nan`` if any element's is).
    :ivar float ess: effective sample size :math:`1/\\sum_s \\bar w_s^2` of the
        normalised weights (per-datapoint mode: the smallest over the data).
    :ivar int num_samples: ``S``.
    :ivar torch.Tensor log_weights: :math:`\\log w_s`, shape ``(S,)`` (raw, not smoothed).
    :ivar bool psis: whether ``log_evidence``, its standard error and ``ess`` come from
        the Pareto-smoothed weights.
    :ivar str per_datapoint: the data plate of per-datapoint mode, else ``None``.
    :ivar torch.Tensor log_evidence_per_datapoint: per-datapoint mode only: the IWAE
        estimate of :math:`\\log p(x_n)` for each element of the plate, shape ``(N,)``.
    :ivar torch.Tensor log_evidence_per_datapoint_stderr: its delta-method standard
        errors, shape ``(N,)``.
    :ivar torch.Tensor pareto_k_per_datapoint: k̂ per element, shape ``(N,)``.
    """

    log_evidence: float
    log_evidence_stderr: float
    elbo: float
    elbo_stderr: float
    gap: float
    pareto_k: float
    ess: float
    num_samples: int
    log_weights: torch.Tensor = field(repr=False)
    psis: bool = False
    per_datapoint: str | None = None
    log_evidence_per_datapoint: torch.Tensor | None = field(default=None, repr=False)
    log_evidence_per_datapoint_stderr: torch.Tensor | None = field(default=None, repr=False)
    pareto_k_per_datapoint: torch.Tensor | None = field(default=None, repr=False)

    @property
    def verdict(self) -> str:
        """
        What k̂ says about importance sampling from this guide
        (:func:`~pyro_elbo_lab.diagnostics.psis.verdict`): ``"IS reliable"`` (k̂ ≤ 0.5),
        ``"IS usable"`` (up to :attr:`k_threshold`: usable, slower convergence, the standard
        error unreliable: :attr:`stderr_reliable`),
        ``"IS unreliable"`` (above it: evidence, its standard error and gap unreliable)
        or ``"IS unchecked"`` (too few samples to fit k̂). It says nothing about whether
        the guide's moments are close to the posterior's: a guide can be far off with
        k̂ ≤ 0.5; that is :meth:`~pyro_elbo_lab.diagnostics.moments.GuideMoments.verdict`'s
        to say (:func:`~pyro_elbo_lab.guide_moments`).
        """
        return verdict(self.pareto_k, self.num_samples)

    @property
    def k_threshold(self) -> float:
        """:func:`~pyro_elbo_lab.diagnostics.psis.pareto_k_threshold` of ``num_samples``."""
        return pareto_k_threshold(self.num_samples)

    @property
    def stderr_reliable(self) -> bool:
        """
        Whether :attr:`log_evidence_stderr` measures the estimate's error: k̂ < 0.5
        (:data:`~pyro_elbo_lab.diagnostics.psis.PARETO_K_GOOD`; ``-inf``, constant weights,
        included). The delta-method standard error :math:`\\mathrm{sd}(w)/(\\sqrt{S}\\,\\bar w)`
        rests on the central limit theorem for the mean weight, which needs weights of
        finite variance: a Pareto tail of shape :math:`k` has finite variance only for
        :math:`k < 1/2` (Vehtari et al. 2024). For 0.5 ≤ k̂ ≤ :attr:`k_threshold` the
        estimate itself is usable (:attr:`verdict` ``"IS usable"``) but converges more slowly
        than :math:`1/\\sqrt{S}` and the standard error understates its error (a guide of
        0.4 posterior sd, k = 0.84, k̂ ≤ 0.7 in a third of runs: 71 % of those were more than
        2 standard errors off); above the threshold (or with k̂ not fitted) it understates it
        by far (a centred eight-schools fit: −32.54 ± 0.11 against an exact −31.31).
        """
        return bool(self.pareto_k < PARETO_K_GOOD)

    @property
    def ess_fraction(self) -> float:
        """``ess / num_samples``, in (0, 1]."""
        return self.ess / self.num_samples

    def as_dict(self) -> dict[str, float]:
        """
        The scalar fields as a flat ``{name: number}`` dict (no tensors, no verdict), with
        ``log_evidence_stderr_reliable`` (:attr:`stderr_reliable`, a bool).
        """
        return {
            "log_evidence": self.log_evidence,
            "log_evidence_stderr": self.log_evidence_stderr,
            "log_evidence_stderr_reliable": self.stderr_reliable,
            "elbo": self.elbo,
            "elbo_stderr": self.elbo_stderr,
            "gap": self.gap,
            "pareto_k": self.pareto_k,
            "ess": self.ess,
            "num_samples": self.num_samples,
        }

    def __str__(self) -> str:
        se = f"{self.log_evidence_stderr:.2g}"
        if not self.stderr_reliable:
            why = "not fitted" if math.isnan(self.pareto_k) else f"= {self.pareto_k:.3g} ≥ {PARETO_K_GOOD}"
            se += f" (se unreliable: k̂ {why})"
        return (
            f"EvidenceEstimate(log_evidence={self.log_evidence:.4f} ± {se}, "
            f"elbo={self.elbo:.4f} ± {self.elbo_stderr:.2g}, gap={self.gap:.4g}, "
            f"pareto_k={self.pareto_k:.3g} ({self.verdict}), ess={self.ess:.1f}/{self.num_samples})"
        )


# -- the estimator ----------------------------------------------------------------------------------


def estimate_evidence(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    model_kwargs: dict | None = None,
    num_samples: int = 1000,
    batch_size: int | None = None,
    per_datapoint: str | None = None,
    psis: bool = False,
    max_plate_nesting: int | None = None,
    vectorize: bool = True,
) -> EvidenceEstimate:
    """
    Importance-sampled log evidence, ELBO, KL gap and Pareto k̂ of a guide.

    Draws :math:`z_s \\sim q`, :math:`s = 1..S`, in vectorised batches (one guide trace and
    one replayed model trace per batch, over a sample plate; no Python loop over samples),
    and computes the log weights :math:`\\log w_s = \\log p(x, z_s) - \\log q(z_s)`, with
    Pyro's data scaling (subsampled plates scaled to the full data), under
    :func:`torch.no_grad`. Then

    .. math::

        \\hat{\\mathcal{L}}_S = \\log \\frac{1}{S} \\sum_{s=1}^S w_s, \\qquad
        \\widehat{\\mathrm{ELBO}} = \\frac{1}{S} \\sum_s \\log w_s, \\qquad
        \\widehat{\\mathrm{gap}} = \\hat{\\mathcal{L}}_S - \\widehat{\\mathrm{ELBO}}.

    :math:`\\hat{\\mathcal{L}}_S` is the importance-weighted bound of Burda et al. (2016):
    :math:`\\mathbb{E}\\,\\hat{\\mathcal{L}}_S \\le \\log p(x)`, tightening as ``S`` grows, so
    the gap, an estimate of :math:`\\mathrm{KL}(q(z) \\| p(z \\mid x))`, is a lower estimate
    for finite ``S`` (exact, for any ``S``, when ``q`` is the posterior). Its standard error
    is the delta method on the mean weight: :math:`\\mathrm{se}(\\log \\bar w) \\approx
    \\mathrm{sd}(w)/(\\sqrt{S}\\,\\bar w)`, valid when the weights have finite variance,
    which a Pareto tail of shape :math:`k` has only for :math:`k < 1/2` (Vehtari et al. 2024):
    :attr:`EvidenceEstimate.stderr_reliable` is k̂ < 0.5. The Pareto k̂ of the weights (Yao et al. 2018) is fitted with
    :func:`~pyro_elbo_lab.diagnostics.psis.psis_diagnostics`; ESS is
    :math:`1/\\sum_s \\bar w_s^2` for the normalised weights.

    Reporting: k̂ above :func:`~pyro_elbo_lab.diagnostics.psis.pareto_k_threshold` of ``S``
    (:math:`\\min(1 - 1/\\log_{10} S, 0.7)`: 0.667 for ``S = 1000``) issues an
    :class:`ImportanceSamplingWarning` (evidence, its standard error and gap unreliable;
    :attr:`EvidenceEstimate.stderr_reliable` is False), as does a k̂ that cannot be fitted
    (the warning gives the reason of each case: fewer than 25 samples, or an upper tail of
    too few distinct values that is not flat, where a rare large weight dominates);
    0.5 < k̂ ≤ the threshold is noted with a ``logging`` INFO message on the logger
    ``pyro_elbo_lab.diagnostics.evidence`` (the estimate is usable but converges slowly, and
    its standard error understates its error: ``stderr_reliable`` is False) and in
    :attr:`EvidenceEstimate.verdict`.

    Per-datapoint mode (``per_datapoint="<plate name>"``), for models whose latents are all
    local to that data plate (a VAE): the log weights are kept per element,
    :math:`\\log w_{s,n} = \\log p(x_n, z_{s,n}) - \\log q(z_{s,n} \\mid x_n)`, and
    :math:`\\log p(x_n) \\approx \\log \\frac1S \\sum_s w_{s,n}` (the IWAE evaluation of a VAE)
    with its own k̂. The scalar fields then summarise over the data: ``log_evidence =``
    :math:`\\sum_n` (an estimator of :math:`\\log p(x)` with far lower variance than the joint
    one), its standard error adds the per-element variances, ``pareto_k`` is the worst
    element's, ``ess`` the smallest. This mode uses unscaled log_probs (one term per element
    present), so with a subsampled plate it reports the minibatch's elements.

    Memory: with ``batch_size=None`` one probing pass measures the trace size per sample
    and batches hold about :math:`2^{24}` log_prob/value entries; per-datapoint mode also
    keeps an ``(S, N)`` tensor of log weights.

    :param model: a Pyro model with observed data.
    :param guide: a guide with a site for every latent site of the model (same arguments).
    :param args: model/guide positional arguments.
    :param dict model_kwargs: model/guide keyword arguments (any names, ``num_samples``
        and ``psis`` included: they go to the model, never to this function).
    :param int num_samples: ``S >= 2`` importance samples (at least 25 to fit k̂).
    :param int batch_size: samples per vectorised trace; automatic when ``None``.
    :param str per_datapoint: name of a data plate for per-datapoint estimates.
    :param bool psis: report ``log_evidence``, its standard error and ``ess`` from the
        Pareto-smoothed weights (Vehtari et al. 2024); ``elbo`` stays the raw mean.
    :param int max_plate_nesting: the model's plate depth; guessed when ``None``.
    :param bool vectorize: draw the samples in vectorised batches (default); ``False``: one
        model/guide trace per sample, each weight Pyro's ``TraceEnum_ELBO`` of one particle
        (sites enumerated in the model summed out exactly), for models whose code does not
        broadcast under the sample plate (indexing with an enumerated value without
        ``Vindex``, as Pyro's ``examples/lda.py``). A Python loop over samples: slower;
        ``batch_size`` and ``per_datapoint`` do not apply.
    :returns: the estimates, in nats.
    :rtype: EvidenceEstimate
    :raises ValueError: if ``num_samples < 2``, ``batch_size < 1``, ``model_kwargs`` is not
        a dict, ``psis`` or ``vectorize`` is not a bool, a latent site of the
        model has no guide site, a log weight is not finite (naming the sites), or in
        per-datapoint mode ``per_datapoint`` is not a vectorised plate of the model or a
        site lies outside it; if the model enumerates a site and its code does not broadcast
        under the sample plate (naming the site; the fix: ``Vindex`` or ``vectorize=False``).

    With the exact posterior as the guide every weight is :math:`p(y)`, so the estimate is
    exact from any number of draws and the gap is 0 (a conjugate Normal model,
    :math:`p(y) = N(y; 0, 2)`, in float64):

    >>> import torch, pyro, pyro.distributions as dist
    >>> def model(y):
    ...     z = pyro.sample("z", dist.Normal(torch.zeros_like(y), 1.0))
    ...     pyro.sample("y", dist.Normal(z, 1.0), obs=y)
    >>> def guide(y):  # the posterior, N(y / 2, 1 / 2)
    ...     pyro.sample("z", dist.Normal(y / 2, 0.5**0.5))
    >>> y = torch.tensor(1.0, dtype=torch.float64)
    >>> estimate = estimate_evidence(model, guide, y, num_samples=100)
    >>> exact = dist.Normal(0.0, 2**0.5).log_prob(y).item()
    >>> round(estimate.log_evidence, 4), round(exact, 4)
    (-1.5155, -1.5155)
    >>> abs(estimate.gap) < 1e-12, estimate.pareto_k  # constant weights: no tail at all
    (True, -inf)

    References

    - *Importance Weighted Autoencoders*, Y. Burda, R. Grosse, R. Salakhutdinov (2016)
    - *Yes, but Did It Work?: Evaluating Variational Inference*, Y. Yao, A. Vehtari,
      D. Simpson, A. Gelman (2018)
    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    """
    check_int(
        "num_samples",
        num_samples,
        2,
        hint="importance sampling needs several draws to average; use >= 1000 for a usable Pareto k̂",
    )
    check_int("batch_size", batch_size, 1, allow_none=True)
    kwargs = check_model_kwargs(model_kwargs)
    if per_datapoint is not None and not isinstance(per_datapoint, str):
        raise ValueError(
            f"per_datapoint must be the name of a data plate (str) or None, got per_datapoint={per_datapoint!r}"
        )

    if not isinstance(psis, (bool, np.bool_)):
        raise ValueError(
            f"psis must be True (Pareto-smoothed weights) or False (raw weights), got psis={psis!r}; pass a bool"
        )
    psis = bool(psis)
    if not isinstance(vectorize, bool):
        raise ValueError(f"vectorize must be True or False, got vectorize={vectorize!r}")
    if not vectorize and per_datapoint is not None:
        raise ValueError(
            f"per_datapoint={per_datapoint!r} needs vectorize=True (per-element weights come from the vectorised "
            "traces); use per_datapoint=None with vectorize=False"
        )

    with torch.no_grad():
        max_plate_nesting, batch_size = plan(
            model, guide, args, kwargs, max_plate_nesting, batch_size, marginalise=per_datapoint is None
        )
        if vectorize:
            lw = draw_log_weights(model, guide, args, kwargs, num_samples, batch_size, max_plate_nesting, per_datapoint)
        else:
            lw = sequential_log_weights(model, guide, args, kwargs, num_samples, max_plate_nesting)

        if per_datapoint is None:
            joint = lw
            rows = lw.unsqueeze(0)
        else:
            joint = lw.sum(-1)
            rows = lw.transpose(0, 1)  # (N, S)
        smoothed, k, reasons = psis_fit(rows)
        log_mean, stderr, ess = importance_stats(smoothed if psis else rows)
        elbo_mean = joint.mean()
        elbo_se = joint.std() / math.sqrt(num_samples)

    if per_datapoint is None:
        log_evidence = float(log_mean[0])
        log_evidence_se = float(stderr[0])
        pareto_k = float(k[0])
        ess_value = float(ess[0])
        extra: dict[str, Any] = {}
    else:
        log_evidence = float(log_mean.sum())
        log_evidence_se = float(stderr.pow(2).sum().sqrt())
        pareto_k = float(k.max())  # nan if any element's k̂ is nan (torch.max propagates nan)
        ess_value = float(ess.min())
        extra = dict(
            per_datapoint=per_datapoint,
            log_evidence_per_datapoint=log_mean,
            log_evidence_per_datapoint_stderr=stderr,
            pareto_k_per_datapoint=k,
        )
    elbo = float(elbo_mean)
    result = EvidenceEstimate(
        log_evidence=log_evidence,
        log_evidence_stderr=log_evidence_se,
        elbo=elbo,
        elbo_stderr=float(elbo_se),
        gap=log_evidence - elbo,
        pareto_k=pareto_k,
        ess=ess_value,
        num_samples=num_samples,
        log_weights=joint,
        psis=psis,
        **extra,
    )
    _report(result, k, reasons)
    return result


def _report(result: EvidenceEstimate, k: torch.Tensor, reasons: np.ndarray) -> None:
    """
    Our warning for k̂ not fitted (with the true reason of each row, :func:`psis_fit`) or above
    the threshold, a logging note for 0.5 < k̂ ≤ threshold.
    """
    what = "" if result.per_datapoint is None else f" (largest over plate '{result.per_datapoint}')"
    S, threshold = result.num_samples, result.k_threshold
    unfitted = torch.isnan(k)
    if bool(unfitted.any()):
        counts = Counter(str(r) for r in np.asarray(reasons).reshape(-1)[unfitted.reshape(-1).numpy()])
        if result.per_datapoint is None:
            where = ""
            why = explain_k(next(iter(counts)))
        else:
            where = f" for {int(unfitted.sum())} of {k.numel()} elements of plate '{result.per_datapoint}'"
            why = "; ".join(f"{n} element(s): {explain_k(r)}" for r, n in sorted(counts.items()))
        warnings.warn(
            f"Pareto k̂ cannot be fitted{where} from {S} importance samples: {why} (ESS {result.ess:.1f} of "
            f"{S}{'' if result.per_datapoint is None else ', the smallest'}). The evidence and gap estimates come "
            "without a reliability check.",
            ImportanceSamplingWarning,
            stacklevel=3,
        )
    fitted = k[~unfitted]
    worst = float(fitted.max()) if fitted.numel() else math.nan
    if worst > threshold:
        extra = ""
        if result.per_datapoint is not None:
            extra = f" ({int((k > threshold).sum())} of {k.numel()} elements have k̂ > {threshold:.2f})"
        warnings.warn(
            f"Pareto k̂ = {worst:.3g}{what} > {threshold:.3g} (the threshold for {S} "
            f"samples){extra}: the importance weights are too heavy-tailed, so log_evidence, its standard error "
            f"and gap are unreliable (the guide misses posterior mass; ESS {result.ess:.1f} of "
            f"{S}). Improve the guide (wider or richer family) or treat log_evidence as a lower "
            "bound only.",
            ImportanceSamplingWarning,
            stacklevel=3,
        )
    elif worst > PARETO_K_GOOD:
        logger.info(
            "Pareto k̂ = %.2f%s is between %.1f and %.2f: the evidence estimate is usable but converges slowly, "
            "and its standard error understates its error (the weights have infinite variance); more samples or "
            "a better guide help.",
            worst,
            what,
            PARETO_K_GOOD,
            threshold,
        )
