# SPDX-License-Identifier: Apache-2.0
"""
The benchmark's measurements in fresh processes (``benchmarks/run.py``): compile time per
graph, cold and warm (``compile_times``, each process running ``compile_probe``), and N steps
including compile from a cold process start (``cold_starts``, each process running
``steps_probe``). The processes are ``benchmarks/run.py`` itself with a hidden option.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyro
import torch
from methods import FUSED, LR, NUMPYRO
from models import VAE, EightSchools, digits_data, minibatches, problem_arrays
from numpyro_worker import NumPyro
from pyro.infer import SVI, Trace_ELBO

from pyro_elbo_lab import JitBetaELBO
from pyro_elbo_lab.losses.fused import FusedSVI

__all__ = ["cold_starts", "compile_probe", "compile_times", "steps_probe"]

#: the entry point the probe processes run
RUN = Path(__file__).resolve().parent / "run.py"


def compile_probe(case: str) -> dict:
    """
    In this (fresh) process: compile the inductor graphs of ``case`` and return the
    seconds per graph: the gradient graph of ``JitBetaELBO(compiler="inductor")`` through
    SVI (its recording, by make_fx, and its compilation) and the fused step's graph.

    Inductor's start-up (its imports, the C++ toolchain and CPU-feature probes: 4-5 s
    even with a warm cache) is paid once per process by whichever graph compiles first;
    it is timed first, on a one-op graph, and reported as its own row, so that each
    graph's figure is that graph's.
    """
    start = time.perf_counter()
    torch.compile(lambda t: t.sin(), fullgraph=True, dynamic=False)(torch.ones(4))
    startup = time.perf_counter() - start
    if case == "schools":
        s = EightSchools()
        model, guide, args = s.model, s.guide, (s.y, s.sigma)
    else:
        x = digits_data()
        vae = VAE(x.shape[1], 256, 8, num_data=x.shape[0], seed=0)
        model, guide, args = vae.model, vae.guide, (minibatches(x, 128)[0],)
    out = {"inductor start-up (first torch.compile in a process, a one-op graph)": startup}
    store = pyro.get_param_store()
    with store.scope():
        pyro.set_rng_seed(0)
        loss = JitBetaELBO(compiler="inductor")
        svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), loss)
        for _ in range(3):
            svi.step(*args)
        out["JitBetaELBO (inductor): gradient graph (record + compile)"] = loss.compile_seconds
    with store.scope():
        pyro.set_rng_seed(0)
        loss = JitBetaELBO(compiler="inductor")
        svi = FusedSVI(model, guide, pyro.optim.Adam({"lr": LR}), loss)
        for _ in range(3):
            svi.step(*args)
        out["fused step: record"] = loss.compile_seconds
        out["fused step: compile (gradients + Adam)"] = svi.compile_seconds
    return out


def compile_times(cases: list) -> list:
    """Cold (empty TORCHINDUCTOR_CACHE_DIR) and warm (the same dir, a second process) compile seconds."""
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            runs = {}
            for kind in ("cold", "warm"):
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, str(RUN), "--compile-probe", case, "--threads", str(torch.get_num_threads())],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(f"  compile probe {case} ({kind}) failed:\n{proc.stderr[-2000:]}")
                    break
                runs[kind] = (json.loads(proc.stdout.strip().splitlines()[-1]), wall)
            if len(runs) == 2:
                for graph in runs["cold"][0]:
                    cold, warm = runs["cold"][0][graph], runs["warm"][0][graph]
                    rows.append({"case": case, "graph": graph, "cold_s": cold, "warm_s": warm})
                cold, warm = runs["cold"][1], runs["warm"][1]
                rows.append({"case": case, "graph": "whole process (imports, 6 steps)", "cold_s": cold, "warm_s": warm})
    return rows


# ---------------------------------------------------------------------------------------
# N steps including compile, each from a cold process start


def steps_probe(spec: dict) -> dict:
    """
    In this (fresh) process: ``spec["steps"]`` steps of ``spec["method"]`` (``"trace"``:
    ``Trace_ELBO`` through SVI; ``"fused"``: ``FusedSVI`` with ``JitBetaELBO(compiler="inductor")``)
    on ``spec["case"]``, the first steps compiling. The digits are read from ``spec["data"]``
    (the ``.npz`` NumPyro reads too), so neither side pays for scikit-learn.
    """
    import numpy as np

    if spec["case"] == "schools":
        s = EightSchools()
        model, guide, batches = s.model, s.guide, [(s.y, s.sigma)]
    else:
        arrays = np.load(spec["data"])
        xs = torch.from_numpy(arrays["batches"]).to(torch.get_default_dtype())
        vae = VAE(xs.shape[-1], 256, 8, num_data=int(arrays["num_data"]), seed=0)
        model, guide, batches = vae.model, vae.guide, [(x,) for x in xs]
    pyro.set_rng_seed(0)
    t0 = time.perf_counter()
    if spec["method"] == "trace":
        svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), Trace_ELBO())
    else:
        loss = JitBetaELBO(compiler="inductor")
        svi = FusedSVI(model, guide, pyro.optim.Adam({"lr": LR}), loss)
    value = float("nan")
    for i in range(spec["steps"]):
        value = svi.step(*batches[i % len(batches)])
    out = {"steps_s": time.perf_counter() - t0, "loss": value}
    if spec["method"] == "fused":
        out["compile_s"] = loss.compile_seconds + svi.compile_seconds
    return out


def cold_starts(cases: list, steps: int, fused: bool, numpyro: NumPyro | None, args) -> list:
    """
    Wall time of ``steps`` steps from a cold process start (interpreter, imports, data,
    compilation, steps), one fresh process each: ``Trace_ELBO``, the fused step with an empty
    and then a warm inductor cache, and NumPyro. Also the CPU time of the process and its
    children (inductor's compile workers), from ``getrusage``.
    """
    import numpy as np

    rows = []
    folder = tempfile.mkdtemp(prefix="cold-start-")
    try:
        for case in cases:
            data = os.path.join(folder, f"{case}.npz")
            np.savez(data, **problem_arrays(case))
            flags = ["--threads", str(args.threads), "--dtype", args.dtype, "--validation", args.validation]

            def probe(method, case=case, data=data, flags=flags):
                spec = {"case": case, "method": method, "steps": steps, "data": data}
                return [sys.executable, str(RUN), "--steps-probe", json.dumps(spec), *flags]

            cache = os.path.join(folder, f"inductor-{case}")
            inductor = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
            runs = [("Trace_ELBO", probe("trace"), dict(os.environ))]
            if fused:
                runs += [
                    (f"{FUSED}, empty inductor cache", probe("fused"), inductor),
                    (f"{FUSED}, warm inductor cache", probe("fused"), inductor),
                ]
            if numpyro is not None:
                runs.append((NUMPYRO, numpyro.command(case, "--steps", str(steps)), numpyro.env(args.threads)))
            for name, cmd, env in runs:
                r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                wall = time.perf_counter() - t0
                r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                if proc.returncode != 0:
                    print(f"  {steps} steps from a cold start, {case}, {name}: failed\n{proc.stderr[-2000:]}")
                    continue
                info = json.loads(proc.stdout.strip().splitlines()[-1])
                cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
                rows.append(
                    {
                        "case": case,
                        "method": name,
                        "steps": steps,
                        "wall_s": wall,
                        "cpu_s": cpu,
                        "steps_s": info["steps_s"],
                        "compile_s": info.get("compile_s"),
                        "loss": info["loss"],
                    }
                )
                print(f"  {steps} steps from a cold start: {case:8s} {name:60s} {wall:8.2f} s (CPU {cpu:.2f} s)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return rows
