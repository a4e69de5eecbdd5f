# SPDX-License-Identifier: Apache-2.0
"""
The Pyro translations of the posteriordb posteriors (benchmarks/posteriors.py) against
hand-written scipy log densities of the Stan models, read from the raw data, at reference
draws; and the reference draws against the raw JSON.
"""

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyro.poutine as poutine
import pytest
import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import posteriors

ROOT = posteriors.posteriordb_dir()
pytestmark = pytest.mark.skipif(not ROOT.is_dir(), reason=f"posteriordb folder {ROOT} not found (set POSTERIORDB)")
DRAWS = [0, 1234, 4321, 7777, 9999]


def raw(name, what):
    with zipfile.ZipFile(ROOT / name / f"{what}.json.zip") as z:
        return json.loads(z.read(z.namelist()[0]))


def stan_eight_schools(d, p):
    theta = p["theta_trans"] * p["tau"] + p["mu"]
    return (
        stats.norm.logpdf(p["theta_trans"], 0, 1).sum()
        + stats.norm.logpdf(d["y"], theta, d["sigma"]).sum()
        + stats.norm.logpdf(p["mu"], 0, 5)
        + stats.cauchy.logpdf(p["tau"], 0, 5)
    )


def stan_kidiq(d, p):
    b = p["beta"]
    return (
        stats.cauchy.logpdf(p["sigma"], 0, 2.5)
        + stats.norm.logpdf(d["kid_score"], b[0] + b[1] * np.asarray(d["mom_iq"]), p["sigma"]).sum()
    )


def stan_mesquite(d, p):
    b = p["beta"]
    mean = (
        b[0]
        + b[1] * np.log(d["diam1"])
        + b[2] * np.log(d["diam2"])
        + b[3] * np.log(d["canopy_height"])
        + b[4] * np.log(d["total_height"])
        + b[5] * np.log(d["density"])
        + b[6] * np.asarray(d["group"])
    )
    return stats.norm.logpdf(np.log(d["weight"]), mean, p["sigma"]).sum()


def stan_ark(d, p):
    y, K, T = d["y"], d["K"], d["T"]
    lp = stats.norm.logpdf(p["alpha"], 0, 10) + stats.norm.logpdf(p["beta"], 0, 10).sum()
    lp += stats.cauchy.logpdf(p["sigma"], 0, 2.5)
    for t in range(K + 1, T + 1):  # Stan's 1-based loop
        mu = p["alpha"] + sum(p["beta"][k - 1] * y[t - k - 1] for k in range(1, K + 1))
        lp += stats.norm.logpdf(y[t - 1], mu, p["sigma"])
    return lp


def stan_gauss_mix(d, p):
    mu, s, th = p["mu"], p["sigma"], p["theta"]
    assert mu[0] < mu[1]
    y = np.asarray(d["y"])
    lp = stats.norm.logpdf(s, 0, 2).sum() + stats.norm.logpdf(mu, 0, 2).sum() + stats.beta.logpdf(th, 5, 5)
    return (
        lp
        + np.logaddexp(
            np.log(th) + stats.norm.logpdf(y, mu[0], s[0]), np.log1p(-th) + stats.norm.logpdf(y, mu[1], s[1])
        ).sum()
    )


STAN = {
    "eight_schools-eight_schools_noncentered": stan_eight_schools,
    "kidiq-kidscore_momiq": stan_kidiq,
    "mesquite-logmesquite": stan_mesquite,
    "arK-arK": stan_ark,
    "low_dim_gauss_mix-low_dim_gauss_mix": stan_gauss_mix,
}

# the parameters blocks of the Stan models
SHAPES = {
    "eight_schools-eight_schools_noncentered": {"theta_trans": (8,), "mu": (), "tau": ()},
    "kidiq-kidscore_momiq": {"beta": (2,), "sigma": ()},
    "mesquite-logmesquite": {"beta": (7,), "sigma": ()},
    "arK-arK": {"alpha": (), "beta": (5,), "sigma": ()},
    "low_dim_gauss_mix-low_dim_gauss_mix": {"mu": (2,), "sigma": (2,), "theta": ()},
}


@pytest.mark.parametrize("name", sorted(STAN), ids=lambda n: n.split("-")[0])
def test_log_density_matches_stan(name):
    post = posteriors.load_posterior(name)
    data = raw(name, "data")
    ours, theirs = [], []
    for i in DRAWS:
        point = {site: post.reference[site][i] for site in post.latent_sites}
        cond = {site: torch.as_tensor(v) for site, v in point.items()}
        trace = poutine.trace(poutine.condition(post.model, data=cond)).get_trace(*post.args)
        ours.append(trace.log_prob_sum().item())
        theirs.append(STAN[name](data, point))
    ours, theirs = np.array(ours), np.array(theirs)
    # equal up to one constant (normalising constants Stan drops): compare differences
    assert np.ptp(theirs) > 0.1  # the draws differ enough for the comparison to mean something
    np.testing.assert_allclose(ours - ours[0], theirs - theirs[0], atol=1e-8, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(STAN), ids=lambda n: n.split("-")[0])
def test_reference_draws_load_with_shapes_and_values(name):
    post = posteriors.load_posterior(name)
    chains = raw(name, "reference_draws")
    n_chains, n_draws = len(chains), len(chains[0][next(iter(chains[0]))])
    assert n_chains * n_draws == 10000
    for stan_name, values in chains[0].items():
        site, _, idx = stan_name.partition("[")
        index = tuple(int(i) - 1 for i in idx.rstrip("]").split(",")) if idx else ()
        arr = post.reference[site]
        assert arr.shape[0] == 10000
        assert arr[(slice(0, n_draws),) + index].tolist() == values
        last = chains[-1][stan_name]
        assert arr[(slice(10000 - n_draws, 10000),) + index].tolist() == last
    assert {site: post.reference[site].shape[1:] for site in post.latent_sites} == SHAPES[name]


def test_eight_schools_theta_trans_is_derived():
    post = posteriors.load_posterior("eight_schools-eight_schools_noncentered")
    r = post.reference
    np.testing.assert_allclose(r["theta_trans"] * r["tau"][:, None] + r["mu"][:, None], r["theta"], rtol=1e-12)
    assert r["theta_trans"].shape == (10000, 8)


def test_ordered_normal_is_normalised():
    d = posteriors.OrderedNormal(torch.tensor(0.3), torch.tensor(1.7), 2, validate_args=False)
    grid = torch.linspace(-10, 10, 801)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    x = torch.stack([a, b], -1)
    inside = a < b
    f = d.log_prob(x).exp()
    dens = torch.where(inside, f, torch.where(a == b, f / 2, 0.0))  # trapezoid on the diagonal
    h = (grid[1] - grid[0]).item()
    assert abs(dens.sum().item() * h * h - 1.0) < 1e-3
    draws = posteriors.OrderedNormal(torch.tensor(0.3), torch.tensor(1.7), 2).sample((1000,))
    assert bool((draws[:, 0] < draws[:, 1]).all())
