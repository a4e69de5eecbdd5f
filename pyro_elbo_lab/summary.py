# SPDX-License-Identifier: Apache-2.0
"""
The post-fit summary of a variational fit, read from the converter's output alone (no
model pass): ArviZ's posterior summary beside PSIS-corrected means; per latent element
the guide's mean and sd against the PSIS-corrected ones with their Monte Carlo standard
errors and the guide's estimated errors; and per chain the final ELBO terms, the
importance-sampled evidence, the KL gap, Pareto k̂, whether the fit converged, and
verdicts that claim only what these numbers show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import arviz_compat
from .checks import check_int
from .diagnostics.moments import moments_from_inference_data
from .diagnostics.psis import (
    PARETO_K_GOOD,
    chain_log_weights,
    importance_diagnostics,
    pareto_k_threshold,
    psis_means,
    verdict,
)
from .inference_data import HISTORY_GROUP

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SVISummary", "summarize"]

_TERMS = ("elbo", "reconstruction", "kl", "entropy")

#: The columns of :attr:`SVISummary.moments` shown by ``str(summary)``.
_SHOWN = (
    "guide_mean",
    "guide_sd",
    "psis_mean",
    "psis_mean_mcse",
    "psis_sd",
    "psis_sd_mcse",
    "mean_error",
    "sd_ratio",
    "status",
)


@dataclass
class SVISummary:
    """
    :ivar pandas.DataFrame posterior: ArviZ's summary of the guide's draws with a
        ``psis_mean`` column (PSIS-corrected posterior mean, averaged over chains) beside
        the raw guide ``mean``.
    :ivar pandas.DataFrame vi: one row per chain: final ELBO terms, ``log_evidence``,
        ``log_evidence_stderr`` and ``stderr_reliable``, ``gap``, ``pareto_k``,
        ``k_threshold``, ``verdict`` (importance sampling: ``"IS reliable"``,
        ``"IS usable"``, ``"IS unreliable"``, ``"IS unchecked"``), ``moments`` (the
        guide's moments: ``"accurate"``, ``"inaccurate"``, ``"uncertain"``,
        ``"unknown"``), ``converged`` (True / False, None when the data do not say),
        ``ess``, ``r_hat``.
    :ivar pandas.DataFrame moments: one row per chain and posterior element (index
        ``(chain, name)``): the guide's and the PSIS-corrected mean and sd with MCSEs,
        ``mean_error`` (posterior sds), ``sd_ratio`` and their MCSEs (NaN where k̂ is above
        the threshold), ``status``, ``pareto_k``.
    :ivar list guide_moments: one :class:`~pyro_elbo_lab.GuideMoments` per chain.
    :ivar list convergence_reasons: per chain, the history's words on convergence (or "").
    """

    posterior: Any
    vi: Any
    moments: Any = None
    guide_moments: list = field(default_factory=list, repr=False)
    convergence_reasons: list = field(default_factory=list, repr=False)

    def verdicts(self) -> list[str]:
        """
        Per chain, in words: whether the fit converged, what k̂ says about importance
        sampling and the evidence's standard error, and whether the guide's moments are
        accurate and which estimates to use (:meth:`~pyro_elbo_lab.GuideMoments.verdict`).
        A chain whose ``vi["converged"]`` is None, NaN or ``pd.NA`` reads "Convergence not
        recorded"; one that is false (``False``, ``numpy.False_``, 0.0) reads "NOT CONVERGED".

        :rtype: list
        """
        import pandas as pd

        out = []
        for chain, row in self.vi.iterrows():
            parts = []
            # None, NaN or pd.NA (pandas fills a chain's missing entry with NaN): not recorded
            converged = row.get("converged")
            if pd.isna(converged):
                parts.append("Convergence not recorded (no SVIRunner convergence evidence in the data).")
            elif not bool(converged):
                why = self.convergence_reasons[chain] if chain < len(self.convergence_reasons) else ""
                parts.append(
                    f"NOT CONVERGED{f' ({why})' if why else ''}: these numbers describe an unfinished fit, not "
                    "the limit of the guide family."
                )
            if not row["stderr_reliable"]:
                k = row["pareto_k"]
                se = f"log_evidence ± {row['log_evidence_stderr']:.2g}: the standard error is unreliable"
                if not math.isnan(k) and k <= row["k_threshold"]:
                    parts.append(
                        f"{se} (Pareto k̂ = {k:.3g} ≥ {PARETO_K_GOOD}: the weights have infinite variance); "
                        "log_evidence is usable but its error can be several standard errors."
                    )
                else:
                    why = "Pareto k̂ not fitted" if math.isnan(k) else f"Pareto k̂ = {k:.3g} > {row['k_threshold']:.3g}"
                    parts.append(f"{se} ({why}); treat log_evidence as a lower bound.")
            if chain < len(self.guide_moments):
                parts.append(self.guide_moments[chain].verdict())
            else:
                parts.append(f"{row['verdict']} (Pareto k̂ = {row['pareto_k']:.3g}).")
            out.append(f"chain {chain}: " + " ".join(parts))
        return out

    def __str__(self) -> str:
        import pandas as pd

        with pd.option_context("display.width", 120, "display.max_columns", None):
            blocks = [f"Variational inference\n{self.vi}", "Verdicts\n" + "\n".join(self.verdicts())]
            if self.moments is not None:
                shown = self.moments[[c for c in _SHOWN if c in self.moments.columns]]
                if shown.index.get_level_values("chain").nunique() == 1:
                    shown = shown.droplevel("chain")
                blocks.append(
                    "Guide moments against PSIS-corrected moments (mean_error in posterior sds; NaN where k̂ is "
                    f"above the threshold)\n{shown}"
                )
            blocks.append(f"Posterior (guide draws)\n{self.posterior}")
            return "\n\n".join(blocks)

    def _repr_html_(self) -> str:
        html = "<h4>Variational inference</h4>" + self.vi.to_html()
        html += "<h4>Verdicts</h4><ul>" + "".join(f"<li>{v}</li>" for v in self.verdicts()) + "</ul>"
        if self.moments is not None:
            html += "<h4>Guide moments against PSIS-corrected moments</h4>" + self.moments.to_html()
        return html + "<h4>Posterior (guide draws)</h4>" + self.posterior.to_html()


def summarize(idata: Any, *, last: int = 50) -> SVISummary:
    """
    A report of a variational fit from the output of
    :func:`~pyro_elbo_lab.to_inference_data` or :func:`~pyro_elbo_lab.from_svi_result`,
    computed from its draws and log importance weights (no model pass).

    ``posterior``: ArviZ's summary of the guide's draws (with :math:`\\hat R` and ESS
    when there are several chains) with a ``psis_mean`` column
    (:func:`~pyro_elbo_lab.diagnostics.psis.psis_means`) beside the raw ``mean``.
    ``moments``: per chain and element,
    :func:`~pyro_elbo_lab.diagnostics.moments.moments_from_inference_data`: the guide's
    mean and sd, the PSIS-corrected mean and sd with MCSE, and where k̂ ≤
    :func:`~pyro_elbo_lab.diagnostics.psis.pareto_k_threshold` the guide's estimated
    standardised mean error and sd ratio. ``vi``: one row per chain with the
    ``optimization_history``'s ``elbo``, ``reconstruction``, ``kl``, ``entropy`` (or
    ``loss``) averaged over its last ``last`` recorded steps (left out without that
    group), the :func:`~pyro_elbo_lab.diagnostics.psis.importance_diagnostics` of the
    chain's log weights (``log_evidence``, its standard error and ``ess`` PSIS-smoothed,
    as the runner's ``eval_*`` columns; ``gap``; ``pareto_k``), ``stderr_reliable``
    (k̂ < 0.5: the delta-method standard error needs weights of finite variance, which a
    Pareto tail of shape :math:`k` has only for :math:`k < 1/2` [1]), the importance-sampling ``verdict``
    (:func:`~pyro_elbo_lab.diagnostics.psis.verdict`, never a word about the guide's
    accuracy), the guide's ``moments`` word
    (:meth:`~pyro_elbo_lab.GuideMoments.accuracy`), ``converged`` (from the history group's
    ``converged``, written by :func:`~pyro_elbo_lab.from_svi_result` from the runner's
    convergence evidence; None without it) and the largest posterior :math:`\\hat R`
    (NaN for one chain). Values in nats.

    :param idata: an ``InferenceData`` (ArviZ 0.2x) or ``DataTree`` (1.x) from the
        converter.
    :param int last: steps averaged for the ELBO terms.
    :rtype: SVISummary
    :raises ValueError: if ``last`` is not a positive integer, ``idata`` is not an
        ``InferenceData`` or ``DataTree``, or it lacks the ``posterior`` or ``sample_stats``
        group.

    References

    [1] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew
        Gelman, Yuling Yao, Jonah Gabry (2024)

    [2] `Yes, but Did It Work?: Evaluating Variational Inference`, Yuling Yao, Aki
        Vehtari, Daniel Simpson, Andrew Gelman (2018)

    [3] `Rank-normalization, folding, and localization: An improved R-hat for assessing convergence of MCMC`,
        Aki Vehtari, Andrew Gelman, Daniel Simpson, Bob Carpenter,
        Paul-Christian Bürkner (2021)
    """
    check_int("last", last, 1, hint="last is a positive integer number of steps")
    _check_idata(idata)
    import pandas as pd

    post = arviz_compat.group(idata, "posterior")
    num_chains, num_draws = post.sizes["chain"], post.sizes["draw"]
    posterior = arviz_compat.summary(idata, diagnostics=num_chains > 1)
    corrected = arviz_compat.label_values(psis_means(idata))
    posterior.insert(
        posterior.columns.get_loc("mean") + 1, "psis_mean", [corrected.get(i, np.nan) for i in posterior.index]
    )
    r_hat = float(posterior["r_hat"].max()) if "r_hat" in posterior.columns else math.nan

    reports = moments_from_inference_data(idata) if post.data_vars else []
    moments = None
    if reports:
        moments = pd.concat(
            [r.to_dataframe().assign(status=r.element_status()) for r in reports],
            keys=range(len(reports)),
            names=["chain", "name"],
        )

    history = arviz_compat.group(idata, HISTORY_GROUP) if HISTORY_GROUP in arviz_compat.groups(idata) else None
    threshold = pareto_k_threshold(num_draws)
    rows, reasons = [], []
    for c in range(num_chains):
        row: dict[str, Any] = {"chain": c}
        converged, reason = None, ""
        if history is not None and c < history.sizes.get("chain", 0):
            chain_history = history.isel(chain=c)
            row.update(_final_terms(chain_history, last))
            if "converged" in chain_history.data_vars and np.isfinite(float(chain_history["converged"])):
                converged = bool(float(chain_history["converged"]) > 0.5)
                if "convergence_reason" in chain_history.data_vars:
                    reason = str(chain_history["convergence_reason"].values)
        diag = importance_diagnostics(chain_log_weights(idata, c))
        row.update({k: diag[k] for k in ("log_evidence", "log_evidence_stderr")})
        row["stderr_reliable"] = bool(diag["pareto_k"] < PARETO_K_GOOD)
        row.update(gap=diag["gap"], pareto_k=diag["pareto_k"], k_threshold=threshold)
        row["verdict"] = verdict(diag["pareto_k"], num_draws)
        row["moments"] = reports[c].accuracy() if reports else "unknown"
        row["converged"] = converged
        row["ess"] = diag["ess"]
        row["r_hat"] = r_hat
        rows.append(row)
        reasons.append(reason)
    return SVISummary(
        posterior=posterior,
        vi=pd.DataFrame(rows).set_index("chain"),
        moments=moments,
        guide_moments=reports,
        convergence_reasons=reasons,
    )


def _check_idata(idata: Any) -> None:
    """A ValueError naming ``idata`` unless it is an ``InferenceData`` or a ``DataTree``."""
    if arviz_compat.is_inference_data(idata):
        return
    shown = repr(idata)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ValueError(
        f"idata must be an ArviZ InferenceData (0.2x) or an xarray DataTree (1.x), got idata={shown} of type "
        f"{type(idata).__name__}; build it with pyro_elbo_lab.to_inference_data(model, guide, *args) or "
        "pyro_elbo_lab.from_svi_result(result)"
    )


def _final_terms(chain_history: pd.DataFrame, last: int) -> dict[str, float]:
    """The ELBO terms (or the loss) averaged over the last ``last`` recorded steps of one chain."""
    out = {}
    for column in _TERMS:
        if column in chain_history.data_vars:
            values = chain_history[column].values
            values = values[~np.isnan(values)]
            if len(values):
                out[column] = float(values[-last:].mean())
    if "elbo" not in out and "loss" in chain_history.data_vars:
        values = chain_history["loss"].values
        values = values[~np.isnan(values)]
        if len(values):
            out["loss"] = float(values[-last:].mean())
    return out
