# SPDX-License-Identifier: Apache-2.0
"""
The benchmark's report (``benchmarks/run.py``): the machine (``machine``), ``results.md``
(``markdown``) and the targets of issues 6, 13 and 16 checked against the measurements
(``targets``).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics

import pyro
import torch
from methods import FUSED, LR, NUMPYRO

__all__ = ["format_measured", "format_met", "machine", "markdown", "targets"]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = [
        "# Benchmark results",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared), torch {m['torch']} on {m['torch_threads']} thread(s), "
        f"pyro-ppl {m['pyro']}, Python {m['python']}; {m['date']}.",
        f"Settings: {'quick' if s['quick'] else 'full'} run, default dtype {s['dtype']}, "
        f"pyro.enable_validation({s['validation']}) for every method, pyro.optim.Adam(lr={LR}) via SVI "
        "(the PyTorch baseline: torch.optim.Adam).",
        "Median ms per step over rounds [IQR]; ratio = per-round ms / reference ms, median [IQR]; "
        "CPU = process CPU time per step (time.process_time), CPU ratio its per-round ratio to the reference's. "
        f"Produced by `{s.get('command', 'python benchmarks/run.py')}`.",
        f"NumPyro: {report['numpyro']}.",
        "",
    ]
    for case in report["cases"]:
        lines += [
            f"## {case['title']}",
            "",
            f"{case['rounds']} rounds x {case['block']} steps, reference: {case['reference']}.",
            "",
            "| method | ms/step | IQR | ratio | ratio IQR | CPU ms/step | CPU ratio | compilations | compile s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in case["results"].items():
            comp = r.get("compilations", "")
            comp_s = f"{r['compile_s']:.2f}" if "compile_s" in r else ""
            lines.append(
                f"| {name} | {r['median_ms']:.3f} | {r['q25_ms']:.3f}–{r['q75_ms']:.3f} | {r['ratio_median']:.3f} | "
                f"{r['ratio_q25']:.3f}–{r['ratio_q75']:.3f} | {r['cpu_median_ms']:.3f} | {r['cpu_ratio_median']:.3f} | "
                f"{comp} | {comp_s} |"
            )
        lines.append("")
    if report.get("compile_times"):
        lines += [
            "## Compile time per graph (s), cold (empty TORCHINDUCTOR_CACHE_DIR) and warm (second process, same dir)",
            "",
            "| case | graph | cold s | warm s |",
            "|---|---|---:|---:|",
        ]
        for r in report["compile_times"]:
            lines.append(f"| {r['case']} | {r['graph']} | {r['cold_s']:.2f} | {r['warm_s']:.2f} |")
        lines.append("")
    if report.get("cold_start"):
        rows = report["cold_start"]
        n = rows[0]["steps"]
        scaled = " (quick run: scaled down from the full run's 10 000; fused step omitted)" if s["quick"] else ""
        lines += [
            f"## {n} steps including compile, each from a cold process start{scaled}",
            "",
            "Wall time of one fresh process: interpreter start, imports, data, compilation and the steps; "
            "ratio = wall / Trace_ELBO's wall on the same case. CPU s: the process and its children "
            "(inductor's compile workers). In-process s: from building the SVI object to the last step.",
            "",
            "| case | method | wall s | ratio | in-process s | compile s | CPU s |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        ref = {r["case"]: r["wall_s"] for r in rows if r["method"] == "Trace_ELBO"}
        for r in rows:
            ratio = f"{r['wall_s'] / ref[r['case']]:.3f}" if r["case"] in ref else ""
            comp = f"{r['compile_s']:.2f}" if r.get("compile_s") is not None else ""
            lines.append(
                f"| {r['case']} | {r['method']} | {r['wall_s']:.2f} | {ratio} | {r['steps_s']:.2f} | {comp} | "
                f"{r['cpu_s']:.2f} |"
            )
        lines.append("")
    if report["targets"]:
        lines += ["## Targets (issues 6, 13, 16)", "", "| target | measured | met |", "|---|---:|:---:|"]
        for t in report["targets"]:
            lines.append(f"| {t['target']} | {format_measured(t)} | {format_met(t)} |")
        lines.append("")
    return "\n".join(lines)


def format_measured(t: dict) -> str:
    return t.get("note", "") if t["measured"] is None else f"{t['measured']:.3f}"


def format_met(t: dict) -> str:
    return "–" if t["met"] is None else ("yes" if t["met"] else "no")


def targets(report: dict) -> list:
    out = []
    by_title = {c["title"]: c["results"] for c in report["cases"]}

    def ratio(prefix, name):
        for title, res in by_title.items():
            if title.startswith(prefix) and title.endswith(", 1 particle") and name in res:
                return res[name]["ratio_median"]
        return None

    checks = [
        ("Digits", "BetaELBO", "BetaELBO / Trace_ELBO <= 1.03 (digits VAE)", lambda r: r <= 1.03),
        ("Synthetic", "BetaELBO", "BetaELBO / Trace_ELBO <= 1.03 (784-dim VAE)", lambda r: r <= 1.03),
        ("Eight schools", "BetaELBO", "BetaELBO / Trace_ELBO <= 1.03 (eight schools)", lambda r: r <= 1.03),
        ("Digits", "JitBetaELBO", "JitBetaELBO (TorchScript) / Trace_ELBO <= 0.75 (digits VAE)", lambda r: r <= 0.75),
        (
            "Eight schools",
            "JitBetaELBO",
            "JitBetaELBO (TorchScript) / Trace_ELBO <= 0.5 (eight schools)",
            lambda r: r <= 0.5,
        ),
        (
            "Digits",
            "JitBetaELBO (inductor)",
            "JitBetaELBO (inductor) / Trace_ELBO <= 0.75 (digits VAE)",
            lambda r: r <= 0.75,
        ),
        (
            "Eight schools",
            "JitBetaELBO (inductor)",
            "JitBetaELBO (inductor) / Trace_ELBO <= 0.5 (eight schools)",
            lambda r: r <= 0.5,
        ),
    ]
    for title, name, text, ok in checks:
        r = ratio(title, name)
        if r is not None:
            out.append({"target": text, "measured": r, "met": bool(ok(r))})
    schools = by_title.get("Eight schools (AutoNormal), 1 particle", {})
    checks16 = [("Digits", FUSED, "fused step / Trace_ELBO <= 0.25 (digits VAE, issue 16)", lambda r: r <= 0.25)]
    if NUMPYRO not in schools:
        # without NumPyro's row, a proxy: issue 16 measured NumPyro at 0.026 x Trace_ELBO
        text = "fused step / Trace_ELBO <= 3 x 0.026 (eight schools, issue 16; 0.026: NumPyro in the issue)"
        checks16.append(("Eight schools", FUSED, text, lambda r: r <= 0.078))
    for title, name, text, ok in checks16:
        r = ratio(title, name)
        if r is not None:
            out.append({"target": text, "measured": r, "met": bool(ok(r))})
    # issue 16, measured directly: the fused step's CPU time per step within 3x NumPyro's
    if FUSED in schools:
        text = "fused step CPU time / NumPyro CPU time per step <= 3 (eight schools, issue 16)"
        if NUMPYRO in schools:
            rounds = zip(schools[FUSED]["cpu_ms_per_round"], schools[NUMPYRO]["cpu_ms_per_round"])
            r = statistics.median(a / b for a, b in rounds)
            out.append({"target": text, "measured": r, "met": r <= 3})
        else:
            out.append({"target": text, "measured": None, "met": None, "note": "not measured (JAX absent)"})
    # issue 16: compile time per graph, cold <= 15 s, warm <= 2 s
    graphs = {}
    startup = {}  # inductor's start-up, once per process, not counted in any graph's time
    for row in report.get("compile_times") or []:
        if row["graph"].startswith("inductor start-up"):
            startup[row["case"]] = (row["cold_s"], row["warm_s"])
        elif row["graph"].startswith("JitBetaELBO"):
            graphs[(row["case"], "JitBetaELBO (inductor) gradient graph")] = (row["cold_s"], row["warm_s"])
        elif row["graph"].startswith("fused step"):
            cold, warm = graphs.get((row["case"], "fused step (record + compile)"), (0.0, 0.0))
            graphs[(row["case"], "fused step (record + compile)")] = (cold + row["cold_s"], warm + row["warm_s"])
    for (case, graph), (cold, warm) in graphs.items():
        s_cold, s_warm = startup.get(case, (None, None))
        for kind, value, limit, s_value in (("cold", cold, 15, s_cold), ("warm", warm, 2, s_warm)):
            extra = "" if s_value is None else f"; inductor start-up, once per process, {s_value:.1f} s more"
            text = f"{kind} compile <= {limit} s: {case}, {graph} (issue 16{extra})"
            out.append({"target": text, "measured": value, "met": value <= limit})
    for title, res in by_title.items():
        if title.startswith("Eight schools (AutoNormal), ") and "BetaELBO (vectorised)" in res and "particles" in title:
            r = res["BetaELBO (vectorised)"]["ratio_median"] / res["Trace_ELBO (vectorised)"]["ratio_median"]
            n = title.split(", ")[-1]
            text = f"BetaELBO / Trace_ELBO <= 1.05, vectorised, {n} (issue 16)"
            out.append({"target": text, "measured": r, "met": r <= 1.05})
        if title.startswith("Eight schools (AutoNormal), 1 particle") and "BetaELBO" in res:
            r = res["BetaELBO"]["ratio_median"]
            text = "BetaELBO / Trace_ELBO <= 1.05, 1 particle (issue 16)"
            out.append({"target": text, "measured": r, "met": r <= 1.05})
        pairs = (
            ("BetaTraceEnumELBO", "TraceEnum_ELBO"),
            ("BetaTraceGraphELBO", "TraceGraph_ELBO"),
            ("IWAE (DReG)", "RenyiELBO(alpha=0)"),
        )
        for ours, base in pairs:
            if ours in res and base in res:
                r = res[ours]["ratio_median"]
                out.append({"target": f"{ours} / {base} <= 1.05 (issue 13)", "measured": r, "met": r <= 1.05})
    for title in by_title:
        if title.startswith("Evidence"):
            r = by_title[title]["estimate_evidence (1000)"]["ratio_median"]
            out.append(
                {
                    "target": "Importance(1000) / estimate_evidence(1000) >= 100",
                    "measured": 1.0 / r,
                    "met": 1.0 / r >= 100,
                }
            )
    return out


# ---------------------------------------------------------------------------------------
