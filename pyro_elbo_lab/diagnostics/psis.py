# SPDX-License-Identifier: Apache-2.0
"""
Importance-weight statistics of a guide, each written once: Pareto-smoothed weights and
k̂, the verdict on k̂, the log mean weight with its standard error and the effective
sample size, and PSIS-corrected posterior means.

:func:`~pyro_elbo_lab.estimate_evidence`, the runner's evaluation,
:func:`~pyro_elbo_lab.summarize` and :func:`~pyro_elbo_lab.plots.plot_pareto_k` all use
these. The PSIS fit itself is :func:`pyro_elbo_lab.arviz_compat.psislw` (ArviZ's, on
either ArviZ generation).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from .. import arviz_compat

if TYPE_CHECKING:
    import xarray as xr

__all__ = [
    "IS_RELIABLE",
    "IS_UNCHECKED",
    "IS_UNRELIABLE",
    "IS_USABLE",
    "MIN_PSIS_SAMPLES",
    "MIN_TAIL_VALUES",
    "PARETO_K_BAD",
    "PARETO_K_GOOD",
    "K_CONSTANT",
    "K_FLAT_TAIL",
    "K_NO_WEIGHT",
    "K_NON_FINITE",
    "K_TIED_TAIL",
    "K_TOO_FEW_DRAWS",
    "K_REASONS",
    "PSISFit",
    "chain_log_weights",
    "explain_k",
    "importance_diagnostics",
    "importance_stats",
    "pareto_k_threshold",
    "psis_diagnostics",
    "psis_fit",
    "psis_means",
    "verdict",
    "VERDICTS",
]

#: k̂ thresholds of Vehtari et al. (2024): at most ``GOOD`` the importance-sampling
#: estimates are reliable (finite variance of the weights), above ``BAD`` they are not
#: at any sample size (:func:`pareto_k_threshold` is the sample-size dependent one).
PARETO_K_GOOD = 0.5
PARETO_K_BAD = 0.7

#: The fewest importance samples with a nonzero weight (finite log weight) from which k̂ is
#: fitted (both ArviZ generations).
MIN_PSIS_SAMPLES = arviz_compat.MIN_PSIS_DRAWS

#: The fewest distinct finite values among the M largest log weights (the tail PSIS fits)
#: for k̂ to be fitted: fewer, and :func:`psis_fit` decides without ArviZ (flat: bounded,
#: k̂ = -inf; else NaN). ArviZ 0.2x fits a Pareto shape to as few as 5 tied tail draws and
#: returns a negative k̂ ("IS reliable" for one rare dominating weight), 1.x refuses them.
MIN_TAIL_VALUES = 5

#: Log weights that vary by less than this many nats are treated as constant (q ∝ p(z|x)).
CONSTANT_TOL = 1e-9

#: For log weights computed in a lower precision the constant tolerance grows with the
#: rounding error of their dtype: this many machine epsilons times ``1 + max |log w|``, at
#: most :data:`ROUNDING_TOL_MAX` (float32 at ``|log w| ≈ 30``: about 2e-4 nats; float64:
#: below ``CONSTANT_TOL``). An exact float32 guide's log weights vary by about 4 epsilons
#: times ``|log w|`` (a sum of ``N`` log-likelihood terms; measured up to ``N = 20 000``);
#: 64 leaves a margin of 16 while a heavy tail (k > 0.5) spans nats.
CONSTANT_ROUNDING = 64

#: The most the rounding tolerance may grow to, in nats: log weights with a larger rounding
#: error than this (float32 at ``|log w|`` above about 7 000) are fitted as they are, so
#: that rounding can make a verdict more cautious, never call a heavy tail flat.
ROUNDING_TOL_MAX = 0.05

#: Tail values closer than this many machine epsilons times ``1 + max |log w|`` count as
#: ties when the tail's distinct values are counted (a discrete guide's equal weights,
#: computed in a different order): far below the constant tolerance, so that a dense tail
#: of many close values is not taken for a few tied ones.
TIE_ROUNDING = 4

#: The words of :func:`verdict`. They speak of importance sampling (IS) only, never of
#: the guide's accuracy: a guide can be far from the posterior with k̂ ≤ 0.5 (the
#: weights then correct it). The guide's accuracy is
#: :meth:`pyro_elbo_lab.diagnostics.moments.GuideMoments.verdict`'s.
IS_RELIABLE = "IS reliable"
IS_USABLE = "IS usable"
IS_UNRELIABLE = "IS unreliable"
IS_UNCHECKED = "IS unchecked"
VERDICTS = (IS_RELIABLE, IS_USABLE, IS_UNRELIABLE, IS_UNCHECKED)

#: Why a row's k̂ is not a fitted value (:attr:`PSISFit.reasons`; ``""``: fitted). ``-inf``
#: (bounded weights, "IS reliable"): :data:`K_CONSTANT`, :data:`K_FLAT_TAIL`. ``nan`` ("IS
#: unchecked"): the others.
K_CONSTANT = "constant weights"
#: k̂ = -inf: PSIS cannot fit the tail, whose largest weights are all equal (bounded weights).
K_FLAT_TAIL = "flat tail"
#: k̂ = nan: fewer than :data:`MIN_PSIS_SAMPLES` draws with a nonzero weight.
K_TOO_FEW_DRAWS = "too few draws"
#: k̂ = nan: the tail holds fewer than :data:`MIN_TAIL_VALUES` distinct values (or ArviZ
#: cannot fit it) and is not flat.
K_TIED_TAIL = "tail of few distinct values"
#: k̂ = nan: a log weight is nan or +inf.
K_NON_FINITE = "non-finite log weights"
#: k̂ = nan: every log weight is -inf.
K_NO_WEIGHT = "every weight zero"

#: What each reason means, in words (:func:`explain_k`).
K_REASONS = {
    K_CONSTANT: "the log weights are constant (the guide is proportional to the posterior): no tail, k̂ = -inf",
    K_FLAT_TAIL: (
        "the largest weights are all equal (weights taking a few values, as a discrete guide's): a bounded "
        "tail, k̂ = -inf"
    ),
    K_TOO_FEW_DRAWS: (
        f"fewer than {MIN_PSIS_SAMPLES} draws with a nonzero weight (finite log weight): too few to fit a "
        "Pareto tail; draw more samples"
    ),
    K_TIED_TAIL: (
        "the upper tail holds too few distinct values to fit a Pareto shape and is not flat: one or a few "
        "weights dominate (weights taking a few values, one of them rare under the guide); look at the ESS, "
        "draw more samples or widen the guide"
    ),
    K_NON_FINITE: "a log weight is nan or +inf: the model or guide density is undefined at a draw",
    K_NO_WEIGHT: "every log weight is -inf: the model gives zero density to every draw of the guide",
}


def explain_k(reason: str) -> str:
    """
    The sentence for one of the ``K_*`` reasons of :func:`psis_fit`.

    :param str reason: a key of :data:`K_REASONS`.
    :rtype: str
    :raises ValueError: for another string.
    """
    if reason not in K_REASONS:
        raise ValueError(f"reason must be one of {sorted(K_REASONS)}, got reason={reason!r}")
    return K_REASONS[reason]


def pareto_k_threshold(num_samples: int | None) -> float:
    """
    The sample-size dependent k̂ threshold of Vehtari et al. (2024),
    :math:`\\min(1 - 1/\\log_{10} S, 0.7)`: above it PSIS estimates from ``S`` draws are
    unreliable (0.5 at ``S = 100``, 0.667 at ``S = 1000``, 0.7 from ``S = 2155``).
    ``None`` (sample size not known) gives the large-sample limit 0.7; ``S <= 10`` gives 0.

    :param int num_samples: the number of importance samples ``S``, or ``None``.
    :rtype: float

    References

    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    """
    if num_samples is None:
        return PARETO_K_BAD
    if num_samples <= 10:
        return 0.0
    return min(1.0 - 1.0 / math.log10(num_samples), PARETO_K_BAD)


def verdict(k: float, num_samples: int | None = None) -> str:
    """
    What a Pareto k̂ says about importance sampling (IS) from the guide, and nothing about
    the guide's own accuracy:

    - ``"IS reliable"``: k̂ ≤ 0.5 (and ≤ the threshold; ``-inf`` for constant weights):
      the weights have finite variance; the evidence, its standard error and
      PSIS-corrected estimates can be trusted.
    - ``"IS usable"``: 0.5 < k̂ ≤ :func:`pareto_k_threshold` of ``num_samples``: PSIS
      estimates are usable but converge slowly.
    - ``"IS unreliable"``: k̂ above the threshold: the evidence, its standard error and
      PSIS-corrected estimates cannot be trusted.
    - ``"IS unchecked"``: k̂ is NaN (too few draws to fit it).

    :param float k: the Pareto shape k̂.
    :param int num_samples: the number of draws k̂ was fitted from (``None``: threshold 0.7).
    :rtype: str

    >>> [verdict(k) for k in (0.3, 0.6, 0.9, float("nan"))]
    ['IS reliable', 'IS usable', 'IS unreliable', 'IS unchecked']
    >>> verdict(0.6, num_samples=100)  # threshold 1 - 1 / log10(100) = 0.5 for 100 draws
    'IS unreliable'

    References

    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    """
    k = float(k)
    if math.isnan(k):
        return IS_UNCHECKED
    threshold = pareto_k_threshold(num_samples)
    if k > threshold:
        return IS_UNRELIABLE
    if k <= PARETO_K_GOOD:
        return IS_RELIABLE
    return IS_USABLE


class PSISFit(NamedTuple):
    """
    The result of :func:`psis_fit`.

    :ivar torch.Tensor smoothed: unnormalised smoothed log weights in nats, shape
        ``(..., S)``, on the device of the input (raw where k̂ is not fitted).
    :ivar torch.Tensor k: k̂ per row, shape ``(...)``, on the CPU: fitted, ``-inf`` (bounded
        weights) or ``nan`` (not fitted).
    :ivar numpy.ndarray reasons: per row, ``""`` where k̂ was fitted, else the ``K_*``
        reason (strings, shape ``(...)``).
    """

    smoothed: torch.Tensor
    k: torch.Tensor
    reasons: np.ndarray


def psis_diagnostics(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    ``(smoothed, k)`` of :func:`psis_fit`.

    :param torch.Tensor log_weights: log importance weights in nats, shape ``(..., S)``.
    :rtype: tuple
    :raises ValueError: as :func:`psis_fit`.
    """
    fit = psis_fit(log_weights)
    return fit.smoothed, fit.k


