# SPDX-License-Identifier: Apache-2.0
"""
When a chain stops before ``num_steps``: the convergence rule (one small class with one
method, so that another rule can take its place) and the wall-time limit.

Imports only :mod:`pyro_elbo_lab.runner.options`.
"""
from __future__ import annotations

import math
import time

from .options import Convergence

__all__ = ["WindowMeanRule", "TimeLimit", "final_score"]


class WindowMeanRule:
    """
    The window-mean rule of :class:`~pyro_elbo_lab.runner.Convergence`: every ``window``
    steps, compare the mean objective (:math:`-\\mathrm{loss}`, non-finite steps left out)
    of the last window with that of the window before; a check is flat when the
    improvement is below ``tol * |newer mean|``; stop after ``patience`` consecutive flat
    checks. A window pair in which β or the capacity changed resets the count (the
    objective moves with its schedule, not a plateau).

    Window means reduce the Monte Carlo noise of single-step estimates by
    :math:`\\sqrt{w}`, and patience guards against one noisy flat window.

    :param Convergence options: tolerance, window and patience.
    """

    def __init__(self, options: Convergence):
        self.options = options
        self.flat_checks = 0

    def should_stop(self, rows: list[dict], step: int) -> bool:
        """
        :param list rows: the chain's history rows so far (the last is ``step``'s).
        :param int step: the step just completed (0-based).
        :returns: whether the chain has converged.
        """
        tol, w = self.options.tol, self.options.window
        if (step + 1) % w != 0 or len(rows) < 2 * w:
            return False
        window = rows[-2 * w:]
        for key in ("beta", "capacity"):
            if len({r.get(key) for r in window}) > 1:
                self.flat_checks = 0
                return False
        older = [-r["loss"] for r in window[:w] if math.isfinite(r["loss"])]
        newer = [-r["loss"] for r in window[w:] if math.isfinite(r["loss"])]
        if not older or not newer:
            return False
        m_old, m_new = math.fsum(older) / len(older), math.fsum(newer) / len(newer)
        if m_new - m_old < tol * abs(m_new):
            self.flat_checks += 1
        else:
            self.flat_checks = 0
        return self.flat_checks >= self.options.patience

    def state_dict(self) -> dict:
        """Plain data to resume the rule from a checkpoint."""
        return {"flat_checks": self.flat_checks}

    def load_state_dict(self, state: dict) -> None:
        self.flat_checks = int(state["flat_checks"])


class TimeLimit:
    """
    A wall-time limit per chain, in seconds (``None``: no limit), counted from
    :meth:`start`.
    """

    def __init__(self, max_time: float | None):
        self.max_time = max_time
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def expired(self) -> bool:
        return self.max_time is not None and self.elapsed() >= self.max_time


def final_score(rows: list[dict], window: int) -> float:
    """Mean objective (-loss) over the last ``window`` finite steps; NaN for none."""
    values = [-r["loss"] for r in rows[-window:] if math.isfinite(r["loss"])]
    return math.fsum(values) / len(values) if values else math.nan
