# SPDX-License-Identifier: Apache-2.0
"""
NumPyro's rows of the benchmark (``benchmarks/run.py``), run in another interpreter:
:class:`NumPyro` finds a Python with jax and numpyro, writes the problems' data, and starts
``benchmarks/numpyro_step.py`` as a timed worker or for a cold-start run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from methods import NUMPYRO
from models import problem_arrays
from timing import Method

__all__ = ["NumPyro"]

HERE = Path(__file__).resolve().parent


class NumPyro:
    """
    NumPyro in another interpreter (``--numpyro-python``; JAX is no dependency of this project):
    the problems' data written once to ``.npz`` files (:func:`models.problem_arrays`), and
    ``benchmarks/numpyro_step.py`` started on them, as a timed worker (:meth:`method`) or for a
    cold-start run (:meth:`command`).
    """

    SCRIPT = HERE / "numpyro_step.py"

    def __init__(self, python: str, threads: int, x64: bool, versions: str):
        self.python, self.threads, self.x64, self.versions = python, threads, x64, versions
        self.folder = tempfile.mkdtemp(prefix="numpyro-data-")
        self.paths: dict = {}

    @staticmethod
    def env(threads: int) -> dict:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        if threads == 1:  # XLA's CPU runtime on one thread, like torch here
            flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
            env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        return env

    @classmethod
    def find(cls, python: str | None, threads: int, x64: bool) -> tuple:
        """``(NumPyro, "")`` when ``python`` imports jax and numpyro, else ``(None, why not)``."""
        if not python:
            return None, "no --numpyro-python given and NUMPYRO_PYTHON is not set"
        cmd = [python, "-c", "import jax, numpyro; print(jax.__version__, numpyro.__version__)"]
        try:
            proc = subprocess.run(cmd, env=cls.env(threads), capture_output=True, text=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"{python} could not be run ({type(e).__name__}: {e})"
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            return None, f"{python} cannot import jax and numpyro ({last})"
        jax_v, numpyro_v = proc.stdout.split()
        return cls(python, threads, x64, f"jax {jax_v}, numpyro {numpyro_v}"), ""

    def data(self, case: str) -> str:
        if case not in self.paths:
            import numpy as np

            self.paths[case] = os.path.join(self.folder, f"{case}.npz")
            np.savez(self.paths[case], **problem_arrays(case))
        return self.paths[case]

    def command(self, case: str, *extra: str) -> list:
        return [self.python, str(self.SCRIPT), "--data", self.data(case), "--case", case, *extra] + (
            ["--x64"] if self.x64 else []
        )

    def method(self, case: str) -> Method:
        """NumPyro's row of ``case``: a worker process that times the blocks ``measure`` asks for."""
        holder: dict = {}

        def ask(line: str) -> dict:
            proc = holder["proc"]
            if line:
                proc.stdin.write(line + "\n")
                proc.stdin.flush()
            answer = proc.stdout.readline()
            if not answer:
                holder["err"].seek(0)
                tail = holder["err"].read()[-2000:]
                raise RuntimeError(f"the NumPyro worker ({case}) ended:\n{tail}")
            return json.loads(answer)

        def timed_block(n: int) -> tuple:
            r = ask(str(n))
            return r["wall_s"], r["cpu_s"]

        def build():
            holder["err"] = tempfile.TemporaryFile("w+")
            holder["proc"] = subprocess.Popen(
                self.command(case, "--serve", "--warmup", "5"),
                env=self.env(self.threads),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=holder["err"],
                text=True,
            )
            holder["info"] = ask("")  # built, compiled and warmed up

            def step():
                return timed_block(1)

            return step

        def close():
            proc = holder.pop("proc", None)
            if proc is not None:
                try:
                    proc.stdin.close()
                    proc.wait(timeout=60)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()
                holder["err"].close()

        def info():
            i = holder.get("info", {})
            return {"compilations": 1, "compile_s": i.get("compile_s", float("nan"))}

        m = Method(NUMPYRO, build, info, timed_block=timed_block, close=close)
        return m

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
