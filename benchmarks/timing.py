# SPDX-License-Identifier: Apache-2.0
"""
The benchmark's timing harness (``benchmarks/run.py``): :class:`Method`, one contender, and
:func:`measure`, which builds and warms up every method of a case from the same seed in its
own parameter-store scope, then times one block of steps per method per round, in an order
rotated by one each round, and reports per method the median ms/step over rounds, its IQR,
the median (and IQR) of the per-round ratio to the reference method, and the CPU time.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro

__all__ = ["Method", "measure"]


@dataclass
class Method:
    """One contender: ``build()`` returns a zero-argument step function (run in its scope)."""

    name: str
    build: Callable[[], Callable[[], object]]
    info: Callable[[], dict] = lambda: {}
    step: Callable[[], object] | None = None
    scope: dict = field(default_factory=lambda: {"params": {}, "constraints": {}})
    ms: list = field(default_factory=list)
    #: process CPU time per step of each block (ms): all threads of the process that ran it
    cpu_ms: list = field(default_factory=list)
    #: ``timed_block(n) -> (wall s, CPU s)`` of ``n`` steps, for a method that times itself
    #: in another process (NumPyro); ``None``: ``measure`` times ``step`` here
    timed_block: Callable[[int], tuple] | None = None
    #: called once when ``measure`` is done with the method (ends a worker process)
    close: Callable[[], None] | None = None


def _quantiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def measure(methods: list[Method], reference: str, rounds: int, block: int, warmup: int, seed: int = 0) -> dict:
    try:
        return _measure(methods, reference, rounds, block, warmup, seed)
    finally:
        for m in methods:
            if m.close is not None:
                m.close()


def _measure(methods: list[Method], reference: str, rounds: int, block: int, warmup: int, seed: int) -> dict:
    store = pyro.get_param_store()
    for m in list(methods):
        with store.scope(m.scope):
            pyro.set_rng_seed(seed)
            try:
                m.step = m.build()
            except RuntimeError as e:
                if m.timed_block is None:
                    raise
                # another process's method (NumPyro) that failed to start: drop its row, keep the run
                print(f"  {m.name}: dropped, its worker failed: {e}")
                methods.remove(m)
                continue
            # at least 5 steps: the first call of a compiled loss is eager, the second
            # compiles (inductor); TorchScript's profiling executor profiles the second and
            # third and optimises at the fourth
            for _ in range(max(warmup, 5)):
                m.step()
    for r in range(rounds):
        k = r % len(methods)
        for m in methods[k:] + methods[:k]:
            if m.timed_block is not None:
                wall, cpu = m.timed_block(block)
            else:
                with store.scope(m.scope):
                    # collect the garbage the previous method left, so that it is not charged
                    # to this one (Importance leaves thousands of traces); GC stays on while timing
                    gc.collect()
                    c0, t0 = time.process_time(), time.perf_counter()
                    for _ in range(block):
                        m.step()
                    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            m.ms.append(wall / block * 1e3)
            m.cpu_ms.append(cpu / block * 1e3)
    ref = next(m for m in methods if m.name == reference)
    out = {}
    for m in methods:
        ratios = [a / b for a, b in zip(m.ms, ref.ms)]
        cpu_ratios = [a / b for a, b in zip(m.cpu_ms, ref.cpu_ms)]
        q1, q3 = _quantiles(m.ms)
        r1, r3 = _quantiles(ratios)
        out[m.name] = {
            "median_ms": statistics.median(m.ms),
            "q25_ms": q1,
            "q75_ms": q3,
            "ratio_median": statistics.median(ratios),
            "ratio_q25": r1,
            "ratio_q75": r3,
            "cpu_median_ms": statistics.median(m.cpu_ms),
            "cpu_ratio_median": statistics.median(cpu_ratios),
            "ms_per_round": m.ms,
            "ratio_per_round": ratios,
            "cpu_ms_per_round": m.cpu_ms,
            **m.info(),
        }
    return out
