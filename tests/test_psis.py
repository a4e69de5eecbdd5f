# SPDX-License-Identifier: Apache-2.0
"""diagnostics.psis and arviz_compat.psislw on either ArviZ generation: what PSIS keeps, the
25-draw floor, constant rows, the importance statistics against numpy by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_elbo_lab import arviz_compat
from pyro_elbo_lab.diagnostics import psis


def test_psis_keeps_the_body_and_the_scale():
    # PSIS (Vehtari et al. 2024) replaces only the M = ceil(min(S/5, 3 sqrt(S))) largest weights;
    # the others are the raw ones, so the unnormalised smoothed weights keep the raw scale
    S = 1000
    lw = torch.randn(2, S, generator=torch.Generator().manual_seed(1)) * 1.5 + 40.0
    smoothed, k = psis.psis_diagnostics(lw)
    M = math.ceil(min(S / 5, 3 * math.sqrt(S)))
    for row in range(2):
        order = torch.argsort(lw[row])
        body, tail = order[: S - M - 1], order[S - M :]
        assert torch.allclose(smoothed[row, body], lw[row, body], rtol=0, atol=1e-9)
        # the smoothed tail stays between the body and the largest raw weight (truncation)
        assert (smoothed[row, tail] >= lw[row, order[S - M - 1]] - 1e-9).all()
        assert (smoothed[row, tail] <= lw[row].max() + 1e-9).all()
    # log-normal weights with sd 1.5: k̂ of a log-normal tail is positive and below 0.7 here
    assert ((k > 0) & (k < 0.7)).all()


def test_constant_rows_and_too_few_draws():
    lw = torch.stack([torch.full((30,), -3.0), torch.linspace(0.0, 2.0, 30)])
    smoothed, k = psis.psis_diagnostics(lw)
    assert k[0] == -math.inf and math.isfinite(float(k[1]))
    assert torch.equal(smoothed[0], lw[0])
    # below 25 draws: no fit, raw weights back, k̂ NaN (or -inf for a constant row)
    few = lw[:, :24]
    smoothed, k = psis.psis_diagnostics(few)
    assert k[0] == -math.inf and math.isnan(float(k[1]))
    assert torch.equal(smoothed, few)
    assert [psis.verdict(v) for v in (-math.inf, math.nan)] == ["IS reliable", "IS unchecked"]  # were good, unknown
    # the ArviZ call itself says what is wrong, on both generations
    with pytest.raises(ValueError, match=r"PSIS needs at least 25 draws along axis -1.*got 24"):
        arviz_compat.psislw(np.linspace(0.0, 1.0, 24))
    normalised, k = arviz_compat.psislw(np.linspace(0.0, 1.0, 25))
    assert np.exp(normalised).sum() == pytest.approx(1.0, abs=1e-12)


def test_importance_stats_by_hand():
    rng = np.random.default_rng(3)
    lw = rng.normal(size=(3, 500)) - 700.0  # far below exp's range: the code must shift
    log_mean, stderr, ess = psis.importance_stats(torch.as_tensor(lw))
    w = np.exp(lw + 700.0)  # the same weights times e^700, by hand
    expected_log_mean = np.log(w.mean(-1)) - 700.0
    expected_se = w.std(-1, ddof=1) / (math.sqrt(500) * w.mean(-1))
    wn = w / w.sum(-1, keepdims=True)
    assert np.allclose(log_mean.numpy(), expected_log_mean, rtol=0, atol=1e-10)
    assert np.allclose(stderr.numpy(), expected_se, rtol=1e-10)
    assert np.allclose(ess.numpy(), 1.0 / (wn**2).sum(-1), rtol=1e-10)


def test_a_tail_of_ties_cannot_be_fitted_on_either_generation():
    # the 20% largest weights identical: no distinct tail values to fit a Pareto shape to
    # (ArviZ 0.2x said +inf, 1.x NaN): NaN, "IS unchecked", weights still normalised
    lw = np.concatenate([np.linspace(-2.0, 0.0, 800), np.full(200, 3.0)])
    normalised, k = arviz_compat.psislw(lw)
    assert math.isnan(float(k)) and psis.verdict(k) == "IS unchecked"  # was "unknown"
    assert np.exp(normalised).sum() == pytest.approx(1.0, abs=1e-12)


def test_a_tail_of_ties_is_a_bounded_tail():
    # issue 11 §4: weights that take a few values (a discrete guide's) have a tail of ties; PSIS
    # cannot fit a Pareto shape to it (arviz_compat.psislw says NaN, above), but the weights are
    # bounded, so every moment is finite: k̂ = -inf and "IS reliable", nothing smoothed
    lw = torch.as_tensor(np.concatenate([np.linspace(-2.0, 0.0, 800), np.full(200, 3.0)]))
    smoothed, k = psis.psis_diagnostics(lw)
    assert float(k) == -math.inf and psis.verdict(float(k)) == "IS reliable"
    assert torch.allclose(smoothed, lw, rtol=0, atol=1e-9)


def test_float32_rounding_of_an_exact_guide_is_constant():
    # issue 11 §4: an exact guide's log weights are log p(x) for every draw; in float32 they differ
    # by rounding (~1e-6 nats here), which must not be read as a tail (it gave k̂ = inf, then NaN)
    exact = -31.311
    lw = torch.full((4000,), exact, dtype=torch.float32)
    lw = lw + torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 2e-6
    assert float(lw.max() - lw.min()) > psis.CONSTANT_TOL  # not constant in float64 terms
    _, k = psis.psis_diagnostics(lw)
    assert float(k) == -math.inf and psis.verdict(float(k)) == "IS reliable"
    # the same spread in float64 is not rounding: it is fitted
    lw64 = exact + torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2e-6
    _, k64 = psis.psis_diagnostics(lw64)
    assert math.isfinite(float(k64))


def test_float32_heavy_tail_at_a_large_log_evidence_is_fitted():
    # a black-box test's finding: the rounding tolerance, 1000 epsilons times |log w|, was 4.4 nats
    # at |log w| ≈ 36 700 (a conjugate model with 20 000 points in float32), so a heavy tail (a
    # guide with 0.6 times the posterior sd, k = 1 - 0.6² = 0.64) was called flat: k̂ = -inf,
    # "IS reliable". ArviZ's k̂ of the same weights is the reference.
    z = torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.6
    normal = torch.distributions.Normal
    lw64 = -36700.0 + normal(0.0, 1.0).log_prob(z) - normal(0.0, 0.6).log_prob(z)
    lw = lw64.to(torch.float32)
    _, k = psis.psis_diagnostics(lw)
    _, expected = arviz_compat.psislw(lw.double().numpy())  # ArviZ's fit of the same weights
    assert float(k) == pytest.approx(float(expected), abs=1e-6)
    assert 0.4 < float(k) < 0.9


def test_importance_diagnostics_keep_the_dtype_of_the_weights():
    # a review's finding: summarize's table (importance_diagnostics of the stored log weights) cast
    # them to float64, so an exact float32 guide's rounding was fitted as a tail
    exact = -31.311
    lw = torch.full((4000,), exact, dtype=torch.float32)
    lw = lw + torch.randn(4000, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 2e-6
    diag = psis.importance_diagnostics(lw.numpy())
    assert diag["pareto_k"] == -math.inf
    assert diag["log_evidence"] == pytest.approx(exact, abs=1e-4)


def test_each_reason_k_is_not_fitted():
    # rows whose truth is known: a constant row, a flat tail (20% of the weights tied at the top), one
    # weight e^50 times all others (a tail of two values, not flat: k̂ cannot be fitted and must not be
    # called bounded: it was -inf, "IS reliable", with ESS 1), a nan, a +inf, every weight zero, and a
    # row with some zero weights (-inf), which is fitted like the same row without them
    rng = np.random.default_rng(5)
    body = rng.normal(size=1000)
    rows = {
        psis.K_CONSTANT: np.full(1000, -4.0),
        psis.K_FLAT_TAIL: np.concatenate([np.linspace(-2.0, 0.0, 800), np.full(200, 3.0)]),
        psis.K_TIED_TAIL: np.concatenate([np.zeros(999), [50.0]]),
        psis.K_NON_FINITE: np.concatenate([body[:-1], [np.nan]]),
        "+inf": np.concatenate([body[:-1], [np.inf]]),
        psis.K_NO_WEIGHT: np.full(1000, -np.inf),
        "": np.concatenate([np.full(10, -np.inf), body[10:]]),
    }
    lw = torch.as_tensor(np.stack(list(rows.values())))
    fit = psis.psis_fit(lw)
    expected = [r if r != "+inf" else psis.K_NON_FINITE for r in rows]
    assert list(fit.reasons) == expected
    k = fit.k.numpy()
    assert k[0] == -np.inf and k[1] == -np.inf
    assert np.isnan(k[2:6]).all() and [psis.verdict(v) for v in k[2:6]] == ["IS unchecked"] * 4
    # unfitted rows come back raw
    assert torch.equal(fit.smoothed[:6].nan_to_num(), lw[:6].nan_to_num())
    # the row with zero weights: its k̂ is that of its finite weights alone (zeros are not in the tail)
    _, k_finite = arviz_compat.psislw(body[10:])
    assert k[6] == pytest.approx(float(k_finite), abs=1e-9)
    assert torch.isneginf(fit.smoothed[6, :10]).all()
    # too few draws: said per row; a constant row stays constant
    few = psis.psis_fit(lw[:3, :24])  # rows 0 and 2 are constant in their first 24 draws
    assert list(few.reasons) == [psis.K_CONSTANT, psis.K_TOO_FEW_DRAWS, psis.K_CONSTANT]
    assert "25" in psis.explain_k(psis.K_TOO_FEW_DRAWS)
    with pytest.raises(ValueError, match=r"reason must be one of .*got reason='nope'"):
        psis.explain_k("nope")


@pytest.mark.parametrize("n", [4, 5, 6, 10, 20, 94])
def test_a_few_tied_rare_weights_are_unchecked_on_either_generation(n):
    # n of 1000 log weights at 8.0, the others 0: the M = 95 largest hold two values and are not flat.
    # ArviZ 0.2x fitted a negative k̂ to 5 or more ties ("IS reliable" with ESS ~ n), 1.x refused them:
    # now NaN, "IS unchecked", the raw weights back, on both generations
    lw = np.zeros(1000)
    lw[:n] = 8.0
    fit = psis.psis_fit(torch.as_tensor(lw))
    assert math.isnan(float(fit.k)) and str(fit.reasons) == psis.K_TIED_TAIL
    assert psis.verdict(float(fit.k), 1000) == "IS unchecked"
    assert torch.equal(fit.smoothed, torch.as_tensor(lw))
    # the ESS reported with it, by hand: (sum w)^2 / sum w^2 with n weights e^8 and 1000 - n weights 1
    ess = (n * math.exp(8.0) + 1000 - n) ** 2 / (n * math.exp(16.0) + 1000 - n)
    assert psis.importance_diagnostics(lw)["ess"] == pytest.approx(ess, rel=1e-12)
    assert ess < 1.2 * n  # the few rare draws carry the estimate


@pytest.mark.parametrize("n", [95, 150])
def test_a_flat_tail_of_ties_stays_bounded(n):
    # n >= M = 95 weights tied at the top: the tail is flat, the weights bounded: k̂ = -inf
    lw = np.zeros(1000)
    lw[:n] = 8.0
    fit = psis.psis_fit(torch.as_tensor(lw))
    assert float(fit.k) == -math.inf and str(fit.reasons) == psis.K_FLAT_TAIL


def test_too_few_draws_counts_finite_log_weights():
    # 95 of 100 log weights -inf (zero weights): 5 draws to fit, not 100 (ArviZ 0.2x fitted k̂ = 0.70)
    lw = np.full(100, -np.inf)
    lw[:5] = [0.1, 0.5, 1.0, 2.0, 3.0]
    fit = psis.psis_fit(torch.as_tensor(lw))
    assert math.isnan(float(fit.k)) and str(fit.reasons) == psis.K_TOO_FEW_DRAWS
    assert torch.equal(fit.smoothed, torch.as_tensor(lw))  # raw weights back
    # the evidence from the raw weights, by hand: log(sum e^lw / 100)
    expected = math.log(sum(math.exp(v) for v in (0.1, 0.5, 1.0, 2.0, 3.0)) / 100)
    assert psis.importance_diagnostics(lw)["log_evidence"] == pytest.approx(expected, abs=1e-12)
    # 24 finite draws of 1000: too few; 25 continuous finite draws among 30: fitted
    rng = np.random.default_rng(7)
    rows = np.full((2, 1000), -np.inf)
    rows[0, :24] = rng.normal(size=24)
    rows[1, :975] = rng.normal(size=975)
    fit = psis.psis_fit(torch.as_tensor(rows))
    assert list(fit.reasons) == [psis.K_TOO_FEW_DRAWS, ""]
    assert "fewer than 25 draws with a nonzero weight" in psis.explain_k(psis.K_TOO_FEW_DRAWS)
