# SPDX-License-Identifier: Apache-2.0
"""
Mean-field coordinate ascent (CAVI) with closed-form updates, next to SVI with
BetaMeanFieldELBO, for a Normal model with unknown mean and precision, on the sepal
lengths (cm) of the 50 setosa irises.

    tau ~ Gamma(a0, b0),   mu | tau ~ N(mu0, 1 / (lambda0 tau)),   x_n ~ N(mu, 1 / tau)

The posterior is Normal-Gamma, so the evidence log p(x) is exact. The mean-field family
q(mu) q(tau) cannot carry the posterior's dependence between mu and tau, so the best
mean-field ELBO stays strictly below log p(x); the gap is KL(q || p(mu, tau | x)).

CAVI (Bishop 2006, section 10.1.3): q(z_j) is proportional to exp E_{-j}[log p(x, z)], i.e.

    q(mu)  = N(mu_N, 1 / lambda_N),  mu_N = (lambda0 mu0 + N xbar) / (lambda0 + N),
                                     lambda_N = (lambda0 + N) E[tau]
    q(tau) = Gamma(a_N, b_N),        a_N = a0 + (N + 1) / 2,
                                     b_N = b0 + E_mu[sum_n (x_n - mu)^2 + lambda0 (mu - mu0)^2] / 2

SVI maximises the same ELBO by stochastic gradients (analytic KL for each site) and should
reach the same optimum.

    python examples/cavi_mean_field.py [--quick] [--seed N] [--steps N]
"""

from __future__ import annotations

import math

import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from pyro_elbo_lab import BetaMeanFieldELBO
from pyro_elbo_lab.datasets import load_iris
from pyro_elbo_lab.demos.common import Report, example_parser, seed_everything

# a weakly informative prior on the cm scale: mu near 5 cm, sd of the data around 0.7 cm
MU0, LAMBDA0, A0, B0 = 5.0, 1.0, 2.0, 1.0


def load_data() -> torch.Tensor:
    """Sepal length (cm) of the 50 setosa irises."""
    iris = load_iris()
    return iris.data[iris.target == 0, 0].contiguous()


def model(x, q=None):
    tau = pyro.sample("tau", dist.Gamma(A0, B0))
    mu = pyro.sample("mu", dist.Normal(MU0, (LAMBDA0 * tau).rsqrt()))
    with pyro.plate("data", x.shape[0], dim=-1):
        pyro.sample("x", dist.Normal(mu, tau.rsqrt()), obs=x)


def guide(x, q=None):
    """Mean-field q(mu) q(tau); learnable parameters, or fixed ones passed as ``q``."""
    if q is None:
        q = {
            "mu_loc": pyro.param("mu_loc", torch.tensor(MU0)),
            "mu_scale": pyro.param("mu_scale", torch.tensor(1.0), constraint=constraints.positive),
            "tau_concentration": pyro.param("tau_concentration", torch.tensor(A0), constraint=constraints.positive),
            "tau_rate": pyro.param("tau_rate", torch.tensor(B0), constraint=constraints.positive),
        }
    pyro.sample("tau", dist.Gamma(q["tau_concentration"], q["tau_rate"]))
    pyro.sample("mu", dist.Normal(q["mu_loc"], q["mu_scale"]))


# ----------------------------------------------------------------------------------------
# closed forms, independent of pyro-elbo-lab
# ----------------------------------------------------------------------------------------


def exact_log_evidence(x) -> float:
    """log p(x) under the Normal-Gamma prior, in nats."""
    x = x.tolist()
    N = len(x)
    xbar = sum(x) / N
    ss = sum((v - xbar) ** 2 for v in x)
    lam_n = LAMBDA0 + N
    a_n = A0 + N / 2
    b_n = B0 + 0.5 * ss + LAMBDA0 * N * (xbar - MU0) ** 2 / (2 * lam_n)
    return (
        math.lgamma(a_n)
        - math.lgamma(A0)
        + A0 * math.log(B0)
        - a_n * math.log(b_n)
        + 0.5 * math.log(LAMBDA0 / lam_n)
        - 0.5 * N * math.log(2 * math.pi)
    )


