# SPDX-License-Identifier: Apache-2.0
"""
The benchmark's cases (``benchmarks/run.py``): each returns ``[(title, methods, reference,
(rounds, block, warmup)), ...]`` for :func:`timing.measure`: the VAEs (``vae_case``), eight
schools (``schools_case``), issue 13's classes against their Pyro bases (``new_losses_case``)
and the evidence estimate (``evidence_case``).
"""

from __future__ import annotations

import pyro
from methods import (
    FUSED,
    fused_method,
    history_method,
    loss_factories,
    particle_methods,
    svi_method,
    torch_vae_fused_method,
    torch_vae_method,
)
from models import VAE, BinaryLatent, EightSchools, Mixture, minibatches
from pyro.infer import SVI, Importance, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO
from timing import Method

from pyro_elbo_lab import IWAE, BetaELBO, BetaTraceEnumELBO, BetaTraceGraphELBO, JitBetaELBO, estimate_evidence

__all__ = ["evidence_case", "new_losses_case", "schools_case", "vae_case"]


def vae_case(title, x, hidden, z_dim, particles, cfg):
    batches = minibatches(x, 128)

    def make_vae():
        return VAE(x.shape[1], hidden, z_dim, num_data=x.shape[0], seed=0)

    def make_problem():
        vae = make_vae()
        return vae.model, vae.guide, batches

    def args_fn(b):
        return (b,)

    cases = []
    methods = [torch_vae_method(make_vae, batches)]
    if cfg["fused"]:
        methods.append(torch_vae_fused_method(make_vae, batches))
    methods += [svi_method(n, make_problem, f, args_fn) for n, f in loss_factories(jit_pyro=cfg["jit_pyro"])]
    if cfg["fused"]:
        methods.append(fused_method(FUSED, make_problem, lambda: JitBetaELBO(compiler="inductor"), args_fn))
    if cfg["history"]:
        methods.append(history_method("BetaELBO + history read", make_problem, BetaELBO, args_fn))
    if cfg.get("numpyro") is not None:
        methods.append(cfg["numpyro"].method("digits"))
    cases.append((f"{title}, 1 particle", methods, "Trace_ELBO", cfg["vae"]))
    if particles:
        pm = particle_methods(particles, make_problem, args_fn)
        cases.append((f"{title}, {particles} particles", pm, "Trace_ELBO (sequential)", cfg["vae_particles"]))
    return cases


def schools_case(particles, cfg):
    def make_problem():
        s = EightSchools()
        return s.model, s.guide, [(s.y, s.sigma)]

    def args_fn(b):
        return b

    methods = [svi_method(n, make_problem, f, args_fn) for n, f in loss_factories(jit_pyro=cfg["jit_pyro"])]
    methods.append(fused_method(FUSED, make_problem, lambda: JitBetaELBO(compiler="inductor"), args_fn))
    if cfg["history"]:
        methods.append(history_method("BetaELBO + history read", make_problem, BetaELBO, args_fn))
    if cfg.get("numpyro") is not None:
        methods.append(cfg["numpyro"].method("schools"))
    cases = [("Eight schools (AutoNormal), 1 particle", methods, "Trace_ELBO", cfg["schools"])]
    pm = particle_methods(particles, make_problem, args_fn)
    cases.append(
        (f"Eight schools (AutoNormal), {particles} particles", pm, "Trace_ELBO (sequential)", cfg["schools_particles"])
    )
    # many vectorised particles: the recording losses' per-particle sums against Trace_ELBO's
    kw = {"num_particles": 1000, "vectorize_particles": True, "max_plate_nesting": 1}
    pm = [
        svi_method("Trace_ELBO (vectorised)", make_problem, lambda: Trace_ELBO(**kw), args_fn),
        svi_method("BetaELBO (vectorised)", make_problem, lambda: BetaELBO(**kw), args_fn),
    ]
    title = "Eight schools (AutoNormal), 1000 particles"
    cases.append((title, pm, "Trace_ELBO (vectorised)", cfg["schools_particles"]))
    return cases


def new_losses_case(cfg):
    """Issue 13's classes against their Pyro base classes, each on a model that needs them."""
    from pyro.infer import JitTraceEnum_ELBO

    from pyro_elbo_lab import JitBetaTraceEnumELBO

    def problem(cls):
        def make_problem():
            m = cls()
            return m.model, m.guide, [m.data]

        return make_problem

    def schools():
        s = EightSchools()
        return s.model, s.guide, [(s.y, s.sigma)]

    def one(b):
        return (b,)

    def both(b):
        return b

    mixture, binary = problem(Mixture), problem(BinaryLatent)
    return [
        (
            "Gaussian mixture, component enumerated (1000 points)",
            [
                svi_method("TraceEnum_ELBO", mixture, lambda: TraceEnum_ELBO(max_plate_nesting=1), one),
                svi_method("BetaTraceEnumELBO", mixture, lambda: BetaTraceEnumELBO(max_plate_nesting=1), one),
                svi_method("JitTraceEnum_ELBO (Pyro)", mixture, lambda: JitTraceEnum_ELBO(max_plate_nesting=1), one),
                svi_method("JitBetaTraceEnumELBO", mixture, lambda: JitBetaTraceEnumELBO(max_plate_nesting=1), one),
                svi_method(
                    "JitBetaTraceEnumELBO (inductor)",
                    mixture,
                    lambda: JitBetaTraceEnumELBO(compiler="inductor", max_plate_nesting=1),
                    one,
                ),
            ],
            "TraceEnum_ELBO",
            cfg["new_losses"],
        ),
        (
            "Binary latent per point, score-function guide (200 points)",
            [
                svi_method("TraceGraph_ELBO", binary, TraceGraph_ELBO, one),
                svi_method("BetaTraceGraphELBO", binary, BetaTraceGraphELBO, one),
            ],
            "TraceGraph_ELBO",
            cfg["new_losses"],
        ),
        (
            "Eight schools (AutoNormal), importance-weighted bound, K = 16",
            [
                svi_method(
                    "RenyiELBO(alpha=0)",
                    schools,
                    lambda: RenyiELBO(alpha=0, num_particles=16, vectorize_particles=True, max_plate_nesting=1),
                    both,
                ),
                svi_method("IWAE (DReG)", schools, lambda: IWAE(16, max_plate_nesting=1), both),
            ],
            "RenyiELBO(alpha=0)",
            cfg["new_losses"],
        ),
    ]


def evidence_case(cfg):
    s = EightSchools()
    shared = {"params": {}, "constraints": {}}
    store = pyro.get_param_store()
    with store.scope(shared):
        pyro.set_rng_seed(0)
        svi = SVI(s.model, s.guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
        for _ in range(cfg["evidence_fit_steps"]):
            svi.step(s.y, s.sigma)

    def importance_build():
        def step():
            posterior = Importance(s.model, s.guide, num_samples=1000).run(s.y, s.sigma)
            return posterior.get_log_normalizer().item()

        return step

    def evidence_build(n):
        def build():
            def step():
                return float(estimate_evidence(s.model, s.guide, s.y, s.sigma, num_samples=n).log_evidence)

            return step

        return build

    methods = [
        Method("pyro.infer.Importance (1000)", importance_build, scope=shared),
        Method("estimate_evidence (1000)", evidence_build(1000), scope=shared),
        Method("estimate_evidence (100000)", evidence_build(100_000), scope=shared),
    ]
    # methods share the fitted guide: measure() re-enters the same scope for each
    return [
        ("Evidence, eight schools (one call = one estimate)", methods, "pyro.infer.Importance (1000)", cfg["evidence"])
    ]
