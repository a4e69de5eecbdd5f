# SPDX-License-Identifier: Apache-2.0
"""
Schedules for β (KL annealing), capacity and other hyper-parameters.

A schedule is a small callable object: ``schedule(step) -> float``, where ``step`` is the
number of gradient steps taken so far (0 for the first step). The losses count their own
steps (:attr:`pyro_elbo_lab.BetaELBO.step`) and save that count in
:meth:`~pyro_elbo_lab.BetaELBO.state_dict`, so a resumed run continues its schedule.

Any callable ``int -> float`` can be used where a schedule is accepted; the classes here
validate their arguments and print readably.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

__all__ = [
    "Schedule",
    "Constant",
    "LinearWarmup",
    "Cyclical",
    "Sigmoid",
    "Tempering",
    "as_schedule",
]


def _check_finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_nonnegative(name: str, value: float) -> float:
    value = _check_finite(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def _check_length(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer number of steps, got {value!r}")
    return value


class Schedule:
    """Base class: a function of the step count returning a float."""

    def __call__(self, step: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def _fields(self) -> dict[str, Any]:
        return dict(vars(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._fields().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self._fields().items()))))


class Constant(Schedule):
    """
    A constant value.

    :param float value: the value returned at every step.
    """

    def __init__(self, value: float) -> None:
        self.value = _check_finite("value", value)

    def __call__(self, step: int) -> float:
        return self.value


class LinearWarmup(Schedule):
    """
    Linear KL annealing (warm-up): ``start`` for the first ``delay`` steps, then a linear
    ramp to ``end`` over ``num_steps`` steps, then ``end``.

    :param int num_steps: length of the ramp, > 0.
    :param float start: value before and at the start of the ramp (default 0).
    :param float end: value after the ramp (default 1).
    :param int delay: steps held at ``start`` before the ramp (default 0).
    :raises ValueError: if ``num_steps`` is not a positive integer, ``delay`` not a
        non-negative integer, or ``start`` / ``end`` not finite.

    >>> warmup = LinearWarmup(100, delay=50)
    >>> [warmup(step) for step in (0, 50, 100, 150, 1000)]
    [0.0, 0.0, 0.5, 1.0, 1.0]

    References

    [1] `Generating Sentences from a Continuous Space`, Samuel R. Bowman, Luke Vilnis,
        Oriol Vinyals, Andrew M. Dai, Rafal Jozefowicz, Samy Bengio (2016)

    [2] `Ladder Variational Autoencoders`, Casper Kaae Sønderby, Tapani Raiko, Lars
        Maaløe, Søren Kaae Sønderby, Ole Winther (2016)
    """

    def __init__(self, num_steps: int, start: float = 0.0, end: float = 1.0, delay: int = 0) -> None:
        self.num_steps = _check_length("num_steps", num_steps)
        self.start = _check_finite("start", start)
        self.end = _check_finite("end", end)
        if isinstance(delay, bool) or not isinstance(delay, int) or delay < 0:
            raise ValueError(f"delay must be a non-negative integer, got {delay!r}")
        self.delay = delay

    def __call__(self, step: int) -> float:
        t = min(max(step - self.delay, 0) / self.num_steps, 1.0)
        return self.start + t * (self.end - self.start)


class Cyclical(Schedule):
    """
    Cyclical annealing: ``num_cycles`` cycles over ``num_steps`` steps; within each cycle
    the value rises linearly from ``start`` to ``end`` over the first fraction ``ratio``
    of the cycle and is held at ``end`` for the rest. After ``num_steps`` it stays at
    ``end``.

    :param int num_steps: total length of all cycles, > 0.
    :param int num_cycles: number of cycles M (default 4).
    :param float ratio: proportion R of each cycle spent increasing, in (0, 1] (default 0.5).
    :param float start: value at the start of each cycle (default 0).
    :param float end: value held at the end of each cycle (default 1).
    :raises ValueError: if ``num_steps`` or ``num_cycles`` is not a positive integer,
        ``num_cycles > num_steps`` (a cycle shorter than one step), ``ratio`` is outside
        (0, 1], or ``start`` / ``end`` not finite.

    >>> cyclical = Cyclical(100, num_cycles=2)
    >>> [cyclical(step) for step in (0, 10, 25, 49, 50, 60, 100)]
    [0.0, 0.4, 1.0, 1.0, 0.0, 0.4, 1.0]

    References

    [1] `Cyclical Annealing Schedule: A Simple Approach to Mitigating KL Vanishing`,
        Hao Fu, Chunyuan Li, Xiaodong Liu, Jianfeng Gao, Asli Celikyilmaz, Lawrence Carin
        (2019)
    """

    def __init__(
        self,
        num_steps: int,
        num_cycles: int = 4,
        ratio: float = 0.5,
        start: float = 0.0,
        end: float = 1.0,
    ) -> None:
        self.num_steps = _check_length("num_steps", num_steps)
        self.num_cycles = _check_length("num_cycles", num_cycles)
        if self.num_cycles > self.num_steps:
            raise ValueError(
                f"num_cycles={self.num_cycles!r} is more than num_steps={self.num_steps!r}: "
                f"each cycle would last {self.num_steps / self.num_cycles:g} steps (< 1), so the "
                "value never leaves start; use num_cycles <= num_steps"
            )
        ratio = _check_finite("ratio", ratio)
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        self.ratio = ratio
        self.start = _check_finite("start", start)
        self.end = _check_finite("end", end)

    def __call__(self, step: int) -> float:
        if step >= self.num_steps:
            return self.end
        period = self.num_steps / self.num_cycles
        tau = (step % period) / period
        t = min(tau / self.ratio, 1.0)
        return self.start + t * (self.end - self.start)


class Sigmoid(Schedule):
    """
    A logistic ramp from ``start`` to ``end`` centred on step ``num_steps / 2``:
    ``start + (end - start) * sigmoid(steepness * (step / num_steps - 0.5))``, rescaled so
    that it is exactly ``start`` at step 0 and ``end`` from ``num_steps`` on.

    :param int num_steps: length of the ramp, > 0.
    :param float start: initial value (default 0).
    :param float end: final value (default 1).
    :param float steepness: slope of the logistic in units of 1/num_steps (default 10), > 0.
    :raises ValueError: if ``num_steps`` is not a positive integer, ``steepness`` <= 0, or a
        value is not finite.

    References

    [1] `Generating Sentences from a Continuous Space`, Bowman et al. (2016), who anneal
        the KL weight with a sigmoid.
    """

    def __init__(self, num_steps: int, start: float = 0.0, end: float = 1.0, steepness: float = 10.0) -> None:
        self.num_steps = _check_length("num_steps", num_steps)
        self.start = _check_finite("start", start)
        self.end = _check_finite("end", end)
        steepness = _check_finite("steepness", steepness)
        if steepness <= 0:
            raise ValueError(f"steepness must be > 0, got {steepness!r}")
        self.steepness = steepness

    def _logistic(self, t: float) -> float:
        return 1.0 / (1.0 + math.exp(-self.steepness * (t - 0.5)))

    def __call__(self, step: int) -> float:
        t = min(max(step / self.num_steps, 0.0), 1.0)
        lo, hi = self._logistic(0.0), self._logistic(1.0)
        s = (self._logistic(t) - lo) / (hi - lo)
        return self.start + s * (self.end - self.start)


class Tempering(Schedule):
    """
    Annealing from a high β down to 1 (tempering): the KL term starts overweighted, which
    keeps q close to the prior early on, and the objective becomes the ELBO after
    ``num_steps``. Geometric by default (equal ratios per step), or linear.

    :param int num_steps: length of the annealing, > 0.
    :param float start: initial β, >= ``end`` and > 0 (default 10).
    :param float end: final β (default 1).
    :param str kind: ``"geometric"`` or ``"linear"``.
    :raises ValueError: if ``num_steps`` is not a positive integer, not ``start >= end > 0``,
        or ``kind`` is unknown.

    >>> [round(Tempering(2, start=4.0)(step), 6) for step in (0, 1, 2)]
    [4.0, 2.0, 1.0]

    References

    [1] `Deterministic Annealing EM Algorithm`, Naonori Ueda, Ryohei Nakano (1998)
    """

    def __init__(self, num_steps: int, start: float = 10.0, end: float = 1.0, kind: str = "geometric") -> None:
        self.num_steps = _check_length("num_steps", num_steps)
        self.start = _check_finite("start", start)
        self.end = _check_finite("end", end)
        if self.end <= 0 or self.start < self.end:
            raise ValueError(
                f"Tempering anneals from a high β down: need start >= end > 0, got start={start!r}, end={end!r}"
            )
        if kind not in ("geometric", "linear"):
            raise ValueError(f"kind must be 'geometric' or 'linear', got {kind!r}")
        self.kind = kind

    def __call__(self, step: int) -> float:
        t = min(max(step / self.num_steps, 0.0), 1.0)
        if self.kind == "linear":
            return self.start + t * (self.end - self.start)
        return self.start * (self.end / self.start) ** t


ScheduleLike = float | int | Callable[[int], float]


def as_schedule(value: ScheduleLike, name: str = "value") -> Callable[[int], float]:
    """
    Turn a number into a :class:`Constant`; return callables unchanged.

    :param value: a float, or a callable ``step -> float``.
    :param str name: the argument's name, used in error messages.
    :raises ValueError: for a non-finite number or a non-callable non-number.
    """
    if callable(value):
        return value
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _is_scalar_tensor(value)):
        raise ValueError(f"{name} must be a number or a schedule (a callable step -> value), got {name}={value!r}")
    return Constant(_check_finite(name, value))


def _is_scalar_tensor(value: object) -> bool:
    numel = getattr(value, "numel", None)
    return type(value).__module__.startswith("torch") and callable(numel) and numel() == 1
