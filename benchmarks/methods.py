# SPDX-License-Identifier: Apache-2.0
"""
The benchmark's method factories (``benchmarks/run.py``): each returns a :class:`timing.Method`
whose step is one SVI step of a loss (``svi_method``, ``history_method``), one fused step
(``fused_method``), or the PyTorch baselines written by hand (``torch_vae_method``,
``torch_vae_fused_method``); ``loss_factories`` and ``particle_methods`` list the losses a
case compares. Every Pyro method runs through ``pyro.infer.SVI`` (or ``FusedSVI``) with
``pyro.optim.Adam(lr=LR)``.
"""

from __future__ import annotations

import time

import pyro
import torch
from pyro.infer import SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO
from timing import Method

from pyro_elbo_lab import BetaELBO, BetaMeanFieldELBO, JitBetaELBO, JitBetaMeanFieldELBO
from pyro_elbo_lab.losses.fused import FusedSVI

__all__ = [
    "FUSED",
    "LR",
    "NUMPYRO",
    "PARTICLE_METHODS",
    "fused_method",
    "history_method",
    "loss_factories",
    "particle_methods",
    "svi_method",
    "torch_vae_fused_method",
    "torch_vae_method",
]

LR = 1e-3
#: the fused training step's row
FUSED = "JitBetaELBO (inductor, fused step)"
#: NumPyro's row (a separate process: benchmarks/numpyro_step.py)
NUMPYRO = "NumPyro (JAX, jitted svi.update)"


def svi_method(name, make_problem, make_loss, args_fn):
    """A Pyro loss driven by SVI + pyro.optim.Adam; ``make_problem()`` -> (model, guide, batches)."""
    holder = {}

    def build():
        model, guide, batches = make_problem()
        loss = make_loss()
        svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), loss)
        holder["loss"] = loss
        it = {"i": 0}
        if not isinstance(loss, JitTraceMeanField_ELBO):

            def step():
                i = it["i"] = (it["i"] + 1) % len(batches)
                return svi.step(*args_fn(batches[i]))

            return step

        # Pyro 1.9.2's JitTraceMeanField_ELBO tests a cache under _loss_and_surrogate_loss
        # but stores _differentiable_loss, so every step builds (and compiles) a new function
        # and frees the old one. Count the steps whose function is not the previous step's
        # (ids of freed functions get reused, so a set of ids would under-count). The check
        # is one attribute read and an identity test per step, noise against the ms step.
        holder["compilations"] = 0
        last = {"fn": None}

        def step():
            i = it["i"] = (it["i"] + 1) % len(batches)
            out = svi.step(*args_fn(batches[i]))
            fn = loss._differentiable_loss
            if fn is not last["fn"]:
                holder["compilations"] += 1
                last["fn"] = fn
            return out

        return step

    def info():
        loss = holder.get("loss")
        if isinstance(loss, (JitBetaELBO, JitBetaMeanFieldELBO)):
            return {"compilations": loss.num_compilations, "compile_s": loss.compile_seconds}
        if isinstance(loss, JitTraceMeanField_ELBO):
            return {"compilations": holder["compilations"]}
        if isinstance(loss, JitTrace_ELBO):
            return {"compilations": len(loss._loss_and_surrogate_loss.compiled)}
        return {}

    return Method(name, build, info)


def history_method(name, make_problem, make_loss, args_fn):
    """Like ``svi_method`` but reads ``last_terms.as_dict()`` every step (an SVI history row)."""

    def build():
        model, guide, batches = make_problem()
        loss = make_loss()
        svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}), loss)
        it = {"i": 0}
        rows = []

        def step():
            i = it["i"] = (it["i"] + 1) % len(batches)
            out = svi.step(*args_fn(batches[i]))
            rows.append(loss.last_terms.as_dict())
            if len(rows) > 1000:
                rows.clear()
            return out

        return step

    return Method(name, build)


def fused_method(name, make_problem, make_loss, args_fn):
    """A compiled inductor loss driven by FusedSVI (gradients and the Adam update in one graph)."""
    holder = {}

    def build():
        model, guide, batches = make_problem()
        loss = make_loss()
        svi = FusedSVI(model, guide, pyro.optim.Adam({"lr": LR}), loss)
        holder["loss"], holder["svi"] = loss, svi
        it = {"i": 0}

        def step():
            i = it["i"] = (it["i"] + 1) % len(batches)
            return svi.step(*args_fn(batches[i]))

        return step

    def info():
        loss, svi = holder["loss"], holder["svi"]
        return {"compilations": loss.num_compilations + 1, "compile_s": loss.compile_seconds + svi.compile_seconds}

    return Method(name, build, info)


