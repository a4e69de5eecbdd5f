# SPDX-License-Identifier: Apache-2.0
"""Schedules: exact values at chosen steps, argument validation, and use inside the losses."""

from __future__ import annotations

import math

import pytest

from pyro_elbo_lab import BetaELBO
from pyro_elbo_lab.schedules import Constant, Cyclical, LinearWarmup, Sigmoid, Tempering, as_schedule


def test_constant():
    assert [Constant(2.5)(t) for t in (0, 1, 10**6)] == [2.5, 2.5, 2.5]


def test_linear_warmup():
    s = LinearWarmup(10)
    assert [s(t) for t in (0, 1, 5, 10, 11, 1000)] == pytest.approx([0.0, 0.1, 0.5, 1.0, 1.0, 1.0])
    s = LinearWarmup(4, start=0.2, end=1.0, delay=3)
    assert [s(t) for t in (0, 3, 4, 5, 7, 8)] == pytest.approx([0.2, 0.2, 0.4, 0.6, 1.0, 1.0])
    s = LinearWarmup(2, start=5.0, end=1.0)  # ramps may go down
    assert [s(t) for t in (0, 1, 2)] == pytest.approx([5.0, 3.0, 1.0])


def test_cyclical_fu_et_al():
    # Fu et al. (2019): T = 16 steps, M = 4 cycles of 4 steps, R = 0.5: rise over 2 steps, hold 2
    s = Cyclical(16, num_cycles=4, ratio=0.5)
    assert [s(t) for t in range(17)] == pytest.approx([0, 0.5, 1, 1] * 4 + [1])
    # R = 1: a sawtooth; start/end rescale it
    s = Cyclical(9, num_cycles=3, ratio=1.0, start=0.1, end=0.4)
    assert [s(t) for t in range(10)] == pytest.approx([0.1, 0.2, 0.3] * 3 + [0.4])
    # periods that are not whole steps: T = 10, M = 3 → period 10/3, R = 0.5 → rise over 5/3
    s = Cyclical(10, num_cycles=3, ratio=0.5)
    assert s(0) == 0 and s(1) == pytest.approx(0.6) and s(2) == 1.0
    assert s(4) == pytest.approx((4 - 10 / 3) / (5 / 3))
    assert s(50) == 1.0


def test_sigmoid():
    s = Sigmoid(10, start=0.0, end=2.0, steepness=8.0)
    assert s(0) == 0.0 and s(10) == pytest.approx(2.0) and s(100) == pytest.approx(2.0)
    assert s(5) == pytest.approx(1.0)  # symmetric about the midpoint
    logistic = lambda t: 1 / (1 + math.exp(-8.0 * (t - 0.5)))  # noqa: E731
    expected = 2.0 * (logistic(0.3) - logistic(0.0)) / (logistic(1.0) - logistic(0.0))
    assert s(3) == pytest.approx(expected)
    values = [s(t) for t in range(11)]
    assert values == sorted(values)


def test_tempering():
    s = Tempering(10, start=100.0, end=1.0)
    assert [s(t) for t in (0, 5, 10, 20)] == pytest.approx([100.0, 10.0, 1.0, 1.0])
    s = Tempering(4, start=5.0, end=1.0, kind="linear")
    assert [s(t) for t in (0, 1, 2, 4, 9)] == pytest.approx([5.0, 4.0, 3.0, 1.0, 1.0])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LinearWarmup(0), "num_steps"),
        (lambda: LinearWarmup(-3), "num_steps"),
        (lambda: LinearWarmup(2.5), "num_steps"),
        (lambda: LinearWarmup(True), "num_steps"),
        (lambda: LinearWarmup(10, delay=-1), "delay"),
        (lambda: LinearWarmup(10, start=float("nan")), "start"),
        (lambda: LinearWarmup(10, end=float("inf")), "end"),
        (lambda: Cyclical(0), "num_steps"),
        (lambda: Cyclical(10, num_cycles=0), "num_cycles"),
        (lambda: Cyclical(10, num_cycles=-2), "num_cycles"),
        (lambda: Cyclical(10, num_cycles=20), r"num_cycles=20 .*num_steps=10"),
        (lambda: Cyclical(10, num_cycles=11), r"num_cycles=11 .*num_steps=10"),
        (lambda: Cyclical(10, ratio=0.0), "ratio"),
        (lambda: Cyclical(10, ratio=1.5), "ratio"),
        (lambda: Sigmoid(0), "num_steps"),
        (lambda: Sigmoid(10, steepness=0.0), "steepness"),
        (lambda: Tempering(0), "num_steps"),
        (lambda: Tempering(10, start=1.0, end=5.0), "start >= end > 0"),
        (lambda: Tempering(10, start=1.0, end=0.0), "start >= end > 0"),
        (lambda: Tempering(10, kind="cosine"), "kind"),
        (lambda: Constant(float("nan")), "value"),
        (lambda: as_schedule("1", "beta"), "beta"),
        (lambda: as_schedule(True, "beta"), "beta"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_invalid_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_as_schedule_and_repr():
    assert as_schedule(2.0) == Constant(2.0)
    s = LinearWarmup(10, end=2.0)
    assert as_schedule(s) is s
    assert repr(s) == "LinearWarmup(num_steps=10, start=0.0, end=2.0, delay=0)"
    assert s == LinearWarmup(10, end=2.0) and s != LinearWarmup(10) and hash(s) == hash(LinearWarmup(10, end=2.0))


@pytest.mark.parametrize(
    "schedule",
    [LinearWarmup(10), Cyclical(12, num_cycles=3), Sigmoid(10), Tempering(10), lambda step: 0.5 + 0.1 * step],
    ids=["warmup", "cyclical", "sigmoid", "tempering", "callable"],
)
def test_loss_follows_schedule(schedule):
    loss_fn = BetaELBO(beta=schedule)
    for step in (0, 3, 7, 12, 40):
        loss_fn.load_state_dict({"step": step})
        assert loss_fn.current_beta() == pytest.approx(schedule(step))
        assert loss_fn.current_beta(step + 1) == pytest.approx(schedule(step + 1))


def test_cyclical_one_step_cycles_still_move():
    # num_cycles == num_steps is the shortest accepted period (one step): with ratio 1 each
    # cycle is a single step at ``start``; the last step reaches ``end`` (hand computation).
    s = Cyclical(4, num_cycles=4, ratio=1.0, start=0.0, end=1.0)
    assert [s(step) for step in range(5)] == [0.0, 0.0, 0.0, 0.0, 1.0]