def psis_fit(log_weights: torch.Tensor) -> PSISFit:
    """
    Pareto-smoothed log weights and the Pareto shape k̂ of their upper tail, along the last
    dim, with :func:`pyro_elbo_lab.arviz_compat.psislw` (relative efficiency 1:
    independent draws), and why k̂ is not a fitted value where it is not.

    PSIS replaces the largest :math:`M = \\lceil\\min(S/5, 3\\sqrt S)\\rceil` weights by the
    expected order statistics of a generalised Pareto distribution fitted to them; its shape
    :math:`\\hat k` says how many moments the weights have (:math:`\\hat k < 0.5`: finite
    variance; :math:`\\hat k > 0.7`: estimates unreliable). The smoothed weights keep the
    scale of the raw ones (the body of the weights is unchanged), so
    :math:`\\log \\frac1S \\sum_s \\tilde w_s` estimates the evidence. Rows that are not fitted
    (raw weights returned), with their reason:

    - k̂ = ``-inf`` (bounded weights, nothing to smooth): :data:`K_CONSTANT`, log weights
      constant to ``1e-9`` nats (or to the rounding error of their dtype, see
      ``CONSTANT_ROUNDING`` and ``ROUNDING_TOL_MAX``); :data:`K_FLAT_TAIL`, a tail whose
      :math:`M` largest weights are all equal to the same tolerance (weights that take a
      few values, as a discrete guide's: bounded, so every moment is finite).
    - k̂ = ``nan``: :data:`K_TOO_FEW_DRAWS`, fewer than :data:`MIN_PSIS_SAMPLES` (25) draws
      with a finite log weight; :data:`K_TIED_TAIL`, a tail that is not flat and holds fewer
      than :data:`MIN_TAIL_VALUES` (5) distinct finite values, or that ArviZ cannot fit (a
      rare large weight dominates: the estimate is not checked, and usually poor; decided
      here, so both ArviZ generations agree); :data:`K_NON_FINITE`, a ``nan`` or ``+inf``
      log weight; :data:`K_NO_WEIGHT`, every log weight ``-inf``. Single ``-inf`` log
      weights (zero weights) are allowed.

    :param torch.Tensor log_weights: log importance weights in nats, shape ``(..., S)``.
    :rtype: PSISFit
    :raises ValueError: if ``log_weights`` is not a tensor with at least one dimension.

    References

    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    """
    if not torch.is_tensor(log_weights) or log_weights.dim() < 1:
        raise ValueError(
            "log_weights must be a tensor of shape (..., S) with the importance samples along the last dim, "
            f"got {log_weights!r}; pass log_weights.reshape(-1) for one set of weights"
        )
    lw = log_weights.detach().to("cpu", torch.float64).numpy()
    S = lw.shape[-1]
    batch = lw.shape[:-1]
    reasons = np.full(batch, "", dtype=object)
    k = np.full(batch, np.nan)
    non_finite = np.isnan(lw).any(-1) | np.isposinf(lw).any(-1)
    no_weight = ~non_finite & np.isneginf(lw).all(-1)
    valid = ~(non_finite | no_weight)
    reasons[non_finite] = K_NON_FINITE
    reasons[no_weight] = K_NO_WEIGHT
    eps = torch.finfo(log_weights.dtype).eps if log_weights.dtype.is_floating_point else 0.0
    with np.errstate(invalid="ignore"):
        top = np.where(valid, lw.max(-1), 0.0)
        rounding = eps * (1.0 + np.abs(top))
        tol = np.maximum(CONSTANT_TOL, np.minimum(CONSTANT_ROUNDING * rounding, ROUNDING_TOL_MAX))
        tie_tol = np.minimum(tol, np.maximum(CONSTANT_TOL, TIE_ROUNDING * rounding))
        constant = valid & ((lw.max(-1) - lw.min(-1)) <= tol)
    k[constant] = -np.inf
    reasons[constant] = K_CONSTANT
    rows = valid & ~constant
    # zero weights (-inf) are not draws PSIS can fit: count the finite ones against the floor
    few_draws = rows & (np.isfinite(lw).sum(-1) < MIN_PSIS_SAMPLES)
    reasons[few_draws] = K_TOO_FEW_DRAWS
    rows = rows & ~few_draws
    if not rows.any():
        return PSISFit(log_weights, torch.as_tensor(k, dtype=log_weights.dtype), reasons.astype(str))
    smoothed = lw.copy()
    varying = lw[rows]
    # the tail PSIS fits, its M largest weights: decided here, before ArviZ, when it holds fewer than
    # MIN_TAIL_VALUES distinct finite values (ArviZ 0.2x fits a k̂ to 5 ties, 1.x refuses them): bounded
    # (k̂ = -inf) when flat, else not checked (NaN: one or a few rare weights dominate)
    M = math.ceil(min(S / 5, 3 * math.sqrt(S)))
    tail = np.sort(varying, -1)[..., -M:]
    tol_rows = tol[rows]
    with np.errstate(invalid="ignore"):
        flat = (tail[..., -1] - tail[..., 0]) <= tol_rows
        steps = (np.diff(tail, axis=-1) > tie_tol[rows][..., None]) & np.isfinite(tail[..., :-1])
    distinct = np.isfinite(tail).any(-1) + steps.sum(-1)
    k_rows = np.where(flat, -np.inf, np.nan)
    row_reasons = np.where(flat, K_FLAT_TAIL, K_TIED_TAIL).astype(object)
    smoothed_rows = varying.copy()
    fit = ~flat & (distinct >= MIN_TAIL_VALUES)
    if fit.any():
        to_fit = varying[fit]
        normalised, k_fit = arviz_compat.psislw(to_fit)
        # PSIS leaves the body of the weights as it is: the smallest weight gives back the scale
        # (a zero weight, -inf, stays zero: the shift comes from the smallest finite one)
        body = np.where(np.isfinite(to_fit), to_fit, np.inf)
        low = body.argmin(-1)[..., None]
        shift = np.take_along_axis(to_fit, low, -1) - np.take_along_axis(normalised, low, -1)
        fitted = ~np.isnan(k_fit)
        smoothed_rows[fit] = np.where(fitted[..., None], normalised + shift, to_fit)
        # a tail ArviZ still cannot fit (NaN on either generation) is not checked
        k_rows[fit] = k_fit
        row_reasons[fit] = np.where(fitted, "", K_TIED_TAIL)
    k[rows], reasons[rows], smoothed[rows] = k_rows, row_reasons, smoothed_rows
    return PSISFit(
        torch.as_tensor(smoothed, dtype=log_weights.dtype, device=log_weights.device),
        torch.as_tensor(k, dtype=log_weights.dtype),
        reasons.astype(str),
    )


