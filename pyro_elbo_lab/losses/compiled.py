# SPDX-License-Identifier: Apache-2.0
"""
Compiled variants of the β-ELBO losses: the model/guide pass, the objective and the
decomposition record are traced once and the compiled function is reused on every later
step. This module owns what every compiler shares (the traced step, the cache and its key,
the public classes); each compiler is a :class:`~.compile_strategy.CompileStrategy` in its
own module, chosen by ``compiler=``:

* ``"torchscript"`` (default, :mod:`.torchscript`): :func:`torch.jit.trace`, as Pyro's
  :class:`~pyro.infer.JitTrace_ELBO`; compiles in about a second.
* ``"inductor"`` (:mod:`.inductor`): the step (forward pass *and* the gradients, as one
  graph of aten ops from :func:`torch.fx.experimental.proxy_tensor.make_fx`) compiled to
  fused C++ by :func:`torch.compile`'s inductor backend; seconds to compile, then 1.5–2
  times faster per step than TorchScript on the benchmark models (``benchmarks/RESULTS.md``).

The plumbing follows :func:`pyro.ops.jit.trace` (parameters are passed to the traced
function as unconstrained leaf tensors and replayed into the model and guide), with three
differences that matter here:

* the compiled function is cached per ``(model, guide, kwargs, argument shapes and
  dtypes, default dtype)`` and reused while the parameters keep their shapes and dtypes;
  Pyro 1.9.2's :class:`~pyro.infer.JitTraceMeanField_ELBO` stores its compiled function
  under one attribute and looks it up under another, so it re-traces on every step;
* β and the capacity C(t) are inputs of the traced function, not constants baked into the
  trace, so schedules run without recompiling;
* the first call of each cached function is evaluated eagerly (that pass also records
  which parameters the model and guide use) and the random-number state is restored
  after tracing, so the sequence of losses is the same as that of the uncompiled class
  for the same seed.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.util import ignore_jit_warnings

from ..terms import TermsRecord
from .beta_elbo import BetaELBO
from .beta_mean_field_elbo import BetaMeanFieldELBO
from .beta_state import BetaState
from .compile_strategy import CompiledFunction, CompileStrategy, freeze_kwargs, tensor_signature
from .inductor import InductorStrategy
from .torchscript import TorchScriptStrategy

__all__ = ["COMPILERS", "JitBetaELBO", "JitBetaMeanFieldELBO"]

#: the compilers a compiled loss accepts (``compiler=``), each a strategy class
STRATEGIES: dict[str, type[CompileStrategy]] = {s.name: s for s in (TorchScriptStrategy, InductorStrategy)}
COMPILERS = tuple(STRATEGIES)


def _unconstrained(name: str) -> torch.Tensor:
    """
    The unconstrained leaf tensor of parameter ``name``, read through :func:`pyro.param` (so
    that :class:`pyro.infer.SVI`, which records the ``param`` sites of a step, sees it).
    """
    return pyro.param(name).unconstrained()  # type: ignore[attr-defined]  # Pyro attaches it to the value


class CompiledObjective(BetaState):
    """
    Mixin over a loss with the ``_run(model, guide, args, kwargs, mode)`` contract of
    :class:`~pyro_elbo_lab.losses.objective.WeightedObjective` (and of
    :class:`~pyro_elbo_lab.BetaTraceEnumELBO`) that replaces ``_run`` (the particle loop) by a
    compiled function, made and run by the :class:`~.compile_strategy.CompileStrategy` named
    by ``compiler``; what is compiled is :meth:`_compiled_step`. For loss authors; users take
    :class:`JitBetaELBO`, :class:`JitBetaMeanFieldELBO` or
    :class:`~pyro_elbo_lab.losses.compiled_enum.JitBetaTraceEnumELBO`.
    """

    # provided by the Pyro ELBO the mixin is combined with
    num_particles: int
    jit_options: dict | None
    ignore_jit_warnings: bool
    retain_graph: bool | None
    _get_traces: Callable[..., Iterator[tuple]]
    _particle: Callable[..., tuple]

    #: number of traces made so far (for tests and benchmarks: it must not grow per step)
    num_compilations: int

    #: wall-clock seconds spent tracing and compiling so far (inductor: including the first
    #: call of each compiled function, which is when it compiles)
    compile_seconds: float

    #: the uncompiled class this one compiles (named in errors)
    _uncompiled: type

    def __init__(self, *args: Any, compiler: str = "torchscript", **kwargs: Any) -> None:
        if compiler not in STRATEGIES:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {compiler!r}.")
        self.compiler = compiler
        super().__init__(*args, **kwargs)
        self._strategy = STRATEGIES[compiler](type(self).__name__, self._uncompiled.__name__, self.jit_options)
        self._compiled: dict = {}
        self.num_compilations = 0
        self.compile_seconds = 0.0

    def __getstate__(self) -> dict:
        # Copies and pickles (the runner deep-copies the loss per chain) leave the compiled
        # functions out (a ScriptFunction cannot be pickled); the copy compiles at its next call.
        parent = getattr(super(), "__getstate__", None)
        state = dict(parent() if parent is not None else self.__dict__)
        state["_compiled"] = {}
        return state

    def _cache_key(self, model: Callable, guide: Callable, args: tuple, kwargs: dict, mode: str) -> tuple:
        for i, arg in enumerate(args):
            if not torch.is_tensor(arg):
                raise ValueError(
                    f"{type(self).__name__} passes positional arguments to the compiled function as tensors, "
                    f"but argument {i} is a {type(arg).__name__} ({arg!r}). Pass tensors positionally and "
                    "everything else as keyword arguments (each distinct keyword value compiles once)."
                )
        for name, value in kwargs.items():
            if torch.is_tensor(value):
                raise ValueError(
                    f"{type(self).__name__} freezes keyword arguments into the compiled function, but keyword "
                    f"argument {name!r} is a tensor (it would be compiled in as a constant, once per tensor "
                    "object). Pass tensors positionally."
                )
        # the model and guide themselves, not their ids: a bound method (vae.model) is a new
        # object at every attribute access but compares equal, and holding them in the key
        # keeps an id from being reused by another function. The default dtype: constants
        # the model creates (torch.tensor(1.3), distribution parameters) are traced in it.
        return (
            model,
            guide,
            torch.get_default_dtype(),
            tensor_signature(args),
            freeze_kwargs(kwargs),
        ) + self._strategy.cache_key(args, mode)

    def _traced_body(self, model: Callable, guide: Callable, kwargs: dict, holder: dict) -> Callable:
        """The Python function that is traced: ``(beta, capacity, *args) -> (loss, surrogate, record)``."""

        def body(beta: torch.Tensor, capacity: torch.Tensor | None, *args: torch.Tensor) -> tuple:
            loss, surrogate, names, values = self._compiled_step(model, guide, args, kwargs, beta, capacity)
            holder["names"] = names
            return loss, surrogate, values

        return body

    def _compiled_step(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        beta: torch.Tensor,
        capacity: torch.Tensor | None,
    ) -> tuple:
        """
        What is compiled: the particle loop of the uncompiled class, as
        ``(loss, surrogate, names, values)``: the loss (0-dim, ``-objective`` averaged over
        particles), a tensor whose gradient is the loss's, the record's names and values
        (terms × particles). This one runs :class:`~.objective.WeightedObjective`'s
        ``_get_traces`` and ``_particle``.
        """
        loss: torch.Tensor | None = None
        surrogate = None
        records = []
        names = None
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            objective_p, surrogate_p, names_p, record_p = self._particle(model_trace, guide_trace, beta, capacity)
            loss_p = -objective_p.sum() / self.num_particles
            loss = loss_p if loss is None else loss + loss_p
            if torch.is_tensor(surrogate_p):
                surrogate_p = -surrogate_p.sum() / self.num_particles
                surrogate = surrogate_p if surrogate is None else surrogate + surrogate_p
            if names is None:
                names = names_p
            elif names_p != names:
                missing = [n for n in names if n not in names_p]
                extra = [n for n in names_p if n not in names]
                raise ValueError(
                    f"{type(self).__name__} needs a model and guide with static structure, but sequential "
                    f"particles visited different sites (missing: {missing}; new: {extra}). "
                    f"Use {self._uncompiled.__name__}, whose particles may differ."
                )
            records.append(record_p)
        assert loss is not None
        values = records[0] if len(records) == 1 else torch.stack(records, -1)
        if values.dim() == 1:
            values = values.unsqueeze(-1)
        if surrogate is None:
            surrogate = torch.zeros_like(loss)
        return loss, surrogate, names, values

    def _eager(self, model, guide, args, kwargs, beta_t, capacity_t):
        """
        Evaluate the step eagerly, as the uncompiled loss does (same random draws; creates
        missing parameters). Returns the outputs ``(loss, surrogate, values)``, the names
        of the rows of ``values``, the names of the parameters used, and the step.
        """
        holder: dict = {}
        body = self._traced_body(model, guide, kwargs, holder)
        with poutine.trace(param_only=True) as capture:
            outputs = body(beta_t, capacity_t, *args)
        return outputs, holder["names"], list(capture.trace.nodes), body

    def _compile(
        self,
        key: tuple,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        beta_t: torch.Tensor,
        capacity_t: torch.Tensor | None,
        mode: str,
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], CompiledFunction]:
        """
        Evaluate eagerly (recording which parameters are used), then trace; returns the
        eager outputs, which are those of the uncompiled loss for the same seed, and the
        compiled function (also cached under ``key``).
        """
        start = time.perf_counter()
        outputs, names, param_names, body = self._eager(model, guide, args, kwargs, beta_t, capacity_t)
        has_capacity = capacity_t is not None

        def traced(beta, capacity, *params_and_args):
            params = params_and_args[: len(param_names)]
            inputs = params_and_args[len(param_names) :]
            constrained = {}
            for name, leaf in zip(param_names, params):
                value = pyro.param(name)
                assert value.unconstrained() is leaf  # type: ignore[attr-defined]
                constrained[name] = value
            return poutine.replay(body, params=constrained)(beta, capacity if has_capacity else None, *inputs)

        if self.ignore_jit_warnings:
            # as pyro.ops.jit.trace: the filter must be entered inside the traced function
            # (ignore_jit_warnings installs it only while a trace is being recorded)
            traced = ignore_jit_warnings()(traced)
        if capacity_t is None:
            capacity_t = torch.zeros_like(beta_t)
        params = tuple(_unconstrained(n) for n in param_names)
        example = (beta_t, capacity_t) + params + tuple(args)
        devices = sorted({t.device.index or 0 for t in example if t.is_cuda})
        # restore every random state tracing consumed (CPU and the CUDA devices in use), so
        # that the losses are those of the uncompiled class for the same seed
        with torch.random.fork_rng(devices=devices):
            with pyro.validation_enabled(False), torch.enable_grad(), warnings.catch_warnings():
                compiled = self._strategy.compile(traced, example, len(param_names), names, mode)
        compiled.param_names = param_names
        compiled.param_signature = tensor_signature(params)
        self._compiled[key] = compiled
        self.num_compilations += 1
        self.compile_seconds += time.perf_counter() - start
        return outputs, compiled

    def gradient_graph(self, model: Callable, guide: Callable, args: tuple, kwargs: dict) -> CompiledFunction | None:
        """
        The recorded gradient graph of :meth:`loss_and_grads` for these arguments, for the
        fused training step (:class:`~pyro_elbo_lab.losses.fused.FusedSVI`), or ``None``
        when there is none yet (no :meth:`loss_and_grads` call with such arguments) or the
        compiler does not record one (TorchScript).

        :returns: a :class:`~.compile_strategy.CompiledFunction` whose ``info["graph"]`` is
            ``(beta, capacity, *params, *args) -> (loss, values, *grads)`` (parameters
            unconstrained, in the order of ``param_names``; gradients of the parameters
            at ``info["grad_index"]``).
        """
        compiled = self._compiled.get(self._cache_key(model, guide, args, kwargs, "backward"))
        if compiled is None or compiled.info.get("graph") is None:
            return None
        return compiled

    def record_step(
        self, compiled: CompiledFunction, values: torch.Tensor, beta: float, capacity: float | None
    ) -> None:
        """
        Record the terms of a gradient step that ran outside :meth:`loss_and_grads` (the
        fused training step) and count it, as :meth:`loss_and_grads` does.

        :param compiled: what :meth:`gradient_graph` returned.
        :param torch.Tensor values: the graph's recorded values (terms × particles).
        :param float beta: β of the step (:meth:`current_beta` before it).
        :param capacity: C(t) of the step, or ``None``.
        """
        self._last_record = TermsRecord(compiled.names, values, beta, capacity)
        self._advance_step()

    def _run(self, model: Callable, guide: Callable, args: tuple, kwargs: dict, mode: str) -> tuple:
        beta = self.current_beta()
        # BetaState.current_capacity is annotated -> None; WeightedObjective's returns float | None
        current_capacity: Callable[[], float | None] = self.current_capacity
        capacity = current_capacity()
        key = self._cache_key(model, guide, args, kwargs, mode)
        dtype = torch.get_default_dtype()
        beta_t = torch.tensor(beta, dtype=dtype)
        capacity_t = torch.tensor(0.0 if capacity is None else capacity, dtype=dtype)
        capacity_in = None if capacity is None else capacity_t
        compiled: CompiledFunction | None = self._compiled.get(key)
        params: tuple | None = None
        if compiled is not None:
            try:
                # pyro.param here (not inside the compiled function) so that SVI sees the parameters
                params = tuple(_unconstrained(name) for name in compiled.param_names)
            except KeyError:
                pass  # the parameter store was cleared
        if compiled is not None and params is None:
            # an eager pass re-creates the parameters (with their init values and the random
            # draws of the uncompiled loss); the compiled function is reused from the next
            # call if they have the shapes and dtypes it was made for
            (loss, surrogate, values), names, param_names, _ = self._eager(
                model, guide, args, kwargs, beta_t, capacity_in
            )
        else:
            if compiled is not None and tensor_signature(params or ()) != compiled.param_signature:
                compiled = None  # a parameter was re-created with another shape, dtype or device
            if compiled is None:
                (loss, surrogate, values), compiled = self._compile(
                    key, model, guide, args, kwargs, beta_t, capacity_in, mode
                )
            else:
                assert params is not None
                inputs = (beta_t, capacity_t) + params + tuple(args)
                loss, surrogate, values, seconds = self._strategy.run(compiled, inputs, params, mode)
                self.compile_seconds += seconds
            names, param_names = compiled.names, compiled.param_names
        differentiable = torch.is_tensor(surrogate) and surrogate.requires_grad
        if mode == "backward" and param_names and differentiable:
            surrogate.backward(retain_graph=self.retain_graph)
            surrogate = 0.0
        elif mode != "differentiable" or not differentiable:
            surrogate = 0.0
        self._last_record = TermsRecord(names, values.detach(), beta, capacity)
        return loss.detach(), surrogate


#: the limits of compilation, shared by the compiled losses' docstrings
COMPILE_LIMITS = """
    **Limits of compilation** (those of :class:`pyro.infer.JitTrace_ELBO`, plus what
    recompiles):

    * The model and guide must have static structure: the same sites, plates, shapes and
      control flow on every call. Python branches on tensor values, data-dependent
      ``pyro.plate`` sizes and sequential particles that visit different sites are frozen
      at the first call (sequential particles that differ raise ``ValueError``).
    * Positional arguments must be tensors (they are inputs of the compiled function);
      anything else goes in keyword arguments (a tensor keyword argument raises
      ``ValueError``: it would be frozen in as a constant). Every distinct keyword value, every new
      ``(model, guide)`` pair, every new shape, dtype or device of a positional
      tensor, and every new default dtype (:func:`torch.set_default_dtype`: constants the
      model creates are traced in it) compiles once more (so the smaller last minibatch of
      an epoch compiles once, and is then reused). Global data read from a closure is frozen at compile time, and
      so are the random indices of a subsampling ``pyro.plate(..., subsample_size=...)``:
      scale minibatches passed in as arguments with ``poutine.scale`` instead.
    * All parameters must exist after the first call (``pyro.param`` calls that appear
      later are not seen). After :func:`pyro.clear_param_store`, one eager call
      re-creates the parameters; a parameter re-created with another shape, dtype or
      device compiles once more. β and the capacity are inputs, so schedules never recompile;
      ``free_bits``, ``gamma``, ``sites``, ``num_particles``, ``vectorize_particles`` and
      ``max_plate_nesting`` are compiled in (they are fixed per loss object anyway).
    * Compiled steps run no Python in the model or guide: validation checks
      (``pyro.enable_validation``) run at the first call only, and Python side effects in
      the model (printing, appending to lists) happen only at the first call and while
      tracing.
    * The first call of each compiled function is evaluated eagerly, then traced; the
      random-number state is restored after tracing so that losses are those of the
      uncompiled class for the same seed.
    * With ``compiler="torchscript"``, graphs of up to 5000 nodes run through
      TorchScript's optimising executor (two profiling runs, then one differentiable
      graph with a faster backward); larger ones (e.g. dozens of unrolled sequential
      particles) run as recorded, since optimising them takes minutes. Prefer
      ``vectorize_particles=True``. :func:`torch.jit.trace` is marked deprecated in recent
      torch releases (the deprecation warning is silenced here).
    * With ``compiler="inductor"``, the training step (:meth:`loss_and_grads`) is one graph
      of aten ops, forward pass and gradients together, recorded by
      :func:`~torch.fx.experimental.proxy_tensor.make_fx` and compiled to fused C++ by
      :func:`torch.compile` (inductor backend, :func:`~.inductor.compile_graph`: random
      draws from the eager random stream, Bernoulli sites in float64 included). :meth:`loss`, :meth:`decompose` and
      :meth:`differentiable_loss` record a second, forward-only graph, compiled once for
      calls without gradients and once for calls with them. Each compilation takes seconds
      (0.3–15 s for the benchmark models on two CPU cores, depending on the size of the
      graph and on inductor's on-disk cache of earlier compilations) and is paid once per graph,
      at its first call after the eager one. It needs a C++ compiler on CPU (Triton on GPU);
      a failed compilation raises ``RuntimeError``. Python reads of values computed from
      the inputs or from random draws (``.item()``, ``if tensor:``) cannot be recorded and
      raise ``ValueError`` instead of being frozen (reads of constant tensors are frozen).
      The gradient graph differentiates with respect to Pyro parameters only: a tensor that
      requires grad but is not in the parameter store (a module not registered with
      :func:`pyro.module`, a positional argument) raises ``ValueError``.
      Sums are fused, so losses equal the uncompiled ones to rounding (relative 1e-15 in
      float64), not bit for bit. Sequential particles are unrolled into the graph, so its
      compile time grows with ``num_particles``: prefer ``vectorize_particles=True``.
    * Which to use: the inductor step is 1.5–2 times faster than TorchScript's on the
      benchmark models (``benchmarks/RESULTS.md``) and pays for its compile time after a
      few thousand steps; TorchScript compiles in about a second and needs no C++
      toolchain.

    :attr:`num_compilations` counts the graphs recorded so far and
    :attr:`compile_seconds` the seconds spent recording them and, with inductor,
    compiling them (the calls that compiled, once per graph and grad mode).
"""


class JitBetaELBO(CompiledObjective, BetaELBO):
    __doc__ = (
        """
    :class:`~pyro_elbo_lab.BetaELBO`, compiled: the same objective, gradient estimator and
    decomposition (``last_terms`` is filled from the compiled function's outputs), with
    the model/guide pass compiled once and reused, which removes Pyro's per-step Python
    overhead. Takes the arguments of :class:`~pyro_elbo_lab.BetaELBO`, and
    ``ignore_jit_warnings`` and ``jit_options`` as :class:`pyro.infer.JitTrace_ELBO`
    (``ignore_jit_warnings=True`` silences :class:`torch.jit.TracerWarning` while the step
    is traced; ``jit_options`` go to :func:`torch.jit.trace`; neither affects
    ``compiler="inductor"``, whose recording raises instead of warning).

    :param str compiler: ``"torchscript"`` (default; :func:`torch.jit.trace`, as
        :class:`pyro.infer.JitTrace_ELBO`, compiles in about a second) or ``"inductor"``
        (the whole step, gradients included, compiled by :func:`torch.compile`: the
        fastest step, at a compile cost of seconds; see the limits below).

    .. math::

        \\mathcal{L}_\\beta = \\mathbb{E}_{q(z)}[\\log p(x \\mid z)]
            - \\beta \\, \\mathbb{E}_{q(z)}[\\log q(z) - \\log p(z)]   \\quad\\text{(nats)}
"""
        + COMPILE_LIMITS
        + """
    :raises ValueError: as :class:`~pyro_elbo_lab.BetaELBO`; for an unknown ``compiler``;
        for a positional argument that is not a tensor or a tensor keyword argument; with
        ``compiler="inductor"``, for a model or guide that reads tensor values in Python or
        uses a tensor that requires grad outside the parameter store.
    :raises RuntimeError: with ``compiler="inductor"``, when inductor fails to compile.

    Example::

        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
                             JitBetaELBO(beta=LinearWarmup(1000)))
        for batch in batches:
            svi.step(batch)          # compiled on the first step, reused afterwards
        print(svi.loss.last_terms)

        # a long run: the fused step, compiled once in seconds
        loss = JitBetaELBO(beta=LinearWarmup(1000), compiler="inductor")

    References

    [1] `beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework`,
        Irina Higgins et al. (2017)

    [2] `Pyro: Deep Universal Probabilistic Programming`, Eli Bingham, Jonathan P. Chen,
        Martin Jankowiak, Fritz Obermeyer, Neeraj Pradhan, Theofanis Karaletsos, Rohit
        Singh, Paul Szerlip, Paul Horsfall, Noah D. Goodman (2019)
    """
    )

    _uncompiled = BetaELBO


class JitBetaMeanFieldELBO(CompiledObjective, BetaMeanFieldELBO):
    __doc__ = (
        """
    :class:`~pyro_elbo_lab.BetaMeanFieldELBO`, compiled: analytic KL where registered, the
    same objective and decomposition, with the model/guide pass compiled once and reused
    (``compiler="torchscript"`` or ``"inductor"``, as in
    :class:`~pyro_elbo_lab.JitBetaELBO`). Unlike Pyro 1.9.2's
    :class:`~pyro.infer.JitTraceMeanField_ELBO`, which re-traces on every step, the
    compiled function is kept.

    .. math::

        \\mathcal{L}_\\beta = \\mathbb{E}_{q(z)}[\\log p(x \\mid z)]
            - \\beta \\sum_s \\mathrm{KL}(q(z_s) \\,\\|\\, p(z_s))   \\quad\\text{(nats)}
"""
        + COMPILE_LIMITS
        + """
    :param str compiler: ``"torchscript"`` (default) or ``"inductor"``; see
        :class:`~pyro_elbo_lab.JitBetaELBO`.
    :raises ValueError: as :class:`~pyro_elbo_lab.BetaMeanFieldELBO`; and as
        :class:`~pyro_elbo_lab.JitBetaELBO`.
    :raises RuntimeError: with ``compiler="inductor"``, when inductor fails to compile.

    References

    [1] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (2014)

    [2] `Pyro: Deep Universal Probabilistic Programming`, Eli Bingham et al. (2019)
    """
    )

    _uncompiled = BetaMeanFieldELBO
