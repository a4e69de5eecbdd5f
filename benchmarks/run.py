#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""
Benchmark suite: ms per SVI step of our losses against Pyro's, side by side in one process.

Methodology (see benchmarks/README.md): every method of a case is built from the same seed
in its own parameter-store scope and warmed up (compiled losses compile here); then, for
each round, every method runs one block of steps, in an order rotated by one each round,
so slow drifts of a shared machine hit all methods alike. We report, per method, the
median over rounds of the ms/step of a block, its inter-quartile range, and the median
(and IQR) of the per-round ratio to the case's reference method. Every Pyro method runs
through ``pyro.infer.SVI`` with ``pyro.optim.Adam`` under the same validation setting.

    python benchmarks/run.py            # full run (about 40 min on 2 shared cores)
    python benchmarks/run.py --quick    # smoke run, about 90 s (what CI runs)
    python benchmarks/run.py --numpyro-python /path/to/venv/bin/python   # with the NumPyro rows

Writes ``results.json`` and ``results.md`` to ``--output`` (default benchmarks/results/).

The pieces: ``timing`` (``Method``, ``measure``), ``methods`` (the method factories),
``numpyro_worker`` (NumPyro in another interpreter), ``cases``, ``probes`` (compile times and
cold starts, in fresh processes running this script) and ``report`` (``results.md``, targets).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import pyro  # noqa: E402
import torch  # noqa: E402
from cases import evidence_case, new_losses_case, schools_case, vae_case  # noqa: E402
from methods import FUSED, LR, NUMPYRO  # noqa: E402
from models import digits_data, synthetic_data  # noqa: E402
from numpyro_worker import NumPyro  # noqa: E402
from probes import cold_starts, compile_probe, compile_times, steps_probe  # noqa: E402
from report import format_measured, machine, markdown, targets  # noqa: E402
from timing import Method, measure  # noqa: E402

