# SPDX-License-Identifier: Apache-2.0
"""
Pyro translations of the five posteriordb posteriors in ``../shared/posteriordb`` (Magnusson et
al. 2024, BSD-3-Clause), with loaders of their data and reference draws.

Each model keeps the Stan model's priors, constraints and parameter names; Stan's ``beta[1]``
is element 0 of the Pyro site ``beta``. Differences from Stan, all constants in the log
density (the posterior is the same):

- Stan's ``~`` drops normalising constants; Pyro's ``log_prob`` keeps them.
- A half-distribution on a ``<lower=0>`` parameter (``sigma ~ cauchy(0, 2.5)``) is
  ``HalfCauchy(2.5)``, normalised (Stan's is not: a factor of 2).
- A parameter with no prior statement has a flat improper prior: ``ImproperUniform`` on
  its support (``sample`` is not defined; initialise such sites with ``init_to_feasible``).
- ``ordered[2] mu; mu ~ normal(0, 2)`` is :class:`OrderedNormal`: iid normals restricted to
  the increasing vectors, normalised (Stan's is not: a factor of ``K!``).
- eight schools: ``theta`` (a Stan transformed parameter) is a ``pyro.deterministic`` site;
  the reference draws of ``theta_trans`` are derived as ``(theta - mu) / tau``.

``POSTERIORDB`` (environment variable) overrides the folder.

References

- *posteriordb: Testing, Benchmarking and Developing Bayesian Inference Algorithms*,
  M. Magnusson, J. Torgander, P.-C. Bürkner, L. Zhang, B. Carpenter, A. Vehtari (2024)
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

__all__ = ["POSTERIORS", "OrderedNormal", "Posterior", "load_posterior", "posteriordb_dir"]


def posteriordb_dir() -> Path:
    """The posteriordb folder: ``$POSTERIORDB`` or ``<repository>/../shared/posteriordb``."""
    env = os.environ.get("POSTERIORDB")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "posteriordb"


class OrderedNormal(dist.TorchDistribution):
    """
    iid ``Normal(loc, scale)`` of size ``K`` restricted to increasing vectors (Stan's
    ``ordered[K] x; x ~ normal(loc, scale)``), normalised: density
    :math:`K! \\prod_k \\mathcal N(x_k; \\mu, \\sigma)` on :math:`x_1 < \\dots < x_K`.
    Sampling sorts iid normal draws.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = constraints.ordered_vector

    def __init__(self, loc, scale, size: int, validate_args=None):
        self.loc, self.scale = torch.as_tensor(loc), torch.as_tensor(scale)
        self.size = size
        batch_shape = torch.broadcast_shapes(self.loc.shape, self.scale.shape)
        super().__init__(batch_shape, torch.Size([size]), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return OrderedNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape), self.size)

    def sample(self, sample_shape: tuple[int, ...] = ()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        with torch.no_grad():
            z = torch.randn(shape, dtype=self.loc.dtype) * self.scale.unsqueeze(-1) + self.loc.unsqueeze(-1)
            return z.sort(-1).values

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        lp = dist.Normal(self.loc.unsqueeze(-1), self.scale.unsqueeze(-1)).log_prob(value).sum(-1)
        return lp + math.lgamma(self.size + 1)


def _t(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x, dtype=np.float64), dtype=torch.get_default_dtype())


def _improper(support, shape=()) -> dist.ImproperUniform:
    event = torch.Size(shape)
    if len(event):
        support = constraints.independent(support, len(event))
    return dist.ImproperUniform(support, torch.Size(), event)


# -- the models -----------------------------------------------------------------------------------


def eight_schools_noncentered(J, y, sigma):
    theta_trans = pyro.sample("theta_trans", dist.Normal(torch.zeros(J), 1.0).to_event(1))
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    theta = pyro.deterministic("theta", theta_trans * tau.unsqueeze(-1) + mu.unsqueeze(-1), event_dim=1)
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def kidscore_momiq(kid_score, mom_iq):
    beta = pyro.sample("beta", _improper(constraints.real, (2,)))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    mean = beta[..., :1] + beta[..., 1:] * mom_iq
    pyro.sample("kid_score", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=kid_score)


def logmesquite(X, log_weight):
    """``X``: (N, 7) with a column of ones first (the Stan linear predictor's terms)."""
    beta = pyro.sample("beta", _improper(constraints.real, (X.shape[1],)))
    sigma = pyro.sample("sigma", _improper(constraints.positive))
    mean = (beta.unsqueeze(-2) * X).sum(-1)
    pyro.sample("log_weight", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=log_weight)


def ark(lags, y):
    """``lags``: (T - K, K), ``lags[i, k] = y[K + i - k - 1]``; ``y``: the T - K modelled points."""
    K = lags.shape[1]
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(K), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    mean = alpha.unsqueeze(-1) + (beta.unsqueeze(-2) * lags).sum(-1)
    pyro.sample("y", dist.Normal(mean, sigma.unsqueeze(-1)).to_event(1), obs=y)


def low_dim_gauss_mix(y):
    mu = pyro.sample("mu", OrderedNormal(0.0, 2.0, 2))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(5.0, 5.0))
    probs = torch.stack([theta, 1 - theta], -1).unsqueeze(-2)  # (..., 1, 2): one mixture for every y
    components = dist.Normal(mu.unsqueeze(-2), sigma.unsqueeze(-2))
    mix = dist.MixtureSameFamily(dist.Categorical(probs=probs), components)
    pyro.sample("y", mix.expand(mix.batch_shape[:-1] + y.shape[-1:]).to_event(1), obs=y)


