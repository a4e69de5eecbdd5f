# SPDX-License-Identifier: Apache-2.0
"""
The guide's own error, estimated: its mean and sd per latent element against the
Pareto-smoothed importance-sampling (PSIS) estimates of the posterior's, from the same draws.

A guide :math:`q(z)` fitted by VI reports moments of :math:`q`, not of :math:`p(z \\mid x)`.
Reweighting draws :math:`z_s \\sim q` by :math:`w_s = p(x, z_s) / q(z_s)` (Pareto-smoothed)
gives self-normalised estimates of the posterior's moments whenever the weights' Pareto
:math:`\\hat k` is small enough; their difference from the guide's moments estimates the
guide's error in units of the posterior sd.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .. import arviz_compat
from ..checks import check_int, check_model_kwargs
from .local import batches, plan, site_distribution, site_value
from .psis import PARETO_K_GOOD, chain_log_weights, pareto_k_threshold, psis_diagnostics
from .traces import SAMPLE_PLATE, log_joint_and_guide, vectorized_traces
from .weighted_moments import guide_error_mcse, self_normalized_moments

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "GuideMoments",
    "guide_moments",
    "moments_from_draws",
    "moments_from_inference_data",
]

#: Default tolerances of :meth:`GuideMoments.verdict`.
MEAN_ERROR_TOL = 0.1
SD_RATIO_TOL = 0.1

#: The per-element numeric fields of :class:`GuideMoments`, in table order.
MOMENT_FIELDS = (
    "guide_mean guide_mean_mcse guide_sd guide_sd_mcse psis_mean psis_mean_mcse psis_sd psis_sd_mcse "
    "mean_error mean_error_mcse sd_ratio sd_ratio_mcse"
).split()

#: The words of :meth:`GuideMoments.accuracy` (the guide's own moments, against the tolerances).
ACCURATE, INACCURATE, UNCERTAIN, UNKNOWN = "accurate", "inaccurate", "uncertain", "unknown"


@dataclass(frozen=True)
class GuideMoments:
    """
    The guide's moments and their PSIS-estimated errors, per latent element, in the
    constrained space of the model's sites.

    Every array below has one entry per latent element (``names[i]``, e.g. ``"beta[0]"``
    for element 0 of site ``beta``), in the order of the model's sites.

    :ivar list names: element names.
    :ivar list sites: the site of each element.
    :ivar np.ndarray guide_mean, guide_sd: sample moments of the guide's draws.
    :ivar np.ndarray guide_mean_mcse, guide_sd_mcse: their Monte Carlo standard errors.
    :ivar np.ndarray psis_mean, psis_sd: PSIS self-normalised estimates of the posterior's
        mean and sd (meaningful where ``pareto_k <= k_threshold``).
    :ivar np.ndarray psis_mean_mcse, psis_sd_mcse: their delta-method MCSE (the sd's only
        for k̂ < 0.5: :attr:`sd_mcse_reliable`).
    :ivar np.ndarray mean_error: ``(guide_mean - psis_mean) / psis_sd``, the guide's
        estimated standardised mean error; NaN where k̂ is above the threshold.
    :ivar np.ndarray mean_error_mcse: its delta-method MCSE
        (:func:`~pyro_elbo_lab.diagnostics.weighted_moments.guide_error_mcse`: the
        guide's and the PSIS moments come from the same draws).
    :ivar np.ndarray sd_ratio: ``guide_sd / psis_sd``; NaN where k̂ is above the threshold.
    :ivar np.ndarray sd_ratio_mcse: its delta-method MCSE
        (:func:`~pyro_elbo_lab.diagnostics.weighted_moments.guide_error_mcse`; only for
        k̂ < 0.5: :attr:`sd_mcse_reliable`).
    :ivar float pareto_k: k̂ of the joint importance weights (one for all elements).
    :ivar float k_threshold: :func:`~pyro_elbo_lab.diagnostics.psis.pareto_k_threshold` of ``num_samples``.
    :ivar int num_samples: ``S``.
    :ivar str reason: why the errors are NaN, or ``""``.
    """

    names: list[str]
    sites: list[str]
    guide_mean: np.ndarray
    guide_sd: np.ndarray
    guide_mean_mcse: np.ndarray
    guide_sd_mcse: np.ndarray
    psis_mean: np.ndarray
    psis_sd: np.ndarray
    psis_mean_mcse: np.ndarray
    psis_sd_mcse: np.ndarray
    mean_error: np.ndarray
    mean_error_mcse: np.ndarray
    sd_ratio: np.ndarray
    sd_ratio_mcse: np.ndarray
    pareto_k: float
    k_threshold: float
    num_samples: int
    reason: str = ""
    log_weights: torch.Tensor | None = field(default=None, repr=False)

    @property
    def reliable(self) -> bool:
        """Whether importance sampling is reliable: ``pareto_k <= k_threshold``."""
        return bool(self.pareto_k <= self.k_threshold)

    @property
    def sd_mcse_reliable(self) -> bool:
        """
        Whether ``psis_sd_mcse`` and ``sd_ratio_mcse`` measure the errors of ``psis_sd`` and
        ``sd_ratio``: k̂ < 0.5 (:data:`~pyro_elbo_lab.diagnostics.psis.PARETO_K_GOOD`;
        ``-inf``, constant weights, included). These MCSEs are central-limit standard errors
        of a self-normalised estimate of :math:`\\mathbb{E}_p (h - \\mu)^2`, so they need the
        weighted terms :math:`w_s (h_s - \\mu)^2` to have finite variance; with a Pareto tail
        of shape :math:`k` in the weights that fails for :math:`k \\ge 1/2` (Vehtari et al.
        2024, who take the k̂ of a function's estimate as the larger of the weights' and that
        of :math:`w h`: never below the weights'). For
        0.5 ≤ k̂ ≤ ``k_threshold`` ("usable") the PSIS sd converges slowly and mostly from
        below (the draws miss the posterior's tails), and its MCSE understates its error:
        a Gaussian guide of 0.6 posterior sd (k = 0.64) put ``psis_sd`` more than 2 MCSE off
        the exact sd in 37 % of 100 runs (measurements in
        :func:`~pyro_elbo_lab.diagnostics.weighted_moments.self_normalized_moments`). A k̂
        below 0.5 is no guarantee either: k̂ is noisy, the coverage already slips to about
        90 % for 0.25 < k < 0.5, and where the true k is above 0.5 the runs whose k̂ falls below
        it are those whose draws missed the tail, so their ``psis_sd`` is the furthest off (at
        k = 0.64, 27 % of 60 runs had k̂ < 0.5, and 88 % of those were more than 2 MCSE off).
        The means' MCSEs held up in the same runs, so they carry no such flag.
        """
        return bool(self.pareto_k < PARETO_K_GOOD)

    def to_dataframe(self) -> pd.DataFrame:
        """
        :returns: one row per latent element (index ``name``) with columns ``site``, the
            guide's and PSIS moments and MCSEs, ``mean_error``, ``sd_ratio``, their MCSEs,
            ``pareto_k`` and ``sd_mcse_reliable`` (:attr:`sd_mcse_reliable`).
        :rtype: pandas.DataFrame
        """
        import pandas as pd

        df = pd.DataFrame({c: getattr(self, c) for c in MOMENT_FIELDS}, index=pd.Index(self.names, name="name"))
        df.insert(0, "site", self.sites)
        df["pareto_k"] = self.pareto_k
        df["sd_mcse_reliable"] = self.sd_mcse_reliable
        return df

    def element_status(self, mean_error_tol: float = MEAN_ERROR_TOL, sd_ratio_tol: float = SD_RATIO_TOL) -> list[str]:
        """
        Per element: ``"accurate"`` (the estimated errors, ±2 MCSE, are inside the
        tolerances), ``"inaccurate"`` (an estimated error is outside them by more than 2
        MCSE), ``"uncertain"`` (the tolerance is within 2 MCSE of an estimate: draw more
        samples) or ``"unknown"`` (k̂ above the threshold).

        :param float mean_error_tol: largest acceptable ``|mean_error|`` (posterior sds).
        :param float sd_ratio_tol: largest acceptable ``|sd_ratio - 1|``.
        :rtype: list
        """
        if not self.reliable:
            return ["unknown"] * len(self.names)
        out = []
        for m, mm, r, rm in zip(self.mean_error, self.mean_error_mcse, self.sd_ratio, self.sd_ratio_mcse):
            if not (np.isfinite(m) and np.isfinite(r)):
                out.append("unknown")
            elif abs(m) - 2 * mm > mean_error_tol or abs(r - 1) - 2 * rm > sd_ratio_tol:
                out.append("inaccurate")
            elif abs(m) + 2 * mm <= mean_error_tol and abs(r - 1) + 2 * rm <= sd_ratio_tol:
                out.append("accurate")
            else:
                out.append("uncertain")
        return out

    def accuracy(self, mean_error_tol: float = MEAN_ERROR_TOL, sd_ratio_tol: float = SD_RATIO_TOL) -> str:
        """
        One word for the guide's moments as a whole: ``"inaccurate"`` if an element is
        (:meth:`element_status`), else ``"uncertain"`` if an element is, ``"accurate"`` if
        every element is, ``"unknown"`` when importance sampling is not reliable enough to
        tell (k̂ above the threshold, or not fitted).

        :param float mean_error_tol: largest acceptable ``|mean_error|``, in posterior sds.
        :param float sd_ratio_tol: largest acceptable ``|sd_ratio - 1|``.
        :rtype: str
        """
        status = self.element_status(mean_error_tol, sd_ratio_tol)
        for word in (INACCURATE, UNCERTAIN, UNKNOWN):
            if word in status:
                return word
        return ACCURATE if status else UNKNOWN

    def verdict(self, mean_error_tol: float = MEAN_ERROR_TOL, sd_ratio_tol: float = SD_RATIO_TOL) -> str:
        """
        What the numbers show, in three parts: whether importance sampling is reliable
        (k̂), whether the guide's own moments are accurate (the estimated errors against
        the tolerances, with their MCSE), and which estimates to use.

        :param float mean_error_tol: largest acceptable ``|mean_error|``, in posterior sds.
        :param float sd_ratio_tol: largest acceptable ``|sd_ratio - 1|``.
        :rtype: str
        """
        k, thr = self.pareto_k, self.k_threshold
        if math.isnan(k):
            return (
                f"Importance sampling is unchecked (Pareto k̂ could not be fitted from {self.num_samples} draws), "
                "so the guide's accuracy is unknown. Draw more samples."
            )
        if not self.reliable:
            return (
                f"Importance sampling is unreliable (Pareto k̂ = {k:.3g} > {thr:.3g}): the PSIS-corrected moments "
                "and the guide's estimated errors cannot be trusted, so the guide's accuracy is unknown. "
                "Use neither as the posterior: fit a richer guide or run MCMC."
            )
        status = self.element_status(mean_error_tol, sd_ratio_tol)
        tol = (
            f"|mean error| ≤ {mean_error_tol:g} posterior sd and sd ratio within "
            f"[{1 - sd_ratio_tol:g}, {1 + sd_ratio_tol:g}]"
        )
        if k <= PARETO_K_GOOD:
            head = f"Importance sampling is reliable (Pareto k̂ = {k:.3g} ≤ {PARETO_K_GOOD}). "
        else:
            head = (
                f"Importance sampling is usable (Pareto k̂ = {k:.3g} ≤ {thr:.3g}; the estimates converge slowly, and "
                f"at k̂ ≥ {PARETO_K_GOOD} the MCSEs of psis_sd and sd_ratio understate their errors). "
            )
        if self.sd_mcse_reliable:
            use = "Use the PSIS-corrected moments (psis_mean, psis_sd, with their MCSE), not the guide's."
            meanwhile = "Use the PSIS-corrected moments meanwhile."
        else:
            use = (
                "Use psis_mean (with its MCSE), not the guide's mean; psis_sd is only approximate here (it tends to "
                "fall short of the posterior sd, by more than its MCSE says): fit a wider or richer guide or run "
                "MCMC for the sd."
            )
            meanwhile = "Use psis_mean meanwhile; psis_sd is only approximate here."
        bad = [i for i, s in enumerate(status) if s == "inaccurate"]
        unsure = [i for i, s in enumerate(status) if s == "uncertain"]

        def describe(idx: list[int]) -> str:
            return ", ".join(
                f"{self.names[i]} (mean error {self.mean_error[i]:+.2f} sd, sd ratio {self.sd_ratio[i]:.2f})"
                for i in idx[:5]
            ) + (f" and {len(idx) - 5} more" if len(idx) > 5 else "")

        if bad:
            return head + f"The guide's moments are inaccurate ({tol} fails beyond 2 MCSE) at {describe(bad)}. " + use
        if unsure:
            return (
                head + f"Whether the guide's moments meet {tol} is undetermined at {describe(unsure)}: the "
                "tolerance is within 2 MCSE of the estimate; draw more samples. " + meanwhile
            )
        unknown = [self.names[i] for i, s in enumerate(status) if s == "unknown"]
        if unknown:
            return (
                head + f"The guide's moments cannot be assessed at {', '.join(unknown[:5])} (a PSIS sd of 0 or "
                "not finite), so no claim is made about them. " + meanwhile.replace(" meanwhile", "")
            )
        if not self.sd_mcse_reliable:
            return (
                head + f"The guide's moments look accurate: {tol} at every element, within 2 MCSE, but the sd "
                f"comparison rests on MCSEs that understate their errors at k̂ ≥ {PARETO_K_GOOD}. The means may be "
                "used; take the sds as approximate."
            )
        return (
            head + f"The guide's moments are accurate: {tol} at every element, within 2 MCSE. "
            "The guide's and the PSIS-corrected moments may both be used."
        )

    def __str__(self) -> str:
        return self.verdict()


def _site_values(site: Mapping[str, Any], max_plate_nesting: int) -> torch.Tensor:
    """A latent site's value as ``(S, *element shape)``, the sample plate moved to the front."""
    value = site_value(site)
    batch_len = len(site_distribution(site).batch_shape)
    axis = batch_len - (max_plate_nesting + 1)
    if axis < 0:
        raise ValueError(f"site '{site['name']}' is not inside the sample plate {SAMPLE_PLATE!r}")
    event_dim = value.dim() - batch_len
    plates = [-f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None and f.name != SAMPLE_PLATE]
    keep = max(plates, default=0) + event_dim
    value = value.movedim(axis, 0)
    rest = value.shape[1:]
    extra = len(rest) - keep
    if extra > 0:
        value = value.reshape((value.shape[0],) + rest[extra:])
    return value


def _element_names(name: str, shape: torch.Size) -> list[str]:
    if len(shape) == 0:
        return [name]
    return [f"{name}[{','.join(map(str, idx))}]" for idx in np.ndindex(*shape)]


def guide_moments(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    num_samples: int = 4000,
    batch_size: int | None = None,
    max_plate_nesting: int | None = None,
) -> GuideMoments:
    """
    The guide's mean and sd of every latent element and their errors against the posterior's,
    estimated by Pareto-smoothed self-normalised importance sampling from the same draws.

    Draws :math:`z_s \\sim q`, ``s = 1..S``, in vectorised batches, with log weights
    :math:`\\log w_s = \\log p(x, z_s) - \\log q(z_s)` (nats), smooths them with PSIS and
    estimates, for each element :math:`h` of each latent site (constrained space):
    :math:`\\hat\\mu_q, \\hat\\sigma_q` (equal weights) and :math:`\\hat\\mu_p,
    \\hat\\sigma_p` (smoothed weights), with the MCSE of
    :func:`~pyro_elbo_lab.diagnostics.weighted_moments.self_normalized_moments`
    (the errors': :func:`~pyro_elbo_lab.diagnostics.weighted_moments.guide_error_mcse`).
    Where :math:`\\hat k \\le \\min(1 - 1/\\log_{10}S, 0.7)` the guide's standardised
    mean error :math:`(\\hat\\mu_q - \\hat\\mu_p)/\\hat\\sigma_p` and sd ratio
    :math:`\\hat\\sigma_q/\\hat\\sigma_p` are reported; above it they are NaN (``reason`` says
    why).

    :param model: a Pyro model.
    :param guide: a guide for it (for example an AutoGuide after fitting).
    :param args: the model's positional data.
    :param dict model_kwargs: the model's keyword data.
    :param int num_samples: S, at least 100.
    :param int batch_size: draws per vectorised pass; chosen from the model's size when None.
    :param int max_plate_nesting: the model's plate depth; guessed when None.
    :rtype: GuideMoments
    :raises ValueError: on bad arguments, if the model has no latent site, or if a log
        weight is not finite.

    References

    - *Yes, but Did It Work?: Evaluating Variational Inference*, Y. Yao, A. Vehtari,
      D. Simpson, A. Gelman (2018)
    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    """
    kwargs = check_model_kwargs(model_kwargs)
    check_int("num_samples", num_samples, 100, hint="PSIS needs at least 100 draws; 4000 is a good default")
    check_int("batch_size", batch_size, 1, allow_none=True)
    check_int("max_plate_nesting", max_plate_nesting, 0, allow_none=True)
    max_plate_nesting, batch_size = plan(model, guide, args, kwargs, max_plate_nesting, batch_size)

    chunks: dict[str, list[torch.Tensor]] = {}
    lw_chunks: list[torch.Tensor] = []
    with torch.no_grad():
        for n in batches(num_samples, batch_size):
            traces = vectorized_traces(model, guide, args, kwargs, n, max_plate_nesting)
            log_p, log_q = log_joint_and_guide(traces)
            lw = log_p - log_q
            if not bool(torch.isfinite(lw).all()):
                raise ValueError(
                    f"{int((~torch.isfinite(lw)).sum())} of {n} draws have a non-finite log weight "
                    "log p(x,z) - log q(z): the guide proposes values where the model's density is zero or "
                    "undefined; check the supports of the model's and the guide's sites"
                )
            lw_chunks.append(lw)
            for name, site in traces.model_trace.nodes.items():
                if site["type"] == "sample" and not site["is_observed"]:
                    chunks.setdefault(name, []).append(_site_values(site, max_plate_nesting))
    if not chunks:
        raise ValueError(
            "guide_moments needs a model with latent sites, but the model has none (every sample site is "
            "observed), so there are no moments to compare; for the evidence of such a model use "
            "estimate_evidence(model, guide, *args)"
        )
    lw = torch.cat(lw_chunks)  # in the model's dtype: PSIS allows for its rounding (moments_from_draws)
    names: list[str] = []
    sites: list[str] = []
    columns: list[torch.Tensor] = []
    for name, parts in chunks.items():
        v = torch.cat(parts, 0).to(torch.float64)
        names += _element_names(name, v.shape[1:])
        sites += [name] * (v[0].numel())
        columns.append(v.reshape(v.shape[0], -1))
    return moments_from_draws(torch.cat(columns, 1), lw, names=names, sites=sites)


def moments_from_draws(
    values: torch.Tensor | np.ndarray,
    log_weights: torch.Tensor | np.ndarray,
    *,
    names: Sequence[str] | None = None,
    sites: Sequence[str] | None = None,
) -> GuideMoments:
    """
    The moments report of :func:`guide_moments` from draws already made: ``S`` draws of
    ``D`` elements from the guide and their log importance weights
    :math:`\\log w_s = \\log p(x, z_s) - \\log q(z_s)`. The weights are
    Pareto-smoothed here (:func:`~pyro_elbo_lab.diagnostics.psis.psis_diagnostics`), the
    moments and MCSEs are
    :func:`~pyro_elbo_lab.diagnostics.weighted_moments.self_normalized_moments` (the errors' MCSE
    :func:`~pyro_elbo_lab.diagnostics.weighted_moments.guide_error_mcse`), the errors are reported where
    k̂ ≤ :func:`~pyro_elbo_lab.diagnostics.psis.pareto_k_threshold` of ``S``.

    :param values: shape ``(S, D)``, a tensor or NumPy array (float64 used).
    :param log_weights: shape ``(S,)``, nats, finite (Pareto-smoothed in their own dtype, whose
        rounding error the smoothing allows for; the moments in float64).
    :param list names: ``D`` element names (default ``"z[i]"``).
    :param list sites: the site of each element (default the names).
    :rtype: GuideMoments
    :raises ValueError: if the shapes disagree or a log weight is not finite.

    References

    - *Yes, but Did It Work?: Evaluating Variational Inference*, Y. Yao, A. Vehtari,
      D. Simpson, A. Gelman (2018)
    - *Pareto Smoothed Importance Sampling*, A. Vehtari, D. Simpson, A. Gelman, Y. Yao,
      J. Gabry (2024)
    """
    draws = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    given = torch.as_tensor(log_weights).detach().cpu()
    lw = given.to(torch.float64)
    if draws.dim() != 2 or lw.dim() != 1 or draws.shape[0] != lw.shape[0]:
        raise ValueError(
            f"values must have shape (S, D) and log_weights shape (S,), got {tuple(draws.shape)} and "
            f"{tuple(lw.shape)}; flatten each draw's elements into one row"
        )
    if not bool(torch.isfinite(lw).all()):
        raise ValueError(
            f"log_weights has {int((~torch.isfinite(lw)).sum())} non-finite entries of {lw.shape[0]}; "
            "the guide proposes values where the model's density is zero or undefined"
        )
    num_samples = int(lw.shape[0])
    element_names = [f"z[{i}]" for i in range(draws.shape[1])] if names is None else list(names)
    element_sites = list(element_names) if sites is None else list(sites)
    if len(element_names) != draws.shape[1] or len(element_sites) != draws.shape[1]:
        raise ValueError(
            f"names and sites need one entry per column of values ({draws.shape[1]}), got {len(element_names)} "
            f"and {len(element_sites)}"
        )
    # smoothed in the weights' own dtype: PSIS tells a float32 exact guide's rounding (constant
    # weights) from a tail only knowing the dtype they were computed in
    smoothed, k_hat = psis_diagnostics(given if given.is_floating_point() else lw)
    smoothed = smoothed.to(torch.float64)
    k = float(k_hat)
    errors = guide_error_mcse(draws, smoothed)
    q = {key: val.numpy() for key, val in self_normalized_moments(draws, torch.zeros_like(lw)).items()}
    p = {key: val.numpy() for key, val in self_normalized_moments(draws, smoothed).items()}
    threshold = pareto_k_threshold(num_samples)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_error = (q["mean"] - p["mean"]) / p["sd"]
        sd_ratio = q["sd"] / p["sd"]
    mean_error_mcse, sd_ratio_mcse = errors["mean_error_mcse"].numpy(), errors["sd_ratio_mcse"].numpy()
    reason = ""
    if math.isnan(k):
        reason = "k̂ could not be fitted"
    elif k > threshold:
        reason = f"Pareto k̂ = {k:.3g} > {threshold:.3g}: the PSIS estimates are unreliable"
    if reason:
        mean_error = np.full_like(mean_error, np.nan)
        mean_error_mcse = np.full_like(mean_error, np.nan)
        sd_ratio = np.full_like(mean_error, np.nan)
        sd_ratio_mcse = np.full_like(mean_error, np.nan)
    return GuideMoments(
        names=element_names,
        sites=element_sites,
        guide_mean=q["mean"],
        guide_sd=q["sd"],
        guide_mean_mcse=q["mean_mcse"],
        guide_sd_mcse=q["sd_mcse"],
        psis_mean=p["mean"],
        psis_sd=p["sd"],
        psis_mean_mcse=p["mean_mcse"],
        psis_sd_mcse=p["sd_mcse"],
        mean_error=mean_error,
        mean_error_mcse=mean_error_mcse,
        sd_ratio=sd_ratio,
        sd_ratio_mcse=sd_ratio_mcse,
        pareto_k=k,
        k_threshold=threshold,
        num_samples=num_samples,
        reason=reason,
        log_weights=lw,
    )


def moments_from_inference_data(data: Any) -> list[GuideMoments]:
    """
    :func:`moments_from_draws` of every chain of a converter result
    (:func:`~pyro_elbo_lab.to_inference_data`, :func:`~pyro_elbo_lab.from_svi_result`),
    from its ``posterior`` draws and ``sample_stats.log_importance_weight``: no model pass.
    Elements are named as ArviZ's summary rows (``"theta[Choate]"``, ``"x[0, 1]"``) and
    include ``pyro.deterministic`` sites.

    :param data: an ``InferenceData`` (ArviZ 0.2x) or ``DataTree`` (1.x).
    :returns: one :class:`GuideMoments` per chain (each chain is its own guide).
    :rtype: list[GuideMoments]
    :raises ValueError: if ``data`` lacks the ``posterior`` or ``sample_stats`` group.
    """
    post = arviz_compat.group(data, "posterior")
    names: list[str] = []
    sites: list[str] = []
    for var, array in post.data_vars.items():
        rest = [d for d in array.dims if d not in ("chain", "draw")]
        if not rest:
            names.append(str(var))
        else:
            labels = [
                [str(v) for v in array[d].values] if d in array.coords else [str(i) for i in range(array.sizes[d])]
                for d in rest
            ]
            names += [f"{var}[{', '.join(idx)}]" for idx in _product(labels)]
        sites += [str(var)] * int(np.prod([array.sizes[d] for d in rest], dtype=int))
    reports = []
    for c in range(post.sizes["chain"]):
        chain = post.isel(chain=c)
        columns = [
            np.asarray(a.transpose("draw", ...).values, dtype="float64").reshape(chain.sizes["draw"], -1)
            for a in chain.data_vars.values()
        ]
        reports.append(
            moments_from_draws(np.concatenate(columns, 1), chain_log_weights(data, c), names=names, sites=sites)
        )
    return reports


def _product(labels: list[list[str]]) -> list[tuple[str, ...]]:
    """Every combination of the labels of each dim, last dim fastest (C order)."""
    out: list[tuple[str, ...]] = [()]
    for dim in labels:
        out = [prefix + (label,) for prefix in out for label in dim]
    return out
