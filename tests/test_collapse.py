# SPDX-License-Identifier: Apache-2.0
"""posterior_collapse against closed-form KLs and posterior-mean variances of linear encoders."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import pyro_elbo_lab
from pyro_elbo_lab.diagnostics import CollapseReport, posterior_collapse

N, D = 40, 3
# encoder loc = x @ W.T: unit 0 carries x[0], unit 1 is the prior (collapsed), unit 2 nearly so
W = torch.tensor([[0.8, 0.0], [0.0, 0.0], [0.0, 0.001]])
SCALE = torch.tensor([0.4, 1.0, 1.0])


@pytest.fixture
def data():
    return torch.randn(N, 2)


def vae_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z[..., :2], 0.5).to_event(1), obs=x)


def vae_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x @ W.T, SCALE).to_event(1))


def exact_kl_and_activity(x):
    loc = x @ W.T
    kl = (torch.log(1 / SCALE) + (SCALE**2 + loc**2) / 2 - 0.5).mean(0)  # KL(N(m, s²) ‖ N(0, 1))
    return kl, loc.var(0, unbiased=False)


def test_analytic_kl_per_dimension_and_active_units(data):
    report = posterior_collapse(vae_model, vae_guide, data, num_samples=2)
    kl, activity = exact_kl_and_activity(data)
    # analytic KL and the guide's mean: exact up to float64 rounding
    assert torch.allclose(report.kl_per_dimension, kl, atol=1e-12)
    assert torch.allclose(report.activity, activity, atol=1e-12)
    assert report.kl_per_dimension[1] == 0  # exactly the prior
    assert report.active.tolist() == [True, False, False]
    assert report.active_units == 1
    assert report.num_dimensions == 3
    assert report.dimensions == ("z[0]", "z[1]", "z[2]")
    assert report.kl == pytest.approx(float(kl.sum()), abs=1e-12)
    assert report.kl_method == {"z": "analytic"} and report.mean_method == {"z": "guide mean"}
    # the guide's parameters depend on x only: no Monte Carlo error at all
    assert torch.all(report.kl_per_dimension_stderr == 0)
    assert report.plate == "data" and report.sites == ("z",) and report.num_datapoints == N


def test_threshold_is_configurable(data):
    report = posterior_collapse(vae_model, vae_guide, data, threshold=1e-8)
    # unit 2 has activity 1e-6 * var(x[:, 1]) ~ 1e-6: active above 1e-8, inactive at 0.01
    assert report.active.tolist() == [True, False, True]
    assert report.active_units == 2
    assert math.isnan(float(report.kl_per_dimension_stderr[0]))  # one sample: no stderr


def test_monte_carlo_kl_for_pairs_without_closed_form(data):
    nu = 5.0

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.StudentT(nu, x @ W.T, SCALE).to_event(1))

    report = posterior_collapse(vae_model, guide, data, num_samples=4000)
    assert report.kl_method == {"z": "monte carlo"}
    # KL(T_ν(m, s) ‖ N(0, 1)) = -H[T] + ½ log 2π + ½ (m² + s² ν/(ν-2)), exactly
    loc = data @ W.T
    entropy = dist.StudentT(nu, loc, SCALE).entropy()
    exact = (-entropy + 0.5 * math.log(2 * math.pi) + 0.5 * (loc**2 + SCALE**2 * nu / (nu - 2))).mean(0)
    se = report.kl_per_dimension_stderr
    assert torch.all(se > 0)
    assert torch.all((report.kl_per_dimension - exact).abs() < 5 * se)  # 5 standard errors
    # StudentT has a mean (ν > 1): activity from the guide's loc, exact
    assert report.mean_method == {"z": "guide mean"}
    assert torch.allclose(report.activity, loc.var(0, unbiased=False), atol=1e-12)


F32 = torch.float32


def _float32_vae(loc_fn):
    """The VAE model and a guide with element distribution ``loc_fn(loc, x)``, every tensor float32."""
    w32 = W.to(F32)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(D, dtype=F32), torch.ones((), dtype=F32)).to_event(1))
            pyro.sample("x", dist.Normal(z[..., :2], torch.tensor(0.5, dtype=F32)).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", loc_fn(x @ w32.T).to_event(1))

    return model, guide


def test_float32_analytic_kl_over_several_batches_has_zero_stderr(data):
    # KL ≈ 450 nats per dimension: the old sum-of-squares variance, Σ kl² - S·mean², cancelled
    # in float32 and reported a stderr of 4e-3 where the closed form is exactly 0
    x = data.to(F32)
    offset, scale = 30.0, SCALE.to(F32)
    model, guide = _float32_vae(lambda loc: dist.Normal(offset + loc, scale))
    report = posterior_collapse(model, guide, x, num_samples=1000, batch_size=300)  # batches 300, 300, 300, 100
    assert report.kl_per_dimension.dtype == F32
    loc = offset + data @ W.T  # float64 closed form
    exact = (torch.log(1 / SCALE) + (SCALE**2 + loc**2) / 2 - 0.5).mean(0)
    # float32 rounds at 6e-8 relative; a mean over 40 elements and 1000 samples stays within 1e-5
    assert torch.allclose(report.kl_per_dimension.double(), exact, rtol=1e-5, atol=0)
    # the guide's parameters depend on x only, so every sample has the same KL: the stderr is 0
    # up to the deviations of identical values from their float32 mean (a few ulp of the KL)
    bound = 4 * torch.finfo(F32).eps * exact / math.sqrt(1000)
    assert torch.all(report.kl_per_dimension_stderr.double() <= bound)


def test_float32_monte_carlo_kl_stderr_over_several_batches_matches_closed_form(data):
    # Student-t guide far from the prior (KL ≈ 5000 nats, per-sample sd ≈ 0.25): with the old
    # sum-of-squares variance the float32 stderr came out 0 (clamped) or several times too big
    nu, scale, offset = 5.0, 0.01, 100.0
    x = data.to(F32)
    model, guide = _float32_vae(
        lambda loc: dist.StudentT(torch.tensor(nu, dtype=F32), offset + loc, torch.tensor(scale, dtype=F32))
    )
    S = 400
    report = posterior_collapse(model, guide, x, num_samples=S, batch_size=150)  # batches 150, 150, 100
    assert report.kl_method == {"z": "monte carlo"}
    loc = offset + data @ W.T  # (N, D), float64
    entropy = dist.StudentT(nu, loc, scale).entropy()
    exact = (-entropy + 0.5 * math.log(2 * math.pi) + 0.5 * (loc**2 + scale**2 * nu / (nu - 2))).mean(0)
    # per element, with z = m + s t: log q - log p = log T_ν(t) + m s t + s² t²/2 + const, and
    # log T_ν(t) = -(ν+1)/2 · log(1 + t²/ν) with 1/(1 + t²/ν) ~ Beta(ν/2, 1/2), so
    # Var = ((ν+1)/2)² (ψ₁(ν/2) - ψ₁((ν+1)/2)) + m² s² ν/(ν-2) + O(s²) (1e-4 here, neglected)
    var_log_t = ((nu + 1) / 2) ** 2 * float(
        torch.polygamma(1, torch.tensor(nu / 2)) - torch.polygamma(1, torch.tensor((nu + 1) / 2))
    )
    var = var_log_t + loc**2 * scale**2 * nu / (nu - 2)  # (N, D)
    exact_se = var.sum(0).sqrt() / N / math.sqrt(S)  # sd of the data average, over sqrt(S) samples
    se = report.kl_per_dimension_stderr.double()
    # the sd of S = 400 near-Gaussian rows has relative error 1/sqrt(2·399) ≈ 3.5%; allow 20%
    assert torch.allclose(se, exact_se, rtol=0.2)
    # 5 standard errors; float32 rounding of a 5000-nat mean (~1e-3) is far below 5 se ≈ 0.06
    assert torch.all((report.kl_per_dimension.double() - exact).abs() < 5 * exact_se)


def test_nested_latent_plate_layout_matches_event_layout(data):
    # z as a (data × latent) plate grid instead of an event dim: same per-dimension answers
    def model(x):
        with pyro.plate("latent", D, dim=-1), pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data_obs", x.shape[0], dim=-2), pyro.plate("obs_dim", 2, dim=-1):
            pyro.sample("x", dist.Normal(z[..., :2], 0.5), obs=x)

    def guide(x):
        with pyro.plate("latent", D, dim=-1), pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(x @ W.T, SCALE))

    report = posterior_collapse(model, guide, data, plate="data")
    kl, activity = exact_kl_and_activity(data)
    assert torch.allclose(report.kl_per_dimension, kl, atol=1e-12)
    assert torch.allclose(report.activity, activity, atol=1e-12)


def test_several_sites_and_subsampled_plate(data):
    idx = torch.tensor([1, 3, 5, 7, 11, 13])

    def model(x):
        with pyro.plate("data", x.shape[0], subsample=idx):
            a = pyro.sample("a", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            b = pyro.sample("b", dist.Normal(0.0, 2.0))
            pyro.sample("x", dist.Normal(a + b.unsqueeze(-1), 0.5).to_event(1), obs=x[idx])

    def guide(x):
        with pyro.plate("data", x.shape[0], subsample=idx):
            pyro.sample("a", dist.Normal(0.5 * x[idx], 0.3).to_event(1))
            pyro.sample("b", dist.Normal(x[idx, 0], 1.0))

    report = posterior_collapse(model, guide, data)
    assert report.sites == ("a", "b") and report.dimensions == ("a[0]", "a[1]", "b")
    assert report.num_datapoints == len(idx)  # the elements present
    xs = data[idx]
    kl_a = (math.log(1 / 0.3) + (0.09 + (0.5 * xs) ** 2) / 2 - 0.5).mean(0)
    kl_b = (math.log(2.0) + (1.0 + xs[:, 0] ** 2) / 8 - 0.5).mean()
    assert torch.allclose(report.kl_per_dimension, torch.cat([kl_a, kl_b.reshape(1)]), atol=1e-12)
    only_b = posterior_collapse(model, guide, data, sites="b")
    assert only_b.dimensions == ("b",)
    assert float(only_b.kl_per_dimension) == pytest.approx(float(kl_b), abs=1e-12)


def test_report_api(data):
    report = posterior_collapse(vae_model, vae_guide, data)
    assert pyro_elbo_lab.posterior_collapse is posterior_collapse
    assert pyro_elbo_lab.CollapseReport is CollapseReport
    d = report.as_dict()
    assert d["active_units"] == 1 and d["num_dimensions"] == 3
    assert d["kl/z[1]"] == 0 and d["activity/z[0]"] == pytest.approx(float(report.activity[0]))
    frame = report.to_dataframe()
    assert list(frame.index) == ["z[0]", "z[1]", "z[2]"]
    assert frame["active"].tolist() == [True, False, False]
    assert "1/3 active units" in str(report)


# -- bad input -------------------------------------------------------------------------------------


def test_errors_name_the_cause(data):
    with pytest.raises(ValueError, match="plate='nope' is not a vectorised plate"):
        posterior_collapse(vae_model, vae_guide, data, plate="nope")
    with pytest.raises(ValueError, match="sites names 'x', an observed site"):
        posterior_collapse(vae_model, vae_guide, data, sites=["x"])
    with pytest.raises(ValueError, match="sites names 'w', which is not a sample site"):
        posterior_collapse(vae_model, vae_guide, data, sites="w")
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0"):
        posterior_collapse(vae_model, vae_guide, data, threshold=-1.0)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 1"):
        posterior_collapse(vae_model, vae_guide, data, num_samples=0)


def test_global_latent_is_not_local(data):
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x[:, 0])

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x[:, 0], 1.0))

    with pytest.raises(ValueError, match="site 'mu' is not inside the data plate 'data'"):
        posterior_collapse(model, guide, data, sites=["mu"])
    report = posterior_collapse(model, guide, data)  # infers the local site z
    assert report.sites == ("z",)


def test_non_factorised_guide_is_rejected(data):
    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(x @ W.T, torch.eye(D)))

    with pytest.raises(ValueError, match="factorise over its dimensions .* site 'z'|site 'z'.*factorise"):
        posterior_collapse(vae_model, guide, data)


def test_no_local_latents():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="could not find a data plate holding both observed sites and latent sites"):
        posterior_collapse(model, guide, torch.randn(5))


@pytest.mark.parametrize("where", ["model poutine.mask", "guide Distribution.mask"])
def test_masked_datapoints_are_left_out(data, where):
    # half the data points masked; the encoder sends them far away, so counting them would
    # change both the KL and the activity by orders of magnitude
    keep = torch.arange(N) % 2 == 0
    shift = torch.where(keep, 0.0, 30.0)[:, None]

    def model(x):
        with pyro.plate("data", x.shape[0]):
            with poutine.mask(mask=keep if where.startswith("model") else True):
                z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z[..., :2], 0.5).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            q = dist.Normal(x @ W.T + shift, SCALE)
            if where.startswith("guide"):
                q = q.mask(keep[:, None])
            pyro.sample("z", q.to_event(1))

    report = posterior_collapse(model, guide, data, num_samples=2)
    kl, activity = exact_kl_and_activity(data[keep])
    assert report.num_datapoints == int(keep.sum())
    assert torch.allclose(report.kl_per_dimension, kl, atol=1e-10)
    assert torch.allclose(report.activity, activity, atol=1e-10)
    assert report.active.tolist() == [True, False, False]


def autonormal_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        w = pyro.sample("w", dist.LogNormal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, w), obs=x)


def fitted_autonormal(x):
    """An AutoNormal with chosen unconstrained locs and scales per datapoint."""
    from pyro.infer.autoguide import AutoNormal

    pyro.clear_param_store()
    guide = AutoNormal(autonormal_model)
    guide(x)
    n = x.shape[0]
    locs = {"z": torch.linspace(-1.0, 1.5, n), "w": torch.linspace(0.5, -0.8, n)}
    scales = {"z": torch.linspace(0.3, 0.9, n), "w": torch.linspace(1.4, 0.4, n)}
    with torch.no_grad():
        for name in ("z", "w"):
            getattr(guide.locs, name).copy_(locs[name])
            unconstrained = torch.distributions.transform_to(guide.scale_constraint).inv(scales[name])
            getattr(guide.scales, f"{name}_unconstrained").copy_(unconstrained)
    assert torch.allclose(guide.scales.w, scales["w"])
    return guide, locs, scales


def assert_kl_is_the_closed_form(report, locs, scales):
    """
    Sites z and w: each dimension's KL is KL(Normal(m, s) || Normal(0, 1)) in closed form. For the
    real site z the guide's pushforward is Normal(m, s) itself (analytic, exact); for w, exp(u) of an
    affine-composed transform, the KL is Monte Carlo: within 5 standard errors.
    """
    assert report.sites == ("z", "w")
    prior = dist.Normal(0.0, 1.0)
    for d, name in enumerate(report.sites):
        exact = float(torch.distributions.kl_divergence(dist.Normal(locs[name], scales[name]), prior).mean())
        se = float(report.kl_per_dimension_stderr[d])
        if name == "z":
            assert report.kl_method[name] == "analytic"
            assert float(report.kl_per_dimension[d]) == pytest.approx(exact, abs=1e-10)
            assert se == 0.0
        else:
            assert report.kl_method[name] == "monte carlo"
            assert 0 < se < 0.05
            assert abs(float(report.kl_per_dimension[d]) - exact) < 5 * se, (
                name,
                report.kl_per_dimension[d],
                exact,
                se,
            )


def test_autonormal_site_kl_includes_the_auxiliary_log_q():
    # AutoNormal draws u ~ Normal(m, s) at "<site>_unconstrained" and a Delta at the site: z = u,
    # w = exp(u). The pushforwards are Normal(m, s) and LogNormal(m, s), so the KLs from the priors
    # Normal(0, 1) and LogNormal(0, 1) are both KL(Normal(m, s) || Normal(0, 1)) in closed form.
    # Before the fix the report held -log p(z) + log|J| only (a cross-entropy, ~0.7 nats too high).
    x = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.1])
    guide, locs, scales = fitted_autonormal(x)
    report = posterior_collapse(autonormal_model, guide, x, num_samples=4000)
    assert_kl_is_the_closed_form(report, locs, scales)


def fitted_autodiagonalnormal(x, locs, scales):
    """An AutoDiagonalNormal whose latent (z's N entries, then w's) has the given locs and scales."""
    from pyro.infer.autoguide import AutoDiagonalNormal

    pyro.clear_param_store()
    guide = AutoDiagonalNormal(autonormal_model)
    guide(x)
    assert list(guide._unconstrained_shapes) == ["z", "w"]  # the layout the locs below follow
    with torch.no_grad():
        guide.loc.copy_(torch.cat([locs["z"], locs["w"]]))
        scale = torch.cat([scales["z"], scales["w"]])
        guide.scale_unconstrained.copy_(torch.distributions.transform_to(guide.scale_constraint).inv(scale))
    assert torch.allclose(guide.scale, scale)
    return guide


def test_autodiagonalnormal_site_kl_includes_its_slice_of_the_latent():
    # AutoDiagonalNormal draws u ~ Normal(loc, scale) (one latent, N entries for z then N for w)
    # and Deltas z = u[:N], w = exp(u[N:]): per datapoint the same pushforwards as AutoNormal's,
    # Normal(m, s) and LogNormal(m, s), so each dimension's KL is KL(Normal(m, s) || Normal(0, 1)),
    # closed form. Before the fix posterior_collapse refused AutoDiagonalNormal (a joint latent).
    x = torch.tensor([0.5, -1.0, 2.0, 0.3, 1.1])
    n = x.shape[0]
    locs = {"z": torch.linspace(-1.0, 1.5, n), "w": torch.linspace(0.5, -0.8, n)}
    scales = {"z": torch.linspace(0.3, 0.9, n), "w": torch.linspace(1.4, 0.4, n)}
    guide = fitted_autodiagonalnormal(x, locs, scales)
    report = posterior_collapse(autonormal_model, guide, x, num_samples=4000)
    assert_kl_is_the_closed_form(report, locs, scales)
    # the posterior mean E_q[z_n] = m_n (a Delta at u: the guide mean of the Delta is its draw),
    # so the activity is the 1/N variance of the z locs up to Monte Carlo error
    assert float(report.activity[0]) == pytest.approx(float(locs["z"].var(unbiased=False)), rel=0.05)

    # second check: AutoNormal with the same locs and scales gives the same KL per dimension
    auto_normal, _, _ = fitted_autonormal(x)
    other = posterior_collapse(autonormal_model, auto_normal, x, num_samples=4000)
    both = torch.sqrt(report.kl_per_dimension_stderr**2 + other.kl_per_dimension_stderr**2)
    assert torch.all((report.kl_per_dimension - other.kl_per_dimension).abs() <= 5 * both + 1e-12)


def test_joint_autoguide_is_refused_per_dimension():
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal, AutoMultivariateNormal

    x = torch.tensor([0.5, -1.0, 2.0])
    for cls in (AutoMultivariateNormal, AutoLowRankMultivariateNormal):
        pyro.clear_param_store()
        guide = cls(autonormal_model)
        guide(x)
        with pytest.raises(ValueError, match=f"site 'z'.*_{cls.__name__}_latent.*AutoDiagonalNormal"):
            posterior_collapse(autonormal_model, guide, x, num_samples=2)


def event_model(x):
    # the usual VAE layout: a two-dimensional latent as one site, .to_event(1), in the data plate
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z[..., 0], 0.5), obs=x)


@pytest.mark.parametrize("guide_class", ["AutoNormal", "AutoDiagonalNormal"])
def test_autoguide_on_an_event_dim_latent_gives_the_closed_form_kl_per_dimension(guide_class):
    # Both autoguides draw u_n ~ Normal(m_n, s_n) (2 dims per datapoint) and a Delta z_n = u_n (the
    # transform of a real site is the identity), so KL per dimension d is
    # (1/N) sum_n KL(Normal(m_nd, s_nd) || Normal(0, 1)) in closed form and E_q[z_nd] = m_nd.
    # Before the fix both were refused ("... event shape (2,) ... univariate elements are needed").
    from pyro.infer import autoguide

    x = torch.tensor([0.5, -1.0, 2.0, 0.3])
    n = x.shape[0]
    locs = torch.stack([torch.linspace(-1.0, 1.5, n), torch.linspace(0.2, 0.4, n)], -1)  # (N, 2)
    scales = torch.stack([torch.linspace(0.3, 0.9, n), torch.linspace(1.2, 0.7, n)], -1)
    pyro.clear_param_store()
    guide = getattr(autoguide, guide_class)(event_model)
    guide(x)
    with torch.no_grad():
        if guide_class == "AutoNormal":
            guide.locs.z.copy_(locs)
            guide.scales.z_unconstrained.copy_(torch.distributions.transform_to(guide.scale_constraint).inv(scales))
            assert torch.allclose(guide.scales.z, scales)
        else:  # the latent holds z's (N, 2) unconstrained value, row-major
            guide.loc.copy_(locs.reshape(-1))
            guide.scale_unconstrained.copy_(
                torch.distributions.transform_to(guide.scale_constraint).inv(scales.reshape(-1))
            )
            assert torch.allclose(guide.scale, scales.reshape(-1))
    report = posterior_collapse(event_model, guide, x, num_samples=3)
    prior = torch.distributions.Normal(0.0, 1.0)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(locs, scales), prior).mean(0)
    assert report.dimensions == ("z[0]", "z[1]")
    assert report.kl_method == {"z": "analytic"}
    assert torch.allclose(report.kl_per_dimension, exact, rtol=0, atol=1e-12)
    assert torch.allclose(report.activity, locs.var(0, unbiased=False), rtol=0, atol=1e-12)


def test_autoguide_on_a_simplex_site_is_refused_with_the_cause():
    # z = StickBreaking(u): the KL of a Dirichlet site does not split per dimension (the message
    # before named the prior's elements as the problem and asked for univariate elements)
    from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Dirichlet(torch.ones(3)))
            pyro.sample("x", dist.Normal(z[..., 0], 0.5), obs=x)

    x = torch.tensor([0.5, -1.0, 2.0])
    for cls, aux in ((AutoNormal, "z_unconstrained"), (AutoDiagonalNormal, "_AutoDiagonalNormal_latent")):
        pyro.clear_param_store()
        guide = cls(model)
        guide(x)
        with pytest.raises(ValueError, match=f"site 'z'.*event shape \\(3,\\).*'{aux}'.*not elementwise"):
            posterior_collapse(model, guide, x, num_samples=2)