def _digamma(a: float) -> float:
    return torch.special.digamma(torch.tensor(a, dtype=torch.float64)).item()


def mean_field_elbo(x, q: dict) -> float:
    """The ELBO of q(mu) = N(mu_loc, mu_scale^2), q(tau) = Gamma(a, b), in closed form."""
    x = x.tolist()
    N = len(x)
    m, var = q["mu_loc"], q["mu_scale"] ** 2
    a, b = q["tau_concentration"], q["tau_rate"]
    e_tau, e_log_tau = a / b, _digamma(a) - math.log(b)
    e_sq = sum((v - m) ** 2 for v in x) + N * var  # E_mu sum_n (x_n - mu)^2
    log_lik = -0.5 * N * math.log(2 * math.pi) + 0.5 * N * e_log_tau - 0.5 * e_tau * e_sq
    log_p_mu = (
        -0.5 * math.log(2 * math.pi)
        + 0.5 * math.log(LAMBDA0)
        + 0.5 * e_log_tau
        - 0.5 * LAMBDA0 * e_tau * ((m - MU0) ** 2 + var)
    )
    log_p_tau = A0 * math.log(B0) - math.lgamma(A0) + (A0 - 1) * e_log_tau - B0 * e_tau
    h_mu = 0.5 * math.log(2 * math.pi * math.e * var)
    h_tau = a - math.log(b) + math.lgamma(a) + (1 - a) * _digamma(a)
    return log_lik + log_p_mu + log_p_tau + h_mu + h_tau


def cavi(x, num_iterations: int, tol: float = 1e-14):
    """
    Coordinate ascent until b_N stops moving (relative change <= ``tol``) or
    ``num_iterations`` sweeps; q(tau) starts at rate b0 (the prior's).

    :returns: ``(q, trace, converged)``: the final q, the closed-form ELBO (nats) after each
        sweep, and whether b_N stopped moving within ``num_iterations`` sweeps.
    :raises ValueError: if ``num_iterations`` < 1.
    """
    if num_iterations < 1:
        raise ValueError(f"cavi: num_iterations must be >= 1 (one sweep at least), got {num_iterations}")
    xs = x.tolist()
    N = len(xs)
    xbar = sum(xs) / N
    mu_n = (LAMBDA0 * MU0 + N * xbar) / (LAMBDA0 + N)
    a_n = A0 + (N + 1) / 2
    b_n = B0  # start q(tau) at the prior's rate
    trace, converged = [], False
    for _ in range(num_iterations):
        lam_n = (LAMBDA0 + N) * a_n / b_n  # update q(mu) given E[tau]
        e_sq = sum((v - mu_n) ** 2 for v in xs) + N / lam_n + LAMBDA0 * ((mu_n - MU0) ** 2 + 1 / lam_n)
        previous_b_n, b_n = b_n, B0 + 0.5 * e_sq  # update q(tau) given the moments of mu
        q = {"mu_loc": mu_n, "mu_scale": lam_n**-0.5, "tau_concentration": a_n, "tau_rate": b_n}
        trace.append(mean_field_elbo(x, q))
        if abs(b_n - previous_b_n) <= tol * b_n:
            converged = True
            break
    return q, trace, converged


#: ELBO decreases smaller than this (relative) count as float64 round-off
ROUND_OFF = 1e-12


def sweep_summary(trace: list, converged: bool) -> str:
    """What the CAVI sweeps did, in words, from the numbers."""
    sweeps = f"{len(trace)} sweep" + ("s" if len(trace) != 1 else "")
    text = f"converged after {sweeps}" if converged else f"NOT converged after {sweeps} (b_N still moving)"
    changes = [b - a for a, b in zip(trace, trace[1:])]
    if not changes:
        return text + "."
    drops = [-c for c in changes if c < -ROUND_OFF * max(1.0, abs(trace[0]))]
    if not drops:
        return text + "; no sweep lowered the ELBO (beyond round-off), as coordinate ascent guarantees."
    return text + (
        f"; {len(drops)} of {len(changes)} sweeps LOWERED the ELBO (largest drop {max(drops):.3g} nats), "
        "which exact coordinate ascent cannot do: an update is wrong."
    )


# ----------------------------------------------------------------------------------------
# SVI and the report
# ----------------------------------------------------------------------------------------


