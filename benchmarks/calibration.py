#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""
Calibration benchmark: do the guide's estimated errors (:func:`guide_moments`) tell the truth
on real posteriors?

For each posteriordb posterior in ``../shared/posteriordb`` (translated in
``benchmarks/posteriors.py``) and each guide (``AutoNormal``, ``AutoMultivariateNormal``,
``AutoLowRankMultivariateNormal``), fit with plain ``pyro.infer.SVI`` and
``pyro_elbo_lab.BetaELBO()`` (β = 1), then compare what ``guide_moments`` estimates from
importance sampling with what the reference NUTS draws say:

- k̂ and the verdict (``accurate``: every element's estimated |mean error| ≤ 0.1 posterior sd
  and sd ratio within [0.9, 1.1], within 2 MCSE; ``inaccurate``; ``uncertain``;
  ``IS unreliable``: k̂ above the threshold, no claim);
- the estimated and the actual standardised mean error ``(guide mean - posterior mean) /
  posterior sd`` and sd ratio ``guide sd / posterior sd`` (worst element of each), the largest
  gap between estimate and truth, and the PSIS-corrected mean's actual error;
- the outcome: ``FALSE REASSURANCE`` (verdict accurate, the guide's moments actually outside
  the tolerances), ``false alarm`` (verdict inaccurate, actually within them), ``ok``, or
  ``no claim``.

