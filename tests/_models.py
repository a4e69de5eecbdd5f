# SPDX-License-Identifier: Apache-2.0
"""
Models, guides, the optimiser and the runner set-up that several test files share, as plain
functions (each test passes its own options). Imported as ``from _models import ...``: tests/
has no ``__init__.py``, so pytest's default import mode puts tests/ on ``sys.path``.

The values the tests compare with stay in the test files, next to their assertions, with one
exception used by two files: :func:`bernoulli_mixture_log_joint`, ``log p(x, z)`` written out
from the two densities (no Pyro trace, no code of ours).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import ELBO

from pyro_elbo_lab import BetaELBO, SVIRunner


def normal_mean_model(prior_scale: float = 1.0) -> Callable[[torch.Tensor], None]:
    """
    The model ``z ~ N(0, prior_scale²)``, ``x_i ~ N(z, 1)`` over the plate ``"data"``.

    :param float prior_scale: the prior's standard deviation.
    :returns: the model, called with the data ``x`` of shape ``(N,)``.
    """

    def model(x: torch.Tensor) -> None:
        z = pyro.sample("z", dist.Normal(0.0, prior_scale))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    return model


def normal_guide(loc: float = 0.0, scale: float = 1.0) -> Callable[[torch.Tensor], None]:
    """
    The guide ``z ~ N(loc, scale²)`` with parameters ``"loc"`` and ``"scale"`` (positive).

    :param float loc: the initial value of ``"loc"``.
    :param float scale: the initial value of ``"scale"``.
    :returns: the guide, called with the model's data.
    """

    def guide(x: torch.Tensor) -> None:
        loc_ = pyro.param("loc", torch.tensor(loc))
        scale_ = pyro.param("scale", torch.tensor(scale), constraint=dist.constraints.positive)
        pyro.sample("z", dist.Normal(loc_, scale_))

    return guide


def adam(lr: float = 0.05) -> pyro.optim.PyroOptim:
    """A fresh ``pyro.optim.Adam({"lr": lr})``."""
    return pyro.optim.Adam({"lr": lr})


def svi_runner(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *,
    optim: pyro.optim.PyroOptim | None = None,
    loss: ELBO | None = None,
    **options: Any,
) -> SVIRunner:
    """
    ``SVIRunner(model, guide, optim, loss, progress_bar=False, **options)``; a fresh ``adam()``
    and ``BetaELBO()`` where ``optim`` or ``loss`` is not given.
    """
    return SVIRunner(
        model,
        guide,
        adam() if optim is None else optim,
        BetaELBO() if loss is None else loss,
        progress_bar=False,
        **options,
    )


def bernoulli_mixture_model(x: torch.Tensor) -> None:
    """``z ~ Bernoulli(0.3)``, ``x ~ N(3 z, 1)``: the evidence is ``0.7 N(x; 0, 1) + 0.3 N(x; 3, 1)``."""
    z = pyro.sample("z", dist.Bernoulli(0.3))
    pyro.sample("x", dist.Normal(3.0 * z, 1.0), obs=x)


def bernoulli_mixture_log_joint(x: torch.Tensor) -> torch.Tensor:
    """
    ``log p(x, z)`` of :func:`bernoulli_mixture_model` for ``z = 0, 1`` by hand (no Pyro trace):
    ``log 0.7 + log N(x; 0, 1)`` and ``log 0.3 + log N(x; 3, 1)``.

    :param torch.Tensor x: a scalar observation.
    :returns: the two values, shape ``(2,)``, in nats; their ``logsumexp`` is ``log p(x)``.
    """
    normal = torch.distributions.Normal(torch.tensor([0.0, 3.0]), 1.0)
    return torch.log(torch.tensor([0.7, 0.3])) + normal.log_prob(x)


def bernoulli_guide(enumerated: bool = False) -> Callable[[torch.Tensor], None]:
    """
    The guide ``z ~ Bernoulli(0.6)`` of :func:`bernoulli_mixture_model`.

    :param bool enumerated: mark the site ``infer={"enumerate": "parallel"}``.
    :returns: the guide.
    """

    def guide(x: torch.Tensor) -> None:
        # a fresh infer dict per call: Pyro's messengers write into it
        pyro.sample("z", dist.Bernoulli(0.6), infer={"enumerate": "parallel"} if enumerated else None)

    return guide