def importance_stats(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The log mean weight, its delta-method standard error and the effective sample size,
    along the last dim:

    .. math::

        \\log \\bar w = \\log \\frac1S \\sum_s w_s, \\qquad
        \\mathrm{se}(\\log \\bar w) \\approx \\frac{\\mathrm{sd}(w)}{\\sqrt S\\, \\bar w}, \\qquad
        \\mathrm{ESS} = \\frac{1}{\\sum_s \\bar w_s^2}

    with :math:`\\bar w_s = w_s / \\sum_t w_t`. The standard error is valid when the
    weights have finite variance (k̂ < 0.5).

    :param torch.Tensor log_weights: log weights in nats (raw or smoothed), shape
        ``(..., S)``.
    :returns: ``(log_mean, stderr, ess)``, each of shape ``(...)``; nats, nats, draws.
    :rtype: tuple

    References

    - *Importance Weighted Autoencoders*, Y. Burda, R. Grosse, R. Salakhutdinov (2016)
    - *Monte Carlo theory, methods and examples* (ch. 9, importance sampling), A. B. Owen (2013)
    """
    S = log_weights.shape[-1]
    log_mean = torch.logsumexp(log_weights, -1) - math.log(S)
    w = torch.exp(log_weights - log_weights.max(-1, keepdim=True).values)  # in (0, 1], the largest is 1
    mean = w.mean(-1)
    # var(mean w) = var(w)/S; d log(m) = dm/m  =>  se(log mean) = sd(w) / (sqrt(S) * mean(w))
    stderr = w.std(-1) / (math.sqrt(S) * mean)
    wn = w / w.sum(-1, keepdim=True)
    ess = 1.0 / (wn**2).sum(-1)
    return log_mean, stderr, ess


def importance_diagnostics(log_weights: np.ndarray | torch.Tensor) -> dict[str, float]:
    """
    Importance-sampling diagnostics from one set of log weights
    :math:`\\log w_s = \\log p(x, z_s) - \\log q(z_s)`, in nats: the estimates of
    :func:`pyro_elbo_lab.estimate_evidence` with ``psis=True`` (what the runner's
    evaluation records as ``eval_*``): ``log_evidence``, its standard error and ``ess``
    from the Pareto-smoothed weights, ``elbo`` from the raw ones.

    :param log_weights: shape ``(S,)``, a NumPy array or tensor.
    :returns: ``log_evidence`` :math:`\\log \\frac1S \\sum_s \\tilde w_s`,
        ``log_evidence_stderr``, ``elbo`` :math:`\\frac1S \\sum_s \\log w_s`, ``gap``
        (``log_evidence - elbo``, an estimate of :math:`\\mathrm{KL}(q \\| p(z \\mid x))`),
        ``pareto_k`` (``-inf`` for constant weights, NaN below 25 draws), ``ess``.
    :rtype: dict

    References

    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    - *Yes, but Did It Work?: Evaluating Variational Inference*, Y. Yao, A. Vehtari,
      D. Simpson, A. Gelman (2018)
    """
    lw = torch.as_tensor(_float_array(log_weights))
    smoothed, k = psis_diagnostics(lw)  # in the weights' own dtype: PSIS allows for its rounding
    lw, smoothed = lw.double(), smoothed.double()
    log_evidence, stderr, ess = (float(v) for v in importance_stats(smoothed))
    elbo = float(lw.mean())
    return {
        "log_evidence": log_evidence,
        "log_evidence_stderr": stderr,
        "elbo": elbo,
        "gap": log_evidence - elbo,
        "pareto_k": float(k),
        "ess": ess,
    }


def chain_log_weights(data: Any, chain: int) -> np.ndarray:
    """
    One chain's ``sample_stats.log_importance_weight`` of a converter result, shape
    ``(draw,)``, nats, in the dtype it was computed in (float32 or float64).

    :param data: an ``InferenceData`` or ``DataTree`` from
        :func:`~pyro_elbo_lab.to_inference_data`.
    :param int chain: the chain's position.
    :rtype: numpy.ndarray
    """
    stats = arviz_compat.group(data, "sample_stats")
    return _float_array(stats["log_importance_weight"].isel(chain=chain).values)


def _float_array(values: Any) -> np.ndarray:
    """``values`` as float32 or float64, the dtype they hold (the one they were computed in), else float64."""
    array = np.asarray(values)
    return array if array.dtype in (np.float32, np.float64) else array.astype("float64")


def psis_means(data: Any) -> xr.Dataset:
    """
    PSIS-corrected posterior means: per chain the self-normalised importance-sampling
    estimate :math:`\\sum_s \\bar{\\tilde w}_s z_s` with the Pareto-smoothed, normalised
    weights of ``sample_stats.log_importance_weight``, averaged over chains. Reliable
    where k̂ ≤ 0.7 (see :func:`importance_diagnostics`).

    :param data: an ``InferenceData`` or ``DataTree`` from
        :func:`~pyro_elbo_lab.to_inference_data`.
    :returns: the posterior's variables without the ``chain`` and ``draw`` dims, in the
        units of each variable.
    :rtype: xarray.Dataset

    References

    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    """
    import xarray as xr

    post = arviz_compat.group(data, "posterior")
    chains = []
    for c in range(post.sizes["chain"]):
        smoothed, _ = psis_diagnostics(torch.as_tensor(chain_log_weights(data, c)))
        weights = torch.softmax(smoothed.double(), -1).numpy()
        w = xr.DataArray(weights, dims=["draw"], coords={"draw": post["draw"].values})
        chains.append((post.isel(chain=c) * w).sum("draw"))
    return sum(chains[1:], chains[0]) / len(chains)