Fitting (documented, ours): Adam from lr 0.05, ``num_particles=4``; every 250 steps the last
250 steps are compared with the 250 before: the mean loss must differ by less than 2 standard
errors (from batch means, 10 batches of 25 steps, to allow for autocorrelation). At such a
stationary point the learning rate is multiplied by 0.3 and judged afresh on two new
windows; the third stationary point ends the fit ("stationary"); otherwise the fit stops at
``--max-steps`` ("max steps"). The guide's parameters are then set to their mean over the
last 250 steps (iterate averaging, Dhaka et al. 2020). A loss still falling or rising is not
stationary; but a loss flat within its noise while the parameters still drift along a ridge
(kidiq's uncentred regression) passes this test: "stationary" is not "at the optimum". A
test on the parameters' drift (batch-means standard errors of the iterates) never passed on
eight schools in 3000 steps: the iterates' autocorrelation outlasts 25-step batches.

    python benchmarks/calibration.py            # full: 5 posteriors x 3 guides (many minutes)
    python benchmarks/calibration.py --quick    # smoke run (CI): one posterior, one guide

Writes ``calibration.md`` and ``calibration.json`` to ``--output`` (default
``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import posteriors  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.distributions.transforms import transform_to  # noqa: E402
from pyro.infer import SVI  # noqa: E402
from pyro.infer.autoguide import (  # noqa: E402
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
    init_to_median,
)

from pyro_elbo_lab import BetaELBO  # noqa: E402
from pyro_elbo_lab.diagnostics.moments import MEAN_ERROR_TOL, SD_RATIO_TOL, guide_moments  # noqa: E402

GUIDES = {
    "AutoNormal": AutoNormal,
    "AutoMultivariateNormal": AutoMultivariateNormal,
    "AutoLowRankMultivariateNormal": AutoLowRankMultivariateNormal,
}
WINDOW = 250
LR = 0.05
LR_FACTOR = 0.3
STATIONARY_TIMES = 3


def init_loc(site):
    """Prior median where the prior can be sampled; the support's feasible point otherwise."""
    fn = site["fn"]
    if isinstance(fn, pyro.distributions.ImproperUniform):  # cannot be sampled: Pyro's init_to_feasible fails
        value = transform_to(fn.support)(torch.zeros(fn.shape()))
        value._pyro_custom_init = False
        return value
    return init_to_median(site)


def _window_z(x: np.ndarray) -> np.ndarray:
    """
    |change of the mean| between the last two windows of ``x`` (shape ``(steps, ...)``) in
    standard errors, the standard errors from batch means (10 batches per window, so that the
    autocorrelation of optimiser iterates does not shrink them).
    """
    prev, last = x[-2 * WINDOW : -WINDOW], x[-WINDOW:]
    nb = 10
    se2 = sum(w.reshape((nb, -1) + w.shape[1:]).mean(1).var(0, ddof=1) / nb for w in (prev, last))
    return np.abs(last.mean(0) - prev.mean(0)) / np.sqrt(np.maximum(se2, 1e-300))


def stationary(losses: list) -> bool:
    """No detectable change of the mean loss between the last two windows (< 2 se)."""
    return bool(_window_z(np.asarray(losses)) < 2)


def fit(post, guide_cls, max_steps: int, seed: int):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    kwargs = {"init_loc_fn": init_loc}
    if guide_cls is AutoLowRankMultivariateNormal:
        kwargs["rank"] = 2
    guide = guide_cls(post.model, **kwargs)
    state = {"lr": LR}
    optim = pyro.optim.Adam(lambda name: {"lr": state["lr"]})
    svi = SVI(post.model, guide, optim, loss=BetaELBO(num_particles=4, vectorize_particles=True))
    store = pyro.get_param_store()
    losses, params, times = [], [], 0
    step = since = 0
    ended_stationary = False
    while step < max_steps:
        losses.append(svi.step(*post.args))
        params.append(torch.cat([v.detach().reshape(-1) for v in store.values()]).numpy().copy())
        step += 1
        if step % WINDOW == 0 and step - since >= 2 * WINDOW and stationary(losses):
            times += 1
            if times == STATIONARY_TIMES:
                ended_stationary = True
                break
            state["lr"] *= LR_FACTOR
            for opt in optim.optim_objs.values():
                for group in opt.param_groups:
                    group["lr"] = state["lr"]
            since = step  # judge the new learning rate on its own windows
    # iterate averaging over the last window (Dhaka et al. 2020): the parameters' mean, not the last jitter
    with torch.no_grad():
        offset = 0
        mean = np.mean(params[-WINDOW:], 0)
        for name in list(store.keys()):
            shape = store[name].shape
            n = shape.numel()
            store[name] = torch.as_tensor(mean[offset : offset + n]).reshape(shape)  # constrained value
            offset += n
    return guide, step, ended_stationary, float(np.mean(losses[-min(len(losses), WINDOW) :]))


def status_word(report) -> str:
    if not report.reliable:
        return "IS unreliable"
    status = report.element_status()
    if "inaccurate" in status:
        return "inaccurate"
    if "uncertain" in status:
        return "uncertain"
    return "accurate"


def evaluate(post, guide_name: str, max_steps: int, num_samples: int, seed: int) -> dict:
    t0 = time.perf_counter()
    guide, steps, ended_stationary, final_loss = fit(post, GUIDES[guide_name], max_steps, seed)
    report = guide_moments(post.model, guide, *post.args, num_samples=num_samples)
    ref = post.reference_moments()
    ref_mean = np.array([ref[n][0] for n in report.names])
    ref_sd = np.array([ref[n][1] for n in report.names])
    actual_err = (report.guide_mean - ref_mean) / ref_sd
    actual_ratio = report.guide_sd / ref_sd
    psis_err = (report.psis_mean - ref_mean) / ref_sd
    psis_ratio = report.psis_sd / ref_sd
    verdict = status_word(report)
    actually_ok = bool(
        np.all(np.abs(actual_err) <= MEAN_ERROR_TOL) and np.all(np.abs(actual_ratio - 1) <= SD_RATIO_TOL)
    )
    if verdict == "accurate":
        outcome = "ok" if actually_ok else "FALSE REASSURANCE"
    elif verdict == "inaccurate":
        outcome = "false alarm" if actually_ok else "ok"
    else:
        outcome = "no claim"
    element_status = report.element_status()
    false_elements = [
        n
        for n, s, e, r in zip(report.names, element_status, actual_err, actual_ratio)
        if s == "accurate" and (abs(e) > MEAN_ERROR_TOL or abs(r - 1) > SD_RATIO_TOL)
    ]

    def worst_ratio(r):
        return float(r[np.nanargmax(np.abs(np.log(r)))]) if np.all(np.isfinite(r)) else float("nan")

    def maxabs(x):
        return float(np.max(np.abs(x))) if np.all(np.isfinite(x)) else float("nan")

    return {
        "posterior": post.name,
        "guide": guide_name,
        "steps": steps,
        "stationary": ended_stationary,
        "final_loss": final_loss,
        "pareto_k": report.pareto_k,
        "k_threshold": report.k_threshold,
        "verdict": verdict,
        "est_mean_error": maxabs(report.mean_error),
        "actual_mean_error": maxabs(actual_err),
        "est_sd_ratio": worst_ratio(report.sd_ratio),
        "actual_sd_ratio": worst_ratio(actual_ratio),
        "mean_error_gap": maxabs(report.mean_error - actual_err),
        "sd_ratio_gap": maxabs(report.sd_ratio - actual_ratio),
        "psis_mean_error": maxabs(psis_err),
        "psis_sd_ratio": worst_ratio(psis_ratio),
        "outcome": outcome,
        "false_reassurance_elements": false_elements,
        "elements": {
            n: {
                "status": s,
                "est_mean_error": float(report.mean_error[i]),
                "actual_mean_error": float(actual_err[i]),
                "est_sd_ratio": float(report.sd_ratio[i]),
                "actual_sd_ratio": float(actual_ratio[i]),
                "psis_mean_error": float(psis_err[i]),
            }
            for i, (n, s) in enumerate(zip(report.names, element_status))
        },
        "seconds": time.perf_counter() - t0,
    }


def fmt(x, spec=".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _worst(elements: dict, actual: str, estimate: str, ratio: bool):
    """(estimate, actual) at the element whose actual error is the largest."""

    def size(e):
        return abs(math.log(e[actual])) if ratio else abs(e[actual])

    worst = max(elements.values(), key=size)
    return worst[estimate], worst[actual]


def markdown(rows: list, quick: bool) -> str:
    head = (
        "| posterior | guide | steps | stopped | k̂ | verdict | mean err: est. | actual "
        "| sd ratio: est. | actual | max\\|est−actual\\| mean err | max\\|est−actual\\| sd ratio "
        "| PSIS max\\|mean err\\| | outcome |\n|" + "---|" * 14
    )
    lines = [head]
    for r in rows:
        est_m, act_m = _worst(r["elements"], "actual_mean_error", "est_mean_error", False)
        est_r, act_r = _worst(r["elements"], "actual_sd_ratio", "est_sd_ratio", True)
        psis = fmt(r["psis_mean_error"])
        if r["verdict"] == "IS unreliable":
            psis = f"({psis})"
        lines.append(
            f"| {r['posterior'].split('-')[0]} | {r['guide']} | {r['steps']} | "
            f"{'stationary' if r['stationary'] else 'max steps'} "
            f"| {fmt(r['pareto_k'])} | {r['verdict']} | {fmt(est_m, '+.2f')} | {fmt(act_m, '+.2f')} "
            f"| {fmt(est_r)} | {fmt(act_r)} | {fmt(r['mean_error_gap'])} "
            f"| {fmt(r['sd_ratio_gap'])} | {psis} | {r['outcome']} |"
        )
    n_false = sum(r["outcome"] == "FALSE REASSURANCE" for r in rows)
    n_alarm = sum(r["outcome"] == "false alarm" for r in rows)
    reliable = [r for r in rows if r["verdict"] != "IS unreliable"]
    within = sum(r["mean_error_gap"] <= 0.1 for r in reliable)
    note = (
        f"\n\n{len(rows)} fits: {n_false} false reassurance, {n_alarm} false alarm; where k̂ ≤ threshold "
        f"({len(reliable)} fits) the estimated mean error was within 0.1 sd of the actual in {within}. "
        f"Tolerances: |mean error| ≤ {MEAN_ERROR_TOL} sd, sd ratio within [{1 - SD_RATIO_TOL}, {1 + SD_RATIO_TOL}]. "
        "Mean error and sd ratio: estimated (guide_moments) and actual (reference draws) at the element "
        "whose actual error is the largest; PSIS column in parentheses where k̂ is above the threshold."
    )
    if quick:
        note += " QUICK RUN (smoke test): few steps, not converged; these numbers say nothing about calibration."
    return "\n".join(lines) + note + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one posterior, one guide, few steps (CI)")
    parser.add_argument("--output", type=Path, default=HERE / "results", help="folder for calibration.md/.json")
    parser.add_argument("--posteriors", nargs="*", default=None, help="posteriordb names (default: all five)")
    parser.add_argument("--guides", nargs="*", default=None, choices=sorted(GUIDES))
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=None, help="importance samples (default 4000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--render", type=Path, default=None, help="re-render the table of a saved calibration.json")
    args = parser.parse_args(argv)
    if args.render is not None:
        print(markdown(json.loads(args.render.read_text()), quick=False))
        return 0
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    names = args.posteriors or (["kidiq-kidscore_momiq"] if args.quick else list(posteriors.POSTERIORS))
    guides = args.guides or (["AutoNormal"] if args.quick else list(GUIDES))
    max_steps = args.max_steps or (600 if args.quick else 20000)
    num_samples = args.num_samples or (1000 if args.quick else 4000)
    rows = []
    for name in names:
        post = posteriors.load_posterior(name)
        for guide_name in guides:
            row = evaluate(post, guide_name, max_steps, num_samples, args.seed)
            rows.append(row)
            print(
                f"{name} {guide_name}: {row['steps']} steps ({'stationary' if row['stationary'] else 'max steps'}), "
                f"k̂ {row['pareto_k']:.2f}, {row['verdict']}, {row['outcome']} [{row['seconds']:.0f} s]",
                flush=True,
            )
    table = markdown(rows, args.quick)
    print(table)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "calibration.md").write_text(table)
    (args.output / "calibration.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
