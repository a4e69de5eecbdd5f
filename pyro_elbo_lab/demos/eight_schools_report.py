# SPDX-License-Identifier: Apache-2.0
"""
The eight-schools demo's report and files: tables, conclusions computed from the numbers
(:mod:`~pyro_elbo_lab.demos.wording`), plots (:mod:`~pyro_elbo_lab.demos.figures`) and
netCDF, from an :class:`~pyro_elbo_lab.demos.eight_schools.EightSchools` study.
"""

from __future__ import annotations

import os

import pandas as pd

from .common import Report, output_file, pyplot
from .eight_schools import CONVERGENCE, EightSchools
from .wording import SMOKE_RUN_NOTE, fit_conclusion

__all__ = ["report_fits", "write_outputs"]


def write_outputs(study: EightSchools, output: str, report: Report) -> list[str]:
    """Plots (decomposition over training, posterior against NUTS and exact) and netCDF files."""
    from .figures import eight_schools_decomposition, eight_schools_posterior

    plt = pyplot()
    os.makedirs(output, exist_ok=True)
    paths = []
    path = os.path.join(output, "eight_schools_decomposition.png")
    with output_file(path) as tmp:
        eight_schools_decomposition(plt, study, tmp)
    paths.append(path)
    report.image(path, "ELBO decomposition over training (nats), the exact log-evidence, and where each fit stopped")
    path = os.path.join(output, "eight_schools_posterior.png")
    with output_file(path) as tmp:
        eight_schools_posterior(plt, study, tmp)
    paths.append(path)
    report.image(path, "Posterior means and 90% intervals of each guide against NUTS and the exact values")
    for f in study.fits:
        path = os.path.join(output, f"eight_schools_{f.model_name}_{f.guide_name}.nc")
        with output_file(path) as tmp:
            f.idata.to_netcdf(tmp)
        paths.append(path)
    return paths


def report_fits(study: EightSchools, report: Report) -> None:
    exact = study.exact
    report.heading("How each fit stopped")
    report.table(study.status_table(), "{:.0f}")
    report.text(
        f"Each fit runs until the runner's convergence rule ({CONVERGENCE}) stops it, with a cap of "
        f"{study.num_steps} steps. A fit counts as converged when the rule finds its objective stationary: R-hat "
        "of the objective's trace below the threshold and no significant rise or fall (a two-sided slope test "
        "on the half-chain means). A fit that is not converged is labelled NOT CONVERGED and no conclusion "
        "about its guide is drawn from it."
    )
    report.heading("The ELBO's decomposition at the fitted guides (nats, 1000 particles)")
    report.table(study.decomposition_table(), "{:.3f}")
    report.text(
        "ELBO = reconstruction - KL(q || prior) = E_q log p(y, z) + entropy. Both forms define the same p(y), "
        "so a higher ELBO is a smaller KL(q || posterior)."
    )
    report.heading("Evidence, gap and Pareto k̂ (estimate_evidence, PSIS)")
    report.table(study.diagnostics_table(), "{:.3f}")
    report.text(
        f"Exact log p(y) = {exact.log_evidence:.4f} nats (mu and theta integrated in closed form, tau by "
        "Gauss-Legendre quadrature). gap = log p(y) - ELBO = KL(q || p(z|y)). Importance sampling is reliable for "
        "k̂ <= 0.7 (Vehtari et al. 2024); above it the weights have infinite variance, so the '± se' of the "
        "estimate measures nothing and is marked unreliable."
    )
    report.heading("The guide's own error: estimated (PSIS) and against the references")
    report.table(study.error_table(), "{:.2f}")
    report.text(
        "mean err. = (guide mean - posterior mean) / posterior sd; sd ratio = guide sd / posterior sd. 'est.' is "
        "guide_moments' estimate from the guide's own draws reweighted by PSIS (only where k̂ is at most "
        f"{study.fits[0].moments.k_threshold:.2f}); 'exact' uses the quadrature posterior of mu and tau; theta "
        "against NUTS (the school with the largest error). The guide is called accurate within 0.1 sd and a "
        "sd ratio within 0.9-1.1."
    )
    report.heading("Conclusions, from the numbers above")
    if study.quick:
        report.text(SMOKE_RUN_NOTE)
    else:
        for f in study.fits:
            report.text("- " + fit_conclusion(study.facts(f)))
    report.heading("Posterior mean ± sd: each guide against NUTS")
    table = study.posterior_table()
    compact = pd.DataFrame(index=table.index)
    compact["NUTS"] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(table["NUTS mean"], table["NUTS sd"])]
    for f in study.fits:
        label = f.name + ("" if f.converged else " (NOT CONVERGED)")
        compact[label] = [f"{m:.2f} ± {s:.2f}" for m, s in zip(table[f"{f.name} mean"], table[f"{f.name} sd"])]
    report.table(compact)
    report.text(
        f"Exact (quadrature): mu {exact.mu_mean:.2f} ± {exact.mu_sd:.2f}, tau {exact.tau_mean:.2f} ± "
        f"{exact.tau_sd:.2f} (SAT-V points). NUTS: ArviZ's bundled non_centered_eight draws (2000)."
    )