def torch_vae_fused_method(make_vae, batches):
    """
    The physical limit: the VAE's negative ELBO in plain torch ops, its gradient
    (``torch.func.grad_and_value``) and Adam's update written out, compiled as ONE
    ``torch.compile`` graph that updates parameters and moments in place.
    """
    from torch.func import functional_call, grad_and_value

    holder = {}

    def build():
        vae = make_vae()
        net = torch.nn.Module()
        net.encoder, net.decoder = vae.encoder, vae.decoder
        net.forward = vae.negative_elbo
        names = [n for n, _ in net.named_parameters()]
        params = [p.detach() for _, p in net.named_parameters()]
        exp_avg = [torch.zeros_like(p) for p in params]
        exp_avg_sq = [torch.zeros_like(p) for p in params]
        t = torch.zeros(1, dtype=torch.float64)
        lr = torch.full((1,), LR, dtype=torch.float64)
        value_and_grad = grad_and_value(lambda ps, x: functional_call(net, dict(zip(names, ps)), (x,)))

        def fused(ps, m, v, t, lr, x):
            grads, loss = value_and_grad(ps, x)
            t.add_(1)
            step_size = (lr / (1 - torch.pow(0.9, t))).to(ps[0].dtype)
            bc2 = (1 - torch.pow(0.999, t)).sqrt().to(ps[0].dtype)
            for p, g, a, b in zip(ps, grads, m, v):
                a.lerp_(g, 0.1)
                b.mul_(0.999).addcmul_(g, g, value=0.001)
                p.sub_(step_size * (a / (b.sqrt() / bc2).add_(1e-8)))
            return loss

        compiled = torch.compile(fused, fullgraph=True, dynamic=False, options={"fallback_random": True})
        it = {"i": 0, "first": True}

        def step():
            i = it["i"] = (it["i"] + 1) % len(batches)
            t0 = time.perf_counter()
            out = compiled(params, exp_avg, exp_avg_sq, t, lr, batches[i]).item()
            if it["first"]:
                holder["compile_s"] = time.perf_counter() - t0
                it["first"] = False
            return out

        return step

    return Method("PyTorch by hand, fused (grad + Adam, one graph)", build, lambda: {"compilations": 1, **holder})


def loss_factories(particles: int = 1, vectorize: bool = False, max_plate_nesting: int = 1, jit_pyro: bool = True):
    kw = {"num_particles": particles, "vectorize_particles": vectorize}
    if vectorize:
        kw["max_plate_nesting"] = max_plate_nesting
    jkw = dict(kw, ignore_jit_warnings=True)
    out = [
        ("Trace_ELBO", lambda: Trace_ELBO(**kw)),
        ("TraceMeanField_ELBO", lambda: TraceMeanField_ELBO(**kw)),
        ("BetaELBO", lambda: BetaELBO(**kw)),
        ("BetaMeanFieldELBO", lambda: BetaMeanFieldELBO(**kw)),
        ("JitBetaELBO", lambda: JitBetaELBO(**jkw)),
        ("JitBetaMeanFieldELBO", lambda: JitBetaMeanFieldELBO(**jkw)),
        ("JitBetaELBO (inductor)", lambda: JitBetaELBO(compiler="inductor", **jkw)),
        ("JitBetaMeanFieldELBO (inductor)", lambda: JitBetaMeanFieldELBO(compiler="inductor", **jkw)),
    ]
    if jit_pyro:
        out += [
            ("JitTrace_ELBO (Pyro)", lambda: JitTrace_ELBO(**jkw)),
            ("JitTraceMeanField_ELBO (Pyro)", lambda: JitTraceMeanField_ELBO(**jkw)),
        ]
    return out


#: methods of the many-particle cases, sequential (False) and vectorised (True); inductor
#: only vectorised: sequential particles are unrolled into the graph, which multiplies its
#: compile time by the number of particles
PARTICLE_METHODS = {
    False: ("Trace_ELBO", "BetaELBO", "JitBetaELBO"),
    True: ("Trace_ELBO", "BetaELBO", "JitBetaELBO", "JitBetaELBO (inductor)"),
}


def particle_methods(particles, make_problem, args_fn) -> list:
    """The many-particle case's methods, sequential then vectorised (``PARTICLE_METHODS``)."""
    out = []
    for vec in (False, True):
        label = "vectorised" if vec else "sequential"
        for n, f in loss_factories(particles, vec, jit_pyro=False):
            if n in PARTICLE_METHODS[vec]:
                out.append(svi_method(f"{n} ({label})", make_problem, f, args_fn))
    return out


def torch_vae_method(make_vae, batches):
    def build():
        vae = make_vae()
        opt = torch.optim.Adam(vae.parameters(), lr=LR)
        it = {"i": 0}

        def step():
            i = it["i"] = (it["i"] + 1) % len(batches)
            opt.zero_grad()
            loss = vae.negative_elbo(batches[i])
            loss.backward()
            opt.step()
            return loss.item()

        return step

    return Method("PyTorch by hand", build)
