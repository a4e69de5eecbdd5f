# SPDX-License-Identifier: Apache-2.0
"""losses.attribution.sample_sites: the one latent list (model order, then guide-only sites in guide order)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoNormal
from pyro.poutine.util import prune_subsample_sites

from pyro_elbo_lab.losses.attribution import auxiliary_sites, sample_sites


def model(x):
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    pyro.param("unused", torch.tensor(0.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(a + b, 1.0), obs=x)
    pyro.sample("y", dist.Normal(a, 1.0), obs=torch.tensor(0.5))


def guide(x):
    # guide order differs from the model's; two auxiliary sites in a known order
    u = pyro.sample("u_aux", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
    pyro.sample("a", dist.Normal(u, 1.0))
    pyro.sample("t_aux", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})
    pyro.sample("b", dist.Normal(0.0, 1.0))


def _traces(model, guide, x):
    # as the losses see them (Pyro's get_importance_trace prunes the plates' subsample sites)
    guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(x))
    model_trace = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x))
    return model_trace, guide_trace


def test_sample_sites_order_and_membership():
    x = torch.tensor([0.1, -0.3])
    model_trace, guide_trace = _traces(model, guide, x)
    observed, latent = sample_sites(model_trace, guide_trace)
    # written by hand from the model and guide above
    assert [name for name, _ in observed] == ["x", "y"]
    assert [(name, model_site is None) for name, model_site, _ in latent] == [
        ("b", False),
        ("a", False),
        ("u_aux", True),
        ("t_aux", True),
    ]
    for name, model_site, guide_site in latent:
        assert guide_site is guide_trace.nodes[name]
        assert model_site is None or model_site is model_trace.nodes[name]
    assert observed[0][1] is model_trace.nodes["x"]
    assert [name for name, _ in auxiliary_sites(model_trace, guide_trace)] == ["u_aux", "t_aux"]


def test_autonormal_auxiliary_sites_follow_the_model_sites():
    x = torch.tensor([0.1, -0.3])
    auto = AutoNormal(model)
    model_trace, guide_trace = _traces(model, auto, x)
    _, latent = sample_sites(model_trace, guide_trace)
    # AutoNormal samples in prototype (model) order: "b_unconstrained", "b", "a_unconstrained", "a"
    assert [name for name, _, _ in latent] == ["b", "a", "b_unconstrained", "a_unconstrained"]


def test_missing_guide_site():
    x = torch.tensor([0.1, -0.3])

    def partial_guide(x):
        pyro.sample("b", dist.Normal(0.0, 1.0))

    model_trace, guide_trace = _traces(model, partial_guide, x)
    with pytest.raises(ValueError, match="latent site 'a' has no site in the guide"):
        sample_sites(model_trace, guide_trace)
    observed, latent = sample_sites(model_trace, guide_trace, missing="skip")
    assert [name for name, _, _ in latent] == ["b"]
    assert [name for name, _ in observed] == ["x", "y"]

    def own_error(name, site):
        return RuntimeError(f"custom {name} {site['type']}")

    with pytest.raises(RuntimeError, match="custom a sample"):
        sample_sites(model_trace, guide_trace, missing=own_error)
    with pytest.raises(ValueError, match="missing must be 'raise', 'skip' or a callable.*'ignore'"):
        sample_sites(model_trace, guide_trace, missing="ignore")  # type: ignore[arg-type]