# what tests/test_benchmarks.py and other scripts read from ``run``
__all__ = ["FUSED", "LR", "NUMPYRO", "Method", "NumPyro", "machine", "main", "markdown", "measure", "targets"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few rounds, small blocks (about 90 s)")
    parser.add_argument("--output", default=str(HERE / "results"), help="folder for results.json and results.md")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    parser.add_argument(
        "--validation", choices=["on", "off"], default="off", help="pyro.enable_validation for every method"
    )
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--compile-probe", choices=["schools", "digits"], help=argparse.SUPPRESS)
    parser.add_argument("--steps-probe", help=argparse.SUPPRESS)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated case prefixes to run (digits,synthetic,schools,evidence,new,compile,steps)",
    )
    parser.add_argument(
        "--numpyro-python",
        default=os.environ.get("NUMPYRO_PYTHON"),
        metavar="PATH",
        help="a Python with jax and numpyro, for the NumPyro rows (default: $NUMPYRO_PYTHON; else they are skipped)",
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    pyro.enable_validation(args.validation == "on")
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    # the AutoNormal fit of eight schools has heavy-tailed importance weights (k̂ > 0.7):
    # expected, and beside the point of a timing run
    warnings.filterwarnings("ignore", message=r"Pareto k̂")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.trace.* is deprecated", category=DeprecationWarning)
    if args.compile_probe:
        print(json.dumps(compile_probe(args.compile_probe)))
        return 0
    if args.steps_probe:
        print(json.dumps(steps_probe(json.loads(args.steps_probe))))
        return 0

    # (rounds, block, warmup) per case
    if args.quick:
        cfg = {
            "vae": (2, 2, 2),
            "vae_particles": (2, 1, 1),
            "vae784": (2, 1, 1),
            "vae784_particles": None,
            "schools": (2, 5, 3),
            "schools_particles": (2, 2, 2),
            "evidence": (2, 1, 1),
            "evidence_fit_steps": 50,
            "jit_pyro": True,
            "history": True,
            "new_losses": (2, 2, 1),
            "fused": False,
            "compile_cases": [],
            # N steps from a cold start: scaled down, eight schools only, no fused step (its
            # cold compile alone would take most of the quick run's budget)
            "cold_steps": 200,
            "cold_cases": ["schools"],
            "cold_fused": False,
        }
    else:
        cfg = {
            "vae": (25, 20, 10),
            "vae_particles": (15, 4, 3),
            "vae784": (15, 4, 3),
            "vae784_particles": (7, 1, 1),
            "schools": (25, 40, 20),
            "schools_particles": (15, 10, 5),
            "evidence": (7, 5, 1),
            "evidence_fit_steps": 1000,
            "jit_pyro": True,
            "history": True,
            "new_losses": (15, 5, 3),
            "fused": True,
            "compile_cases": ["schools", "digits"],
            "cold_steps": 10_000,
            "cold_cases": ["schools", "digits"],
            "cold_fused": True,
        }
    only = [s.strip() for s in args.only.split(",") if s.strip()]

    def wanted(key):
        return not only or any(key.startswith(o) for o in only)

    numpyro = None
    numpyro_note = "not run"
    if wanted("digits") or wanted("schools") or wanted("steps"):
        numpyro, why = NumPyro.find(args.numpyro_python, args.threads, args.dtype == "float64")
        if numpyro is None:
            numpyro_note = f"rows skipped: {why}"
            print(f"NumPyro rows skipped: {why} (see benchmarks/README.md, 'NumPyro').")
        else:
            numpyro_note = f"{numpyro.versions} ({numpyro.python}), a separate process"
            print(f"NumPyro rows: {numpyro_note}")
    cfg["numpyro"] = numpyro

    plan = []
    if wanted("digits"):
        plan += vae_case("Digits VAE (64-256-8, batch 128)", digits_data(), 256, 8, 16, cfg)
    if wanted("synthetic"):
        c = dict(
            cfg, vae=cfg["vae784"], vae_particles=cfg["vae784_particles"], history=False, fused=False, numpyro=None
        )
        plan += vae_case(
            "Synthetic 784-dim VAE (784-400-20, batch 128)",
            synthetic_data(),
            400,
            20,
            16 if c["vae_particles"] else 0,
            c,
        )
    if wanted("schools"):
        plan += schools_case(64, cfg)
    if wanted("evidence"):
        plan += evidence_case(cfg)
    if wanted("new"):
        plan += new_losses_case(cfg)

    report = {
        "machine": machine(),
        "settings": {
            "quick": args.quick,
            "validation": args.validation,
            "dtype": args.dtype,
            "lr": LR,
            "command": " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)]),
        },
        "numpyro": numpyro_note,
        "cases": [],
    }
    t_start = time.perf_counter()
    for title, methods, reference, (rounds, block, warmup) in plan:
        t0 = time.perf_counter()
        results = measure(methods, reference, rounds, block, warmup)
        report["cases"].append(
            {
                "title": title,
                "reference": reference,
                "rounds": rounds,
                "block": block,
                "warmup": warmup,
                "results": results,
            }
        )
        print(f"\n== {title}  ({time.perf_counter() - t0:.1f} s)")
        for name, r in results.items():
            comp = f"  compilations={r['compilations']}" if "compilations" in r else ""
            comp += f" ({r['compile_s']:.2f} s)" if "compile_s" in r else ""
            print(
                f"  {name:34s} {r['median_ms']:9.3f} ms [{r['q25_ms']:.3f}, {r['q75_ms']:.3f}]"
                f"  ratio {r['ratio_median']:.3f} [{r['ratio_q25']:.3f}, {r['ratio_q75']:.3f}]"
                f"  CPU {r['cpu_median_ms']:.3f} ms ratio {r['cpu_ratio_median']:.3f}{comp}"
            )
    if wanted("compile"):
        report["compile_times"] = compile_times(cfg["compile_cases"])
        for r in report["compile_times"]:
            print(f"  compile {r['case']:8s} {r['graph']:58s} cold {r['cold_s']:7.2f} s  warm {r['warm_s']:7.2f} s")
    if wanted("steps"):
        n = cfg["cold_steps"]
        print(f"\n== {n} steps including compile, each from a cold process start")
        report["cold_start"] = cold_starts(cfg["cold_cases"], n, cfg["cold_fused"], numpyro, args)
    if numpyro is not None:
        numpyro.cleanup()
    report["targets"] = targets(report)
    report["total_s"] = time.perf_counter() - t_start
    for t in report["targets"]:
        verdict = "" if t["met"] is None else ("met" if t["met"] else "NOT met")
        print(f"  target: {t['target']}: {format_measured(t)} {verdict}")

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text(markdown(report))
    print(f"\nwrote {out / 'results.json'} and {out / 'results.md'} ({report['total_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