def fit_svi(x, num_steps: int, lr: float = 0.2) -> dict:
    optim = pyro.optim.ClippedAdam({"lr": lr, "lrd": 0.02 ** (1.0 / num_steps)})
    loss = BetaMeanFieldELBO(num_particles=32, vectorize_particles=True, max_plate_nesting=1)
    svi = pyro.infer.SVI(model, guide, optim, loss)
    for _ in range(num_steps):
        svi.step(x)
    store = pyro.get_param_store()
    return {k: store[k].item() for k in ("mu_loc", "mu_scale", "tau_concentration", "tau_rate")}


def main(quick: bool = False, seed: int = 0, steps: int | None = None, verbose: bool = True) -> dict:
    """
    CAVI, SVI and the exact evidence; returns ``{"log_evidence", "cavi_q", "cavi_trace",
    "cavi_converged", "cavi_elbo", "svi_q", "svi_elbo", "estimate"}`` (``estimate``: the
    :class:`~pyro_elbo_lab.ELBOTerms` of BetaMeanFieldELBO.decompose at the CAVI q).
    """
    seed_everything(seed)
    num_steps = steps or (1000 if quick else 3000)
    num_particles = 20000 if quick else 100000
    report = Report(verbose)
    x = load_data()
    log_evidence = exact_log_evidence(x)
    cavi_q, trace, converged = cavi(x, num_iterations=100)
    cavi_elbo = trace[-1]
    svi_q = fit_svi(x, num_steps)
    svi_elbo = mean_field_elbo(x, svi_q)
    estimate = BetaMeanFieldELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1).decompose(
        model, guide, x, q={k: torch.tensor(v) for k, v in cavi_q.items()}
    )

    report.heading("Mean-field CAVI and SVI for a Normal with unknown mean and precision", 1)
    report.text(
        f"Setosa sepal lengths: N = {x.shape[0]}, mean {x.mean().item():.3f} cm, sd {x.std().item():.3f} cm. "
        f"Prior mu0={MU0}, lambda0={LAMBDA0}, a0={A0}, b0={B0}."
    )
    report.heading("CAVI sweeps (closed-form ELBO, nats)")
    report.text("  ".join(f"{v:.8f}" for v in trace[:6]) + ("  ..." if len(trace) > 6 else ""))
    report.text(sweep_summary(trace, converged))

    report.heading("The two optima")
    frame = pd.DataFrame({"CAVI (closed form)": cavi_q, f"SVI, BetaMeanFieldELBO ({num_steps} steps)": svi_q}).T
    frame["ELBO (closed form)"] = [cavi_elbo, svi_elbo]
    frame["log p(x) (exact)"] = log_evidence
    frame["gap = log p(x) - ELBO"] = log_evidence - frame["ELBO (closed form)"]
    frame.index.name = "method"
    report.table(frame, "{:.5f}")
    report.text(
        f"pyro-elbo-lab's decomposition of the CAVI q ({num_particles} particles): ELBO {estimate.elbo:.5f} "
        f"± {estimate.stderr.get('elbo', 0.0):.5f} (closed form {cavi_elbo:.5f}); reconstruction "
        f"{estimate.reconstruction:.4f}, KL {estimate.kl:.4f}, entropy {estimate.entropy:.4f}."
    )
    report.text(
        f"CAVI stops {log_evidence - cavi_elbo:.4f} nats and SVI {log_evidence - svi_elbo:.4f} nats below the exact "
        "evidence: the mean-field family cannot represent the posterior coupling of mu and tau (the posterior sd "
        "of mu scales with 1/sqrt(tau)), so no q(mu) q(tau) reaches log p(x)."
    )
    return {
        "log_evidence": log_evidence,
        "cavi_q": cavi_q,
        "cavi_trace": trace,
        "cavi_converged": converged,
        "cavi_elbo": cavi_elbo,
        "svi_q": svi_q,
        "svi_elbo": svi_elbo,
        "estimate": estimate,
    }


if __name__ == "__main__":
    args = example_parser(__doc__.strip().splitlines()[0], default_steps=3000).parse_args()
    main(quick=args.quick, seed=args.seed, steps=args.steps)
