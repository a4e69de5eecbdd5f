#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""
NumPyro's side of the benchmark (issue 16): the same two problems as ``run.py`` (the digits
VAE 64-256-8 at batch 128, and eight schools with ``AutoNormal``), trained by NumPyro's
jitted ``SVI.update`` with ``Trace_ELBO`` and ``numpyro.optim.Adam(1e-3)``.

Run by an interpreter that has JAX and NumPyro, never by the project's (JAX is not a
dependency of pyro-elbo-lab); it imports only jax, numpyro and numpy. ``run.py`` writes the
data (and the VAE's initial weights, so both frameworks start from the same parameters) to an
``.npz`` file and starts this script with ``--numpyro-python``. Two modes:

* ``--serve``: build, compile and warm up, print one JSON line (``import_s``, ``init_s``,
  ``compile_s``, versions), then read block sizes from stdin, one per line, and answer each
  with one JSON line ``{"wall_s": ..., "cpu_s": ..., "loss": ...}``: the wall time and the
  process CPU time (``time.process_time``, all threads of this process) of that many steps.
  ``run.py`` interleaves these blocks with its own methods' blocks, round by round. An empty
  line or end of input ends the process.
* ``--steps N``: run ``N`` steps (the first one compiles) and print one JSON line: what a
  cold process start costs for ``N`` steps (``run.py`` times the whole process from outside).

Every step returns the loss as a Python float (``float(loss)``), as ``pyro.infer.SVI.step``
and ``FusedSVI.step`` do, so each step waits for its result like theirs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_PROCESS = time.perf_counter()

import numpy as np  # noqa: E402


def _softplus(jnp, x):
    return jnp.logaddexp(x, 0.0)


def make_continuous_bernoulli(jnp, dist, constraints):
    """
    NumPyro has no continuous Bernoulli: this is ``torch.distributions.ContinuousBernoulli``'s
    ``log_prob`` op for op (logits parametrisation, probabilities clamped to [eps, 1 - eps],
    the Taylor expansion of the log normaliser on (0.499, 0.501)). Observed only.
    """

    class ContinuousBernoulli(dist.Distribution):
        support = constraints.unit_interval
        lims = (0.499, 0.501)

        def __init__(self, logits):
            self.logits = logits
            super().__init__(batch_shape=jnp.shape(logits))

        def log_prob(self, value):
            logits = self.logits
            eps = jnp.finfo(logits.dtype).eps
            probs = jnp.clip(1.0 / (1.0 + jnp.exp(-logits)), eps, 1.0 - eps)
            outside = (probs <= self.lims[0]) | (probs > self.lims[1])
            cut = jnp.where(outside, probs, self.lims[0])
            below = jnp.where(cut <= 0.5, cut, 0.0)
            above = jnp.where(cut >= 0.5, cut, 1.0)
            log_norm = jnp.log(jnp.abs(jnp.log1p(-cut) - jnp.log(cut))) - jnp.where(
                cut <= 0.5, jnp.log1p(-2.0 * below), jnp.log(2.0 * above - 1.0)
            )
            x = (probs - 0.5) ** 2
            taylor = np.log(2.0) + (4.0 / 3.0 + 104.0 / 45.0 * x) * x
            # -binary_cross_entropy_with_logits(logits, value)
            log_lik = value * logits - _softplus(jnp, logits)
            return log_lik + jnp.where(outside, log_norm, taylor)

        def sample(self, key, sample_shape=()):
            raise NotImplementedError("observed only")

    return ContinuousBernoulli


def build(case: str, data: dict):
    """The model, the guide and the list of argument tuples (the minibatches) of ``case``."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro.distributions import constraints
    from numpyro.infer.autoguide import AutoNormal
    from numpyro.infer.initialization import init_to_feasible

    if case == "schools":

        def model(y, sigma):
            mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
            tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
            with numpyro.plate("schools", y.shape[-1]):
                theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
                theta = mu + tau * theta_tilde
                numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)

        # Pyro's AutoNormal starts from init_to_feasible, NumPyro's from init_to_uniform
        guide = AutoNormal(model, init_loc_fn=init_to_feasible)
        return model, guide, [(jnp.asarray(data["y"]), jnp.asarray(data["sigma"]))]

    ContinuousBernoulli = make_continuous_bernoulli(jnp, dist, constraints)
    num_data = float(data["num_data"])
    init = {k[len("param:") :]: jnp.asarray(v) for k, v in data.items() if k.startswith("param:")}
    z_dim = init["encoder.loc.weight"].shape[0]

    def linear(name, x):
        w = numpyro.param(f"{name}.weight", init[f"{name}.weight"])
        b = numpyro.param(f"{name}.bias", init[f"{name}.bias"])
        return x @ w.T + b

    def model(x):
        with numpyro.plate("data", x.shape[0]), numpyro.handlers.scale(scale=num_data / x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(z_dim, x.dtype), 1.0).to_event(1))
            logits = linear("decoder.out", _softplus(jnp, linear("decoder.fc", z)))
            numpyro.sample("x", ContinuousBernoulli(logits).to_event(1), obs=x)

    def guide(x):
        with numpyro.plate("data", x.shape[0]), numpyro.handlers.scale(scale=num_data / x.shape[0]):
            h = _softplus(jnp, linear("encoder.fc", x))
            loc = linear("encoder.loc", h)
            scale = _softplus(jnp, linear("encoder.scale", h)) + 1e-4
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return model, guide, [(jnp.asarray(b),) for b in data["batches"]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help=".npz written by run.py")
    parser.add_argument("--case", choices=["schools", "digits"], required=True)
    parser.add_argument("--serve", action="store_true", help="answer timed blocks read from stdin")
    parser.add_argument("--steps", type=int, default=0, help="run this many steps (compile included) and exit")
    parser.add_argument("--warmup", type=int, default=5, help="steps after the compiling one (--serve)")
    parser.add_argument("--x64", action="store_true", help="float64 (jax_enable_x64)")
    args = parser.parse_args(argv)
    if args.serve == bool(args.steps):
        parser.error("give exactly one of --serve and --steps N")

    t0 = time.perf_counter()
    import jax

    jax.config.update("jax_platforms", "cpu")
    if args.x64:
        jax.config.update("jax_enable_x64", True)
    import numpyro
    from numpyro.infer import SVI, Trace_ELBO

    import_s = time.perf_counter() - t0

    data = dict(np.load(args.data))
    dtype = np.float64 if args.x64 else np.float32
    data = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in data.items()}
    t_build = time.perf_counter()
    model, guide, batches = build(args.case, data)
    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), Trace_ELBO())

    t0 = time.perf_counter()
    state = svi.init(jax.random.PRNGKey(0), *batches[0])
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    update = jax.jit(svi.update)

    t0 = time.perf_counter()
    state, loss = update(state, *batches[0])
    loss = float(loss)
    compile_s = time.perf_counter() - t0  # tracing, lowering, XLA compilation and one step
    i = 0

    def run(n: int):
        nonlocal state, i
        value = float("nan")
        for _ in range(n):
            i = (i + 1) % len(batches)
            state, loss = update(state, *batches[i])
            value = float(loss)
        return value

    info = {
        "import_s": import_s,
        "init_s": init_s,
        "compile_s": compile_s,
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
    }
    if args.steps:
        last = run(args.steps - 1) if args.steps > 1 else loss
        # steps_s: from building the SVI object to the last step (init and compilation included)
        info.update(steps=args.steps, steps_s=time.perf_counter() - t_build, process_s=time.perf_counter() - T_PROCESS)
        info.update(first_loss=loss, loss=last)
        print(json.dumps(info), flush=True)
        return 0

    run(args.warmup)
    print(json.dumps(dict(info, ready=True)), flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        n = int(line)
        c0, t0 = time.process_time(), time.perf_counter()
        value = run(n)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"wall_s": wall, "cpu_s": cpu, "loss": value}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
