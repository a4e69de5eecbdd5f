# SPDX-License-Identifier: Apache-2.0
"""
When a chain stops before ``num_steps``: the convergence rule (one small class with
``should_stop``, ``evidence`` and ``state_dict``, so that another rule can take its place)
and the wall-time limit.

Imports only :mod:`pyro_elbo_lab.runner.options`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np

from .options import Convergence

if TYPE_CHECKING:
    import torch

__all__ = ["RhatRule", "split_rhat", "TimeLimit", "final_score"]

#: two-sided 97.5 % quantiles of Student's t for 1..12 degrees of freedom (the slope test
#: has ``2 * num_chains - 2`` of them)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179]


def _rhat(x: np.ndarray) -> float:
    """Basic :math:`\\hat R` of ``x`` (chains, draws): :math:`\\sqrt{\\hat V / W}`."""
    n = x.shape[1]
    within = x.var(axis=1, ddof=1).mean()
    between = n * x.mean(axis=1).var(ddof=1)
    if within == 0.0:
        return 1.0 if between == 0.0 else math.inf
    return float(math.sqrt(((n - 1) / n * within + between / n) / within))


def _rank_normal(x: np.ndarray) -> np.ndarray:
    from scipy.special import ndtri
    from scipy.stats import rankdata

    ranks = rankdata(x, method="average").reshape(x.shape)
    return ndtri((ranks - 0.375) / (x.size + 0.25))


def split_rhat(x: np.ndarray | list[float]) -> float:
    """
    Rank-normalised split :math:`\\hat R` (Vehtari et al. 2021) of ``x`` with shape
    ``(chains, draws)``: each chain is split in two, the draws are rank-normalised (bulk)
    and, for the tails, folded about the median and rank-normalised; the larger of the two
    :math:`\\hat R`. Invariant under any increasing transformation of ``x`` (adding a
    constant or scaling included). 1.0 for a constant array.

    :param x: array of shape ``(chains, draws)``, draws >= 4.
    :rtype: float

    References

    [1] `Rank-normalization, folding, and localization: An improved R-hat for assessing convergence of MCMC`,
        Aki Vehtari, Andrew Gelman, Daniel Simpson, Bob Carpenter,
        Paul-Christian Bürkner (2021)
    """
    x = np.asarray(x, dtype=float)
    half = x.shape[1] // 2
    split = np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)
    if np.all(split == split.flat[0]):
        return 1.0
    bulk = _rhat(_rank_normal(split))
    tail = _rhat(_rank_normal(np.abs(split - np.median(split))))
    return max(bulk, tail)


class RhatRule:
    """
    The stationarity rule of :class:`~pyro_elbo_lab.runner.Convergence` (Dhaka et al.
    2020): every ``every`` steps, the last ``window`` finite values of the objective
    :math:`-\\mathrm{loss}` are cut into ``num_chains`` consecutive chains and their
    rank-normalised split :math:`\\hat R` (:func:`split_rhat`) is computed, and (with
    ``Convergence.params``) the same for the iterates of the variational
    parameters, through one fixed random projection per parameter tensor, as Dhaka et al.
    do for the iterates. The trace is stationary when every :math:`\\hat R <` ``rhat`` and
    the objective has no trend: the least-squares
    slope of the objective over the ``2 * num_chains`` half-chain means (batch means, which
    absorb the autocorrelation of the trace) is not significantly different from 0
    (:math:`|t|` below Student's two-sided 97.5 % quantile). A still-rising objective is
    an unfinished fit, and a falling one a diverging fit: neither is converged, even when
    its rise within the window is too small for :math:`\\hat R` to see. The run stops after ``patience``
    consecutive stationary checks. A window in which β or the capacity changed is not
    stationary (the objective moves with its schedule).

    Both statistics are scale-free: adding a constant to the log joint, or scaling it,
    changes neither, so the stopping step does not depend on the size of the ELBO. A trace
    that still rises (or falls) by more than its Monte Carlo noise within the window has
    chain means that differ, hence :math:`\\hat R > 1.1`; a smaller but significant trend is
    caught by the slope test.

    Stan's ADVI (Kucukelbir et al. 2017) instead stops when the mean or median of recent
    relative changes :math:`|\\mathcal L_t - \\mathcal L_{t-1}| / |\\mathcal L_t|` of ELBO
    estimates drops below ``tol_rel_obj``: a rule relative to :math:`|\\mathcal L|`, so an
    ELBO in the thousands of nats "converges" far from the optimum, a constant added to
    the log joint changes the stopping step, and a worsening ELBO can pass. Dhaka et al.
    (2020) show that rule stops too early or too late, and that :math:`\\hat R` of the
    optimisation trace detects the stationary phase of SGD.

    :param Convergence options: window, chains, threshold, check interval, patience.

    References

    [1] `Robust, Accurate Stochastic Optimization for Variational Inference`, Akash Kumar
        Dhaka, Alejandro Catalina, Michael Riis Andersen, Måns Magnusson, Jonathan H.
        Huggins, Aki Vehtari (2020)

    [2] `Automatic Differentiation Variational Inference`, Alp Kucukelbir, Dustin Tran,
        Rajesh Ranganath, Andrew Gelman, David M. Blei (2017)

    [3] `Rank-normalization, folding, and localization: An improved R-hat for assessing convergence of MCMC`,
        Aki Vehtari, Andrew Gelman, Daniel Simpson, Bob Carpenter,
        Paul-Christian Bürkner (2021)
    """

    name = "split-rhat"

    def __init__(self, options: Convergence):
        self.options = options
        self.stationary_checks = 0
        self.last: dict = {}
        self.names: list[str] = []
        self.directions: list = []
        self.projections: deque = deque(maxlen=options.window)
        self.averaging_since: int | None = None  # first averaged step (Polyak-Ruppert), or None
        self.count = 0
        self.means: dict = {}
        self.applied = False  # whether finish() loaded the average into the store

    def observe(self, named_parameters: Iterable[tuple[str, torch.Tensor]]) -> None:
        """
        After each step: record one random projection of each parameter tensor
        (unconstrained values, a fixed direction per tensor drawn from a private generator,
        so the run's random numbers are untouched). Kept on the parameters' device; read
        at checks only, so this adds no synchronisation per step. Does nothing unless
        ``Convergence.params`` is set.

        :param named_parameters: ``(name, tensor)`` pairs, e.g. the parameter store's.
        """
        if not self.options.params and self.averaging_since is None:
            return
        import torch

        pairs = sorted(named_parameters, key=lambda nt: nt[0])
        if self.averaging_since is not None:
            self.count += 1
            with torch.no_grad():
                for name, t in pairs:
                    mean = self.means.get(name)
                    self.means[name] = t.detach().clone() if mean is None else mean + (t.detach() - mean) / self.count
        if not self.options.params:
            return
        names = [n for n, _ in pairs]
        if names != self.names:  # a new parameter: start the window again
            generator = torch.Generator().manual_seed(0)
            self.names = names
            self.directions = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for _, t in pairs]
            self.projections.clear()
        with torch.no_grad():
            values = torch.stack(
                [(t.detach() * d).sum().to(torch.float64) for (_, t), d in zip(pairs, self.directions)]
            )
        self.projections.append(values)

    def assess(self, rows: list[dict]) -> dict:
        """
        The statistics of the last ``window`` rows, without changing the rule's state.

        :returns: ``{"rule", "rhat", "slope_t", "stationary", "window", "reason"}``
            (``rhat`` and ``slope_t`` None when there are too few finite values).
        """
        o = self.options
        out = {
            "rule": self.name,
            "rhat": None,
            "param_rhat": None,
            "slope_t": None,
            "stationary": False,
            "window": o.window,
        }
        window = rows[-o.window :]
        if len(window) < o.window:
            return dict(out, reason=f"fewer than window={o.window} steps")
        kept = [r for r in window if not r.get("skipped", False)]  # a skipped step has no beta / capacity
        for key in ("beta", "capacity"):
            if len({r.get(key) for r in kept}) > 1:
                return dict(out, reason=f"{key} changed within the window")
        values = np.array([-r["loss"] for r in window], dtype=float)
        values = values[np.isfinite(values)]
        n = len(values) // (2 * o.num_chains) * 2
        if n < 4:
            return dict(out, reason="too few finite values in the window")
        values = values[len(values) - n * o.num_chains :].reshape(o.num_chains, n)
        rhat = split_rhat(values)
        means = values.reshape(2 * o.num_chains, n // 2).mean(axis=1)
        t = _slope_t(means)
        param_rhat = None
        if o.params:
            if len(self.projections) < o.window:
                return dict(
                    out, rhat=rhat, slope_t=t, reason="fewer than window parameter values since a parameter was added"
                )
            import torch

            iterates = torch.stack(list(self.projections)[-n * o.num_chains :]).cpu().numpy()
            param_rhat = max(split_rhat(iterates[:, k].reshape(o.num_chains, n)) for k in range(iterates.shape[1]))
        trend = abs(t) > _T975[min(len(means) - 2, len(_T975)) - 1]
        if not rhat < o.rhat:
            reason = f"objective R-hat {rhat:.3g} >= {o.rhat}"
        elif param_rhat is not None and not param_rhat < o.rhat:
            reason = f"parameter R-hat {param_rhat:.3g} >= {o.rhat}"
        elif trend:
            reason = f"objective {'rising' if t > 0 else 'falling'} (slope t = {t:.3g})"
        else:
            reason = "stationary"
        return dict(out, rhat=rhat, param_rhat=param_rhat, slope_t=t, stationary=reason == "stationary", reason=reason)

    def should_stop(self, rows: list[dict], step: int) -> bool:
        """
        :param list rows: the chain's history rows so far (the last is ``step``'s).
        :param int step: the step just completed (0-based).
        :returns: whether the chain has converged.
        """
        if self.averaging_since is not None:
            return self.count >= self.options.average
        every = self.options.every
        assert every is not None  # Convergence.__post_init__ sets it
        if (step + 1) % every != 0:
            return False
        self.last = dict(self.assess(rows), step=step)
        self.stationary_checks = self.stationary_checks + 1 if self.last["stationary"] else 0
        if self.stationary_checks >= self.options.patience and self.options.average > 0:
            self.averaging_since = step + 1  # average the next `average` iterates, then stop
            return False
        return self.stationary_checks >= self.options.patience

    def finish(self) -> None:
        """
        When the chain ends (converged, or cut short by ``num_steps``, the time limit, a
        callback or a Ctrl-C, but not by an error): with ``Convergence.average`` and
        averaging under way, put the average of the iterates since stationarity
        (unconstrained, Polyak-Ruppert) into the parameter store, in place. The result
        reports how many iterates it averaged (``averaged_iterates``) and whether that is
        all of ``Convergence.average`` (``averaging_complete``).
        """
        if self.averaging_since is None or not self.means or self.applied:
            return
        import torch

        with torch.no_grad():
            for name, p in pyro_named_parameters():
                if name in self.means:
                    p.copy_(self.means[name])
        self.applied = True

    def evidence(self, rows: list[dict], stopped: bool) -> dict:
        """
        What the result reports: ``converged`` and the statistics it rests on (the
        stopping check's when the rule stopped the run, else those of the final window).
        """
        last = self.last if stopped else dict(self.assess(rows), step=len(rows) - 1 if rows else None)
        # averaged_iterates: how many iterates the parameters are the average of (0: the last iterate)
        return dict(
            last,
            converged=bool(stopped or last["stationary"]),
            averaged_iterates=self.count if self.applied else 0,
            averaging_since=self.averaging_since,
            averaging_complete=self.applied and self.count >= self.options.average,
        )

    def state_dict(self) -> dict:
        """Plain data to resume the rule from a checkpoint."""
        return {
            "stationary_checks": self.stationary_checks,
            "last": dict(self.last),
            "names": list(self.names),
            "projections": [v.tolist() for v in self.projections],
            "averaging_since": self.averaging_since,
            "count": self.count,
            "applied": self.applied,
            "means": {
                n: {"values": t.tolist(), "dtype": str(t.dtype).replace("torch.", "")} for n, t in self.means.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        import torch

        self.stationary_checks = int(state.get("stationary_checks", 0))
        self.last = dict(state.get("last") or {})
        self.names = list(state.get("names") or [])
        self.projections.clear()
        self.projections.extend(torch.tensor(v, dtype=torch.float64) for v in state.get("projections") or [])
        self.averaging_since = state.get("averaging_since")
        self.count = int(state.get("count", 0))
        self.applied = bool(state.get("applied", False))
        store = dict(pyro_named_parameters())
        self.means = {
            n: torch.tensor(m["values"], dtype=getattr(torch, m["dtype"])).to(store[n].device)
            for n, m in (state.get("means") or {}).items()
        }
        if self.names:  # the same fixed directions, drawn again from the private generator
            generator = torch.Generator().manual_seed(0)
            store = dict(pyro_named_parameters())
            self.directions = [
                torch.randn(store[n].shape, generator=generator, dtype=store[n].dtype).to(store[n].device)
                for n in self.names
            ]


def pyro_named_parameters() -> Iterable[tuple[str, torch.Tensor]]:
    """The parameter store's ``(name, unconstrained tensor)`` pairs."""
    import pyro

    return pyro.get_param_store().named_parameters()


def _slope_t(y: np.ndarray) -> float:
    """Student's t of the least-squares slope of ``y`` against its index (0 for a flat ``y``)."""
    k = len(y)
    x = np.arange(k, dtype=float) - (k - 1) / 2
    slope = float((x * (y - y.mean())).sum() / (x * x).sum())
    resid = y - y.mean() - slope * x
    s2 = float((resid * resid).sum()) / (k - 2)
    if s2 == 0.0:
        return 0.0 if slope == 0.0 else math.copysign(math.inf, slope)
    return slope / math.sqrt(s2 / float((x * x).sum()))


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
