# SPDX-License-Identifier: Apache-2.0
"""
The post-fit summary of a variational fit, read from the converter's output alone:
ArviZ's posterior summary beside PSIS-corrected means, and per chain the final ELBO
terms, the importance-sampled evidence, the KL gap, Pareto k̂ with its verdict, ESS and
:math:`\\hat R`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import arviz_compat
from .checks import check_int
from .diagnostics.psis import chain_log_weights, importance_diagnostics, psis_means, verdict
from .inference_data import HISTORY_GROUP

__all__ = ["SVISummary", "summarize"]

_TERMS = ("elbo", "reconstruction", "kl", "entropy")


@dataclass
class SVISummary:
    """
    :ivar pandas.DataFrame posterior: ArviZ's summary of the guide's draws with a
        ``psis_mean`` column (PSIS-corrected posterior mean, averaged over chains) beside
        the raw guide ``mean``.
    :ivar pandas.DataFrame vi: one row per chain: final ELBO terms, ``log_evidence``,
        ``log_evidence_stderr``, ``gap``, ``pareto_k``, ``verdict``, ``ess``, ``r_hat``.
    """

    posterior: Any
    vi: Any

    def __str__(self) -> str:
        import pandas as pd

        with pd.option_context("display.width", 120, "display.max_columns", 20):
            return f"Variational inference\n{self.vi}\n\nPosterior (guide draws)\n{self.posterior}"

    def _repr_html_(self) -> str:
        return (
            "<h4>Variational inference</h4>" + self.vi.to_html() + "<h4>Posterior (guide draws)</h4>"
            + self.posterior.to_html()
        )


def summarize(idata, *, last: int = 50) -> SVISummary:
    """
    A report of a variational fit from the output of
    :func:`~pyro_elbo_lab.to_inference_data` or :func:`~pyro_elbo_lab.from_svi_result`.

    ``posterior``: ArviZ's summary of the guide's draws (with :math:`\\hat R` and ESS
    when there are several chains) with a ``psis_mean`` column
    (:func:`~pyro_elbo_lab.diagnostics.psis.psis_means`) beside the raw ``mean``. ``vi``:
    one row per chain with the ``optimization_history``'s ``elbo``, ``reconstruction``,
    ``kl``, ``entropy`` (or ``loss``) averaged over its last ``last`` recorded steps
    (left out without that group), the
    :func:`~pyro_elbo_lab.diagnostics.psis.importance_diagnostics` of the chain's log
    weights (``log_evidence``, its standard error and ``ess`` PSIS-smoothed, as the
    runner's ``eval_*`` columns; ``gap``; ``pareto_k``), the ``verdict`` of k̂
    (``"good"``, ``"ok"``, ``"bad"``, ``"unknown"``) and the largest posterior
    :math:`\\hat R` (NaN for one chain). Values in nats.

    :param idata: an ``InferenceData`` (ArviZ 0.2x) or ``DataTree`` (1.x) from the
        converter.
    :param int last: steps averaged for the ELBO terms.
    :rtype: SVISummary
    :raises ValueError: if ``last`` is not a positive integer, or ``idata`` lacks the
        ``posterior`` or ``sample_stats`` group.

    References

    [1] `Pareto Smoothed Importance Sampling`, Aki Vehtari, Daniel Simpson, Andrew
        Gelman, Yuling Yao, Jonah Gabry (2024)

    [2] `Rank-normalization, folding, and localization: An improved R-hat for assessing
        convergence of MCMC`, Aki Vehtari, Andrew Gelman, Daniel Simpson, Bob Carpenter,
        Paul-Christian Bürkner (2021)
    """
    check_int("last", last, 1, hint="last is a positive integer number of steps")
    import pandas as pd

    num_chains = arviz_compat.group(idata, "posterior").sizes["chain"]
    posterior = arviz_compat.summary(idata, diagnostics=num_chains > 1)
    corrected = arviz_compat.label_values(psis_means(idata))
    posterior.insert(posterior.columns.get_loc("mean") + 1, "psis_mean", [corrected.get(i, np.nan) for i in posterior.index])
    r_hat = float(posterior["r_hat"].max()) if "r_hat" in posterior.columns else math.nan

    history = arviz_compat.group(idata, HISTORY_GROUP) if HISTORY_GROUP in arviz_compat.groups(idata) else None
    rows = []
    for c in range(num_chains):
        row: dict[str, Any] = {"chain": c}
        if history is not None and c < history.sizes.get("chain", 0):
            row.update(_final_terms(history.isel(chain=c), last))
        diag = importance_diagnostics(chain_log_weights(idata, c))
        row.update({k: diag[k] for k in ("log_evidence", "log_evidence_stderr", "gap", "pareto_k")})
        row["verdict"] = verdict(diag["pareto_k"])
        row["ess"] = diag["ess"]
        row["r_hat"] = r_hat
        rows.append(row)
    return SVISummary(posterior=posterior, vi=pd.DataFrame(rows).set_index("chain"))


def _final_terms(chain_history, last: int) -> dict[str, float]:
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