# -- data and reference draws -------------------------------------------------------------------


def _read_zip_json(path: Path):
    with zipfile.ZipFile(path) as z:
        (name,) = z.namelist()
        return json.loads(z.read(name))


def _eight_schools_args(d):
    return (d["J"], _t(d["y"]), _t(d["sigma"]))


def _kidiq_args(d):
    return (_t(d["kid_score"]), _t(d["mom_iq"]))


def _mesquite_args(d):
    cols = (
        [np.ones(d["N"])]
        + [np.log(d[c]) for c in ("diam1", "diam2", "canopy_height", "total_height", "density")]
        + [np.asarray(d["group"], dtype=float)]
    )
    return (_t(np.stack(cols, -1)), _t(np.log(d["weight"])))


def _ark_args(d):
    y, K, T = np.asarray(d["y"], dtype=float), d["K"], d["T"]
    lags = np.stack([y[K - k - 1 : T - k - 1] for k in range(K)], -1)
    return (_t(lags), _t(y[K:]))


def _gauss_mix_args(d):
    return (_t(d["y"]),)


def _eight_schools_draws(draws):
    draws["theta_trans"] = (draws["theta"] - draws["mu"][:, None]) / draws["tau"][:, None]
    return draws


@dataclass(frozen=True)
class Posterior:
    """
    A posteriordb posterior in Pyro.

    :ivar str name: posteriordb's name (the folder).
    :ivar model: the Pyro model; call it as ``model(*args)``.
    :ivar tuple args: the model's positional data.
    :ivar dict reference: reference posterior draws ``{site: array (10000, *site shape)}``,
        chains concatenated, Stan's names mapped to Pyro sites (``beta[1]`` → ``beta[..., 0]``).
    :ivar tuple latent_sites: the model's latent sites (what a guide must cover).
    """

    name: str
    model: Callable
    args: tuple
    reference: dict
    latent_sites: tuple

    def reference_moments(self) -> dict:
        """``{"beta[0]": (mean, sd), ...}`` of the reference draws, per latent element."""
        out = {}
        for site in self.latent_sites:
            x = self.reference[site]
            flat = x.reshape(x.shape[0], -1)
            names = [site] if x.ndim == 1 else [f"{site}[{','.join(map(str, i))}]" for i in np.ndindex(*x.shape[1:])]
            for j, n in enumerate(names):
                out[n] = (float(flat[:, j].mean()), float(flat[:, j].std(ddof=1)))
        return out


#: name -> (model, data -> args, reference draws post-processing, latent sites)
POSTERIORS = {
    "eight_schools-eight_schools_noncentered": (
        eight_schools_noncentered,
        _eight_schools_args,
        _eight_schools_draws,
        ("theta_trans", "mu", "tau"),
    ),
    "kidiq-kidscore_momiq": (kidscore_momiq, _kidiq_args, None, ("beta", "sigma")),
    "mesquite-logmesquite": (logmesquite, _mesquite_args, None, ("beta", "sigma")),
    "arK-arK": (ark, _ark_args, None, ("alpha", "beta", "sigma")),
    "low_dim_gauss_mix-low_dim_gauss_mix": (low_dim_gauss_mix, _gauss_mix_args, None, ("mu", "sigma", "theta")),
}

_STAN_NAME = re.compile(r"^(\w+)(?:\[([\d,]+)\])?$")


def stan_draws_to_sites(chains: list) -> dict:
    """
    posteriordb's reference draws (a list of chains, each ``{stan name: [draws]}``) as
    ``{site: array (chains * draws, *shape)}``; ``name[i,j]`` is element ``(i-1, j-1)``.
    """
    groups: dict[str, dict] = {}
    for stan_name in chains[0]:
        m = _STAN_NAME.match(stan_name)
        if m is None:
            raise ValueError(f"cannot parse the Stan parameter name {stan_name!r}")
        site, idx = m.group(1), m.group(2)
        index = () if idx is None else tuple(int(i) - 1 for i in idx.split(","))
        values = np.concatenate([np.asarray(chain[stan_name], dtype=float) for chain in chains])
        groups.setdefault(site, {})[index] = values
    out = {}
    for site, elements in groups.items():
        if () in elements:
            out[site] = elements[()]
            continue
        shape = tuple(max(i[d] for i in elements) + 1 for d in range(len(next(iter(elements)))))
        arr = np.empty((len(next(iter(elements.values()))),) + shape)
        for index, values in elements.items():
            arr[(slice(None),) + index] = values
        out[site] = arr
    return out


def load_posterior(name: str, root: Path | None = None) -> Posterior:
    """
    :param str name: a key of :data:`POSTERIORS` (posteriordb's posterior name).
    :param Path root: the posteriordb folder (default :func:`posteriordb_dir`).
    :rtype: Posterior
    :raises ValueError: for an unknown name or a missing folder.
    """
    if name not in POSTERIORS:
        raise ValueError(f"unknown posterior {name!r}; choose one of {sorted(POSTERIORS)}")
    root = Path(root) if root is not None else posteriordb_dir()
    folder = root / name
    if not folder.is_dir():
        raise ValueError(
            f"posteriordb folder {folder} not found; set POSTERIORDB to the folder holding {name}/ "
            "(the repository expects it at ../shared/posteriordb)"
        )
    model, to_args, fix_draws, latent = POSTERIORS[name]
    args = to_args(_read_zip_json(folder / "data.json.zip"))
    draws = stan_draws_to_sites(_read_zip_json(folder / "reference_draws.json.zip"))
    if fix_draws is not None:
        draws = fix_draws(draws)
    return Posterior(name, model, args, draws, latent)
