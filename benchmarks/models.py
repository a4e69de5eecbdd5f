# SPDX-License-Identifier: Apache-2.0
"""
The benchmark problems: a VAE on the digits data (64-256-8), a VAE on 784-dim synthetic
binary data (784-400-20), eight schools (non-centred, AutoNormal guide), a Gaussian
mixture with the component enumerated (:class:`Mixture`), and a model with one binary
latent per data point and a score-function guide (:class:`BinaryLatent`).

Each problem builds fresh modules from a seed, so every method starts from the same
parameters and sees the same batches. The data come from :mod:`pyro_elbo_lab.datasets`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyro.infer.autoguide import AutoNormal

from pyro_elbo_lab.datasets import eight_schools, load_digits

__all__ = [
    "VAE",
    "digits_data",
    "synthetic_data",
    "minibatches",
    "EightSchools",
    "Mixture",
    "BinaryLatent",
    "problem_arrays",
]


def digits_data() -> torch.Tensor:
    """The 1797 8x8 digits of :func:`pyro_elbo_lab.datasets.load_digits`, pixels scaled to [0, 1]."""
    return load_digits().data / 16.0


def synthetic_data(n: int = 2048, dim: int = 784, seed: int = 0) -> torch.Tensor:
    """Binary 784-dim data from a random 10-factor logistic model (MNIST-sized, no download)."""
    g = torch.Generator().manual_seed(seed)
    factors = torch.randn(n, 10, generator=g)
    loadings = 2.0 * torch.randn(10, dim, generator=g)
    probs = torch.sigmoid(factors @ loadings - 1.0)
    return torch.bernoulli(probs, generator=g).to(torch.get_default_dtype())


def minibatches(x: torch.Tensor, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``x``'s rows in a random order from ``seed``, split in full batches of ``batch_size`` (the rest dropped)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n = x.shape[0] // batch_size * batch_size
    return list(x[perm[:n]].split(batch_size))


class Encoder(nn.Module):
    def __init__(self, x_dim: int, hidden: int, z_dim: int):
        super().__init__()
        self.fc = nn.Linear(x_dim, hidden)
        self.loc = nn.Linear(hidden, z_dim)
        self.scale = nn.Linear(hidden, z_dim)

    def forward(self, x):
        h = F.softplus(self.fc(x))
        return self.loc(h), F.softplus(self.scale(h)) + 1e-4


class Decoder(nn.Module):
    def __init__(self, x_dim: int, hidden: int, z_dim: int):
        super().__init__()
        self.fc = nn.Linear(z_dim, hidden)
        self.out = nn.Linear(hidden, x_dim)

    def forward(self, z):
        return self.out(F.softplus(self.fc(z)))


class VAE:
    """
    A VAE with a Gaussian encoder and a continuous-Bernoulli decoder (pixels in [0, 1]):
    ``model(x)`` / ``guide(x)`` for Pyro, :meth:`negative_elbo` for plain PyTorch.

    The minibatch is scaled up to ``num_data`` so the loss is that of the full data set,
    as in a minibatch training loop. (``poutine.scale`` rather than a ``subsample_size``
    plate: the plate would draw a random index permutation that the model never uses,
    which a compiled loss drops, so the random streams of compiled and uncompiled losses
    would part after the first step.)
    """

    def __init__(self, x_dim: int, hidden: int, z_dim: int, num_data: int, seed: int = 0):
        # initial weights from ``seed``, without touching the global random state
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.encoder = Encoder(x_dim, hidden, z_dim)
            self.decoder = Decoder(x_dim, hidden, z_dim)
        self.z_dim = z_dim
        self.num_data = num_data

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=self.num_data / x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1))
            logits = self.decoder(z)
            pyro.sample("x", dist.ContinuousBernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=self.num_data / x.shape[0]):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def parameters(self):
        return list(self.encoder.parameters()) + list(self.decoder.parameters())

    def negative_elbo(self, x):
        """The same loss in plain torch ops (analytic KL): the physical limit of a step."""
        loc, scale = self.encoder(x)
        z = loc + scale * torch.randn_like(loc)
        logits = self.decoder(z)
        # continuous Bernoulli log-density: x*l - softplus(l) + log C(l), log C via the
        # distribution's own (numerically guarded) normaliser
        log_lik = dist.ContinuousBernoulli(logits=logits).log_prob(x).sum(-1)
        kl = 0.5 * (loc.pow(2) + scale.pow(2) - 1.0).sum(-1) - scale.log().sum(-1)
        return -(self.num_data / x.shape[0]) * (log_lik - kl).sum()


class EightSchools:
    """
    Non-centred eight schools with an :class:`~pyro.infer.autoguide.AutoNormal` guide (its
    initialisation, ``init_to_feasible``, is deterministic: no seed needed).
    """

    def __init__(self):
        schools = eight_schools()
        self.y = schools.data
        self.sigma = schools.target
        self.guide = AutoNormal(self.model)

    @staticmethod
    def model(y, sigma):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = pyro.sample("tau", dist.HalfCauchy(5.0))
        with pyro.plate("schools", y.shape[-1]):
            theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
            theta = mu + tau * theta_tilde
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


class Mixture:
    """
    A three-component Gaussian mixture on 1 000 synthetic points: the component of each point
    is enumerated in the model (summed out, ``TraceEnum_ELBO`` / ``BetaTraceEnumELBO``), the
    component means are sampled (Normal guide), the weights are a parameter.
    """

    K = 3

    def __init__(self, n: int = 1000, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        c = torch.randint(0, self.K, (n,), generator=g)
        self.data = torch.tensor([-3.0, 0.0, 4.0])[c] + torch.randn(n, generator=g)

    def model(self, data):
        w = pyro.param("w", torch.ones(self.K) / self.K, constraint=dist.constraints.simplex)
        loc = pyro.sample("loc", dist.Normal(0.0, 5.0).expand([self.K]).to_event(1))
        with pyro.plate("data", data.shape[0]):
            c = pyro.sample("c", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(loc[..., c], 1.0), obs=data)

    def guide(self, data):
        m = pyro.param("m", torch.tensor([-1.0, 0.0, 1.0]))
        s = pyro.param("s", torch.ones(self.K), constraint=dist.constraints.positive)
        pyro.sample("loc", dist.Normal(m, s).to_event(1))


class BinaryLatent:
    """
    One Bernoulli latent per data point (200 points), a Normal likelihood whose mean depends
    on it, and a Bernoulli guide: the guide's gradient is a score-function estimate
    (``TraceGraph_ELBO`` / ``BetaTraceGraphELBO``, with Pyro's decaying-average baseline).
    """

    def __init__(self, n: int = 200, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        z = (torch.rand(n, generator=g) < 0.4).to(torch.get_default_dtype())
        self.data = 2.0 * z - 1.0 + torch.randn(n, generator=g)

    def model(self, data):
        locs = pyro.param("locs", torch.tensor([-0.5, 0.5]))
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.4))
            pyro.sample("obs", dist.Normal(locs[z.long()], 1.0), obs=data)

    def guide(self, data):
        logits = pyro.param("logits", torch.zeros(data.shape[0]))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=logits), infer={"baseline": {"use_decaying_avg_baseline": True}})


def problem_arrays(case: str) -> dict:
    """
    The data of a benchmark problem as numpy arrays, for another framework's process
    (``numpy.savez``; ``benchmarks/numpyro_step.py`` reads them): ``"schools"``: ``y`` and
    ``sigma``; ``"digits"``: ``batches`` (the 14 minibatches of 128 digits that ``run.py``
    uses, in its order), ``num_data``, and the initial weights of ``VAE(64, 256, 8, seed=0)``
    as ``param:<module>.<layer>.<weight|bias>`` (torch's ``(out, in)`` layout), so both
    frameworks start from the same parameters.
    """
    if case == "schools":
        s = EightSchools()
        return {"y": s.y.numpy(), "sigma": s.sigma.numpy()}
    if case == "digits":
        x = digits_data()
        vae = VAE(x.shape[1], 256, 8, num_data=x.shape[0], seed=0)
        out = {"batches": torch.stack(minibatches(x, 128)).numpy(), "num_data": x.shape[0]}
        for prefix, module in (("encoder", vae.encoder), ("decoder", vae.decoder)):
            for name, p in module.named_parameters():
                out[f"param:{prefix}.{name}"] = p.detach().numpy()
        return out
    raise ValueError(f"problem_arrays: case must be 'schools' or 'digits', got {case!r}")
