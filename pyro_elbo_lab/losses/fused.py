# SPDX-License-Identifier: Apache-2.0
"""
The fused training step: the gradient graph of ``JitBetaELBO(compiler="inductor")`` (or
``JitBetaMeanFieldELBO``) and the optimiser's update compiled together as ONE
:func:`torch.compile` graph, driven by :class:`FusedSVI`, a drop-in for
:class:`pyro.infer.SVI`.

Pyro's optimisers (:class:`~pyro.optim.PyroOptim`) keep one torch optimiser per parameter
and step them one by one in Python, outside any compiled graph: on a small model that costs
more than the compiled loss itself. Here the update of each parameter is written out in
torch ops inside the graph, reading and writing the very state tensors of those torch
optimisers (``exp_avg``, ``exp_avg_sq``, ``step``, ``momentum_buffer``) in place, so
``optim.get_state()`` / ``set_state()`` (and the runner's checkpoints) work unchanged and a
run can move between :class:`pyro.infer.SVI` and :class:`FusedSVI` at any step.

Imports torch, pyro, :mod:`.compiled`, :mod:`.compile_strategy`, :mod:`.fused_optim` (the
optimisers' updates in torch ops), :mod:`.inductor` (:func:`~.inductor.compile_graph`) and
:mod:`.pyro_optim` (the one home of the Pyro-private optimiser names it needs) only.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam as TorchClippedAdam
from pyro.optim.optim import is_scheduler
from pyro.util import warn_if_nan

from .beta_trace_enum_elbo import BetaTraceEnumELBO
from .compile_strategy import CompiledFunction, tensor_signature
from .compiled import CompiledObjective
from .fused_optim import FUSED_OPTIMIZERS, OPTIMIZER_CONFIGS, fused_update, restore_host_state, step_rates
from .inductor import compile_graph
from .pyro_optim import restore_waiting_optimizers

__all__ = ["FusedSVI", "FusedStep", "unfusable_reason"]

# compiled fused steps, per recorded gradient graph (shared by every FusedSVI using the same
# loss object, model, guide and argument shapes; a deep copy of the loss, e.g. the runner's
# chains, records and compiles its own) and per optimiser configuration
_FUSED: weakref.WeakKeyDictionary[CompiledFunction, dict] = weakref.WeakKeyDictionary()
# at most this many optimiser configurations per gradient graph (the least recently used is dropped)
_MAX_CONFIGS = 16
# the fused steps whose first call (the one that compiles) has completed: a first call that
# failed or was interrupted compiles again at the next step, and is timed again
_COMPILED: weakref.WeakSet[Callable] = weakref.WeakSet()


def unfusable_reason(optim: object, loss: object) -> str | None:
    """
    Why ``optim`` and ``loss`` cannot be fused into one training step, or ``None`` when
    they can (the checks of :class:`FusedSVI` at construction; optimiser settings such as
    Adam's ``amsgrad`` are checked at the first fused step).

    :returns: a sentence that names the argument, what was found and the fix, or ``None``.
    :rtype: str or None
    """
    if isinstance(loss, BetaTraceEnumELBO):
        return (
            f"does not fuse {type(loss).__name__} (enumerated sites: its gradient graph is not recorded for "
            f"fusion), got loss={loss!r}. Use pyro.infer.SVI with it, or JitBetaELBO(compiler='inductor') / "
            "JitBetaMeanFieldELBO(compiler='inductor') for a model without enumerated sites."
        )
    if not isinstance(loss, CompiledObjective) or loss.compiler != "inductor":
        return (
            "fuses the gradient graph of JitBetaELBO(compiler='inductor') or "
            f"JitBetaMeanFieldELBO(compiler='inductor'), got loss={loss!r}. Pass such a loss."
        )
    if not isinstance(optim, PyroOptim):
        return f"needs a pyro.optim.PyroOptim, got optim={optim!r}. Wrap it, e.g. pyro.optim.Adam({{...}})."
    constructor = optim.pt_optim_constructor
    if constructor not in OPTIMIZER_CONFIGS:
        supported = ", ".join(c.__name__ for c in FUSED_OPTIMIZERS)
        return (
            f"fuses the updates of {supported} (and Pyro's learning-rate schedulers around them), but optim "
            f"wraps {getattr(constructor, '__name__', constructor)}. Use one of those."
        )
    if optim.pt_clip_args:
        return (
            f"does not fuse gradient clipping by clip_args, got clip_args={optim.pt_clip_args!r}. "
            "Use pyro.optim.ClippedAdam (per-element clip_norm, fused)."
        )
    return None


def _make_fused(
    graph: Callable, grad_index: list[int], configs: tuple, scalar_params: tuple, scalar_states: tuple
) -> Callable:
    def fused(hyper, rates, params, states, args):
        # 0-dim tensors come in as 1-element views (see FusedSVI._plan)
        params = [p.view(()) if s else p for p, s in zip(params, scalar_params)]
        states = [
            tuple(t.view(()) if s else t for t, s in zip(state, scalars))
            for state, scalars in zip(states, scalar_states)
        ]
        loss, values, *grads = graph(hyper[0], hyper[1], *params, *args)
        # the guard: [loss finite, gradient 0 finite, ...]; the update applies only if all are
        finite = torch.stack([torch.isfinite(loss)] + [torch.isfinite(g).all() for g in grads])
        ok = finite.all()
        for k, (i, grad) in enumerate(zip(grad_index, grads)):
            fused_update(configs[k], params[i], grad, states[k], rates[k], ok)
        # (loss, ok) in one tensor: the caller reads both with one synchronisation
        status = torch.stack([loss.detach(), ok.to(loss.dtype)])
        return status, values, finite

    # a code object of its own: dynamo keeps its compiled graphs, and counts recompilations
    # against its limit (8), per code object, so every fused step made in a process (chains,
    # restarts, other models) would otherwise share one count and the 9th would fail
    fused.__code__ = fused.__code__.replace()
    return compile_graph(fused)


@dataclass(frozen=True)
class FusedStep:
    """
    What one fused step did (:meth:`FusedSVI.fused_step`).

    :ivar float loss: the loss before the step (``-objective``, nats).
    :ivar bool finite: whether the loss and every gradient were finite, i.e. whether the
        update was applied (a non-finite step leaves the parameters and the optimiser's
        state exactly as they were).
    :ivar tuple params: the unconstrained parameters of the step (those of the gradient graph).
    :ivar list nonfinite_grads: names of the parameters whose gradient was not finite
        (empty for a finite step).
    """

    loss: float
    finite: bool
    params: tuple[torch.Tensor, ...]
    nonfinite_grads: list[str] = field(default_factory=list)


@dataclass
class _Plan:
    compiled: CompiledFunction
    fused: Callable
    params: tuple[torch.Tensor, ...]
    states: tuple[tuple[torch.Tensor, ...], ...]
    rates: list[float]
    compile_now: bool
    # ClippedAdam's Python-side state, as it was before this step (restored on a skipped step)
    host_state: list[tuple[dict, str, Any]]
    # the parameters themselves (``params`` holds 1-element views of the 0-dim ones)
    originals: tuple[torch.Tensor, ...]


@dataclass
class _Last:
    """What :meth:`FusedSVI._plan` found at the last fused step, and the checks that it still holds."""

    compiled: CompiledFunction
    fused: Callable
    params: tuple[torch.Tensor, ...]
    # the optimiser objects of the parameter store's tensors (schedulers included), the
    # torch optimisers, their state dicts and first param groups (load_state_dict replaces
    # both; held here, compared by identity)
    objs: tuple
    optimizers: tuple
    state_dicts: tuple
    groups: tuple
    grad_index: tuple[int, ...]
    configs: tuple
    views: tuple[torch.Tensor, ...]
    state_views: tuple[tuple[torch.Tensor, ...], ...]
    # (tensor, its 1-element view) of every 0-dim input: the view must still share the
    # tensor's storage (``param.data = ...`` gives the tensor a new one)
    view_pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    # per updated parameter: its state's keys and tensors, as the fused graph updates them
    state_tensors: tuple[tuple[tuple[str, torch.Tensor], ...], ...]


def _input_views(
    params: tuple[torch.Tensor, ...], states: tuple[tuple[torch.Tensor, ...], ...]
) -> tuple[tuple[torch.Tensor, ...], tuple[tuple[torch.Tensor, ...], ...]]:
    """
    The fused graph's inputs: 0-dim parameters and state tensors as 1-element views (dynamo,
    torch 2.13, traces 0-dim inputs as symbolic floats, restarts its analysis to specialise
    them, and the restarted trace drops the in-place updates of the inputs). Views of a
    ``detach()``: a view of a parameter would be a non-leaf that requires grad (whose
    ``.grad`` dynamo reads, with a warning), and one made under no_grad, once its base has
    been updated in place, fails dynamo's next recompilation (``torch._dynamo.reset()``, a
    changed global state). Kept from step to step (new view objects cost the compiled call
    its input checks again, about 0.04 ms a step) while they share their tensor's storage.
    """
    views = tuple(p.detach().view(1) if p.dim() == 0 else p for p in params)
    state_views = tuple(tuple(t.detach().view(1) if t.dim() == 0 else t for t in state) for state in states)
    return views, state_views


def _unchanged(last: _Last, named: dict, optim_objs: dict) -> bool:
    """Whether the parameters, their optimisers and the optimisers' state are the objects of ``last``."""
    names = last.compiled.param_names
    if len(named) < len(names):
        return False
    # the same objects, but ``param.data = ...`` may have given one another shape or dtype
    if tensor_signature(last.params) != last.compiled.param_signature:
        return False
    for name, param, obj in zip(names, last.params, last.objs):
        if named.get(name) is not param or optim_objs.get(param) is not obj:
            return False
    for optimizer, state_dict, group in zip(last.optimizers, last.state_dicts, last.groups):
        if optimizer.state is not state_dict or optimizer.param_groups[0] is not group:
            return False
    for i, tensors in zip(last.grad_index, last.state_tensors):
        state = last.optimizers[i].state.get(last.params[i])
        if state is None or any(state.get(key) is not t for key, t in tensors):
            return False
    # ``param.data = ...``: the same object with new storage, which the kept view does not see
    return all(view.data_ptr() == t.data_ptr() for t, view in last.view_pairs)


def _restore_host_state(plan: _Plan) -> None:
    """Put back ClippedAdam's Python-side learning rate and step count as they were before ``plan``."""
    restore_host_state(plan.host_state)


class FusedSVI(SVI):
    """
    :class:`pyro.infer.SVI` whose step (forward pass, recorded terms, gradients and the
    optimiser's update) runs as one compiled graph. Same arguments, same
    :meth:`step` (returns the loss, fills ``loss.last_terms``, advances ``loss``'s β
    schedule), same random stream, and the same losses, parameters and optimiser state as
    ``SVI(model, guide, optim, loss)`` for the same seed, to float rounding.

    The first step with new arguments (shapes, dtypes, keyword values), new parameters, or
    parameters the optimiser has no state for (a fresh optimiser) runs as
    :class:`pyro.infer.SVI` does; it records the gradient graph and creates the torch
    optimisers. After ``optim.set_state`` (a checkpoint), the optimisers are made from the
    restored state without that unfused step. The next step compiles the fused graph
    (seconds; once per recorded gradient graph, i.e. per loss object, model, guide,
    argument shapes, and per optimiser settings) and later steps run it. Only
    ``FusedSVI`` objects sharing one loss object share the compiled graph; the runner's
    chains each deep-copy the loss and compile their own (the second hits inductor's
    on-disk cache, at about a warm compile's cost).

    Supported optimisers (``optim``): ``pyro.optim.Adam`` (without ``amsgrad``,
    ``maximize``), ``pyro.optim.ClippedAdam``, ``pyro.optim.SGD`` (momentum, dampening,
    weight decay, Nesterov), and Pyro's learning-rate schedulers around them
    (``pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam, ...})``; call their
    ``step()`` as with SVI). The learning rate (and ClippedAdam's decayed rate) is an input
    of the graph, so schedules never recompile. The state is the torch optimisers' own
    (``exp_avg``, ``exp_avg_sq``, ``step``, ``momentum_buffer``), updated in place:
    ``optim.get_state()`` / ``set_state()`` round-trip as with SVI. Not fused (``ValueError``
    at construction): other optimisers, ``clip_args``; use :class:`pyro.infer.SVI`.
    Parameters' ``.grad`` are not written by fused steps (SVI zeroes them after each step).

    **Non-finite steps.** The graph computes a flag, the loss and every gradient finite,
    and applies the update and the optimiser-state changes (Adam's step count included)
    only where it holds (``torch.where`` inside the graph: no host synchronisation within
    the step): a step with a NaN or infinite loss or gradient leaves the parameters and
    the state bit for bit as they were (as NumPyro's ``stable_update``), where
    :class:`pyro.infer.SVI` would write NaN into them. :meth:`fused_step` reports the
    flag; :class:`~pyro_elbo_lab.runner.SVIRunner` ``(fused=True)`` uses it for
    ``on_nonfinite``.

    :param model: the model.
    :param guide: the guide.
    :param pyro.optim.PyroOptim optim: a supported Pyro optimiser.
    :param loss: ``JitBetaELBO(compiler="inductor")`` or ``JitBetaMeanFieldELBO(compiler="inductor")``.
    :raises ValueError: for another loss or compiler, an unsupported optimiser, or ``clip_args``.

    Optimiser settings other than the learning rate (``betas``, ``eps``, ``weight_decay``,
    ``momentum``, ``dampening``, ``nesterov``, ``clip_norm``, ``centered_variance``) are constants
    of the graph: a schedule of one of them compiles a graph per new value (the last 16 per
    gradient graph are kept).

    Attributes: :attr:`compile_seconds` (seconds spent in the first call of each fused
    graph, i.e. compiling it; a first call that failed or was interrupted is timed again
    at the next; a recompilation dynamo starts on its own, e.g. after
    ``torch._dynamo.reset()``, is not counted),
    :attr:`num_fused_steps` and :attr:`num_unfused_steps`.
    """

    def __init__(self, model: Callable, guide: Callable, optim: PyroOptim, loss: CompiledObjective, **kwargs: Any):
        reason = unfusable_reason(optim, loss)
        if reason is not None:
            raise ValueError(f"FusedSVI {reason} Use pyro.infer.SVI otherwise.")
        super().__init__(model, guide, optim, loss, **kwargs)
        #: the loss object (SVI keeps only its bound methods, as ``self.loss`` and ``self.loss_and_grads``)
        self.elbo = loss
        self.compile_seconds = 0.0
        self.num_fused_steps = 0
        self.num_unfused_steps = 0
        # what the last fused step was planned with (see _plan)
        self._last: _Last | None = None

    def step(self, *args: Any, **kwargs: Any) -> float:
        """
        Take one gradient step. A step whose loss or gradients are not finite is not
        applied (the parameters and the optimiser's state keep their exact values; Pyro's
        NaN warning is issued); :class:`pyro.infer.SVI` would apply it.

        :returns: the loss (``-objective`` in nats) before the step.
        :rtype: float
        """
        outcome = self.fused_step(*args, **kwargs)
        if outcome is None:
            self.num_unfused_steps += 1
            return float(super().step(*args, **kwargs))
        if not math.isfinite(outcome.loss):
            warn_if_nan(torch.tensor(outcome.loss), "loss")
        return outcome.loss

    def fused_step(self, *args: Any, **kwargs: Any) -> FusedStep | None:
        """
        One fused step, if this step can be fused; nothing is done and ``None`` returned
        when it cannot (the first step with new arguments or parameters, or parameters the
        optimiser has not seen: the caller runs the step unfused, e.g. by
        :meth:`pyro.infer.SVI.step`, which records the gradient graph and creates the
        optimisers). The step's update, optimiser state changes included, are applied
        only if the loss and every gradient are finite (decided inside the graph); the
        loss's terms are recorded and its step counter advanced either way, as
        :meth:`loss_and_grads` does. Reads the device once (the loss and the flag together).

        :returns: what the step did.
        :rtype: FusedStep or None
        """
        plan = self._plan(args, kwargs)
        if plan is None:
            return None
        loss = self.elbo
        beta = loss.current_beta()
        capacity = loss.current_capacity()
        hyper = torch.tensor([beta, 0.0 if capacity is None else capacity], dtype=torch.get_default_dtype())
        rates_t = torch.tensor(plan.rates, dtype=torch.float64)
        start = time.perf_counter()
        with torch.no_grad():
            try:
                if plan.compile_now:
                    with warnings.catch_warnings():
                        # inductor's own use of torch.jit APIs that torch >= 2.9 marks deprecated
                        warnings.filterwarnings(
                            "ignore", message=r".*torch\.jit\..* is deprecated", category=DeprecationWarning
                        )
                        status, values, finite = plan.fused(hyper, rates_t, plan.params, plan.states, args)
                else:
                    # no catch_warnings per step: entering it resets Python's warning
                    # registry (and costs about 0.02 ms); inductor's deprecation warnings come
                    # at its import, inside the compiling call above
                    status, values, finite = plan.fused(hyper, rates_t, plan.params, plan.states, args)
            except BaseException:
                # no update was applied (a compile error, an interrupt during the compile):
                # neither are ClippedAdam's decay and count, advanced by _plan
                _restore_host_state(plan)
                raise
        if plan.compile_now:
            self.compile_seconds += time.perf_counter() - start
            _COMPILED.add(plan.fused)
        loss.record_step(plan.compiled, values, beta, capacity)
        value, ok = status.tolist()
        self.num_fused_steps += 1
        params = plan.originals
        if ok:
            return FusedStep(float(value), True, params)
        _restore_host_state(plan)  # the update was not applied: neither are ClippedAdam's decay and count
        names = plan.compiled.param_names
        grad_index = plan.compiled.info["grad_index"]
        bad = [names[grad_index[k]] for k, f in enumerate(finite[1:].tolist()) if not f]
        return FusedStep(float(value), False, params, bad)

    def _plan(self, args: tuple, kwargs: dict) -> _Plan | None:
        """Everything a fused step needs, or ``None`` when this step must run unfused."""
        compiled = self.elbo.gradient_graph(self.model, self.guide, args, kwargs)
        if compiled is None:
            return None
        named = dict(pyro.get_param_store().named_parameters())
        last = self._last
        if last is not None and last.compiled is compiled and _unchanged(last, named, self.optim.optim_objs):
            # the same parameters, optimisers and optimiser state tensors as the last step
            # (a checkpoint's set_state, a new optimiser or a re-created parameter replaces
            # one of them): only what a step changes is read again, the learning rates and
            # the optimisers' settings; this path costs a third of the full one, and the
            # Python work before the compiled call slows the call itself (its weights leave
            # the CPU caches)
            configs, rates, host_state = step_rates(last.optimizers, last.params, last.grad_index)
            if configs == last.configs:
                compile_now = last.fused not in _COMPILED
                return _Plan(
                    compiled, last.fused, last.views, last.state_views, rates, compile_now, host_state, last.params
                )
            restore_host_state(host_state)  # settings changed: the full path below
        found = tuple(named.get(name) for name in compiled.param_names)
        if any(p is None for p in found):
            return None  # cleared or re-created parameters: the loss re-creates / recompiles
        params = tuple(p for p in found if p is not None)
        if tensor_signature(params) != compiled.param_signature:
            return None
        optim_objs = self.optim.optim_objs
        if not restore_waiting_optimizers(self.optim, params):
            return None  # not seen by the optimiser yet: SVI's path creates them
        optimizers = []
        for p in params:
            obj = optim_objs[p]
            optimizers.append(obj.optimizer if is_scheduler(obj) else obj)
        grad_index = tuple(compiled.info["grad_index"])
        for i in grad_index:
            optimizer = optimizers[i]
            kind = type(optimizer)
            if kind not in OPTIMIZER_CONFIGS:
                raise ValueError(f"FusedSVI cannot fuse {kind.__name__}; use pyro.infer.SVI.")
            state = optimizer.state[params[i]]
            needed = "momentum_buffer" if kind is torch.optim.SGD and optimizer.param_groups[0]["momentum"] else None
            needed = "exp_avg" if kind is not torch.optim.SGD else needed
            if needed is not None and state.get(needed) is None:
                # state the optimiser creates at its first step for this parameter (a
                # fresh optimiser, or a checkpoint taken before the parameter was updated)
                return None
        state_keys: list[tuple[str, ...]] = []
        for i in grad_index:
            optimizer = optimizers[i]
            kind = type(optimizer)
            if kind is torch.optim.Adam:
                state_keys.append(("exp_avg", "exp_avg_sq", "step"))
            elif kind is TorchClippedAdam:
                state_keys.append(("exp_avg", "exp_avg_sq"))
            else:
                state_keys.append(() if optimizer.param_groups[0]["momentum"] == 0 else ("momentum_buffer",))
        states = [tuple(optimizers[i].state[params[i]][key] for key in keys) for i, keys in zip(grad_index, state_keys)]
        configs, rates, host_state = step_rates(tuple(optimizers), params, grad_index)
        scalar_params = tuple(p.dim() == 0 for p in params)
        scalar_states = tuple(tuple(t.dim() == 0 for t in state) for state in states)
        key = (configs, scalar_states)
        cache = _FUSED.setdefault(compiled, {})
        fused = cache.pop(key, None)
        if fused is not None:
            cache[key] = fused  # the most recently used last: the oldest unused one is dropped first
        else:
            if len(cache) >= _MAX_CONFIGS:
                del cache[next(iter(cache))]
            graph = compiled.info["graph"]
            fused = cache[key] = _make_fused(graph, list(grad_index), configs, scalar_params, scalar_states)
        compile_now = fused not in _COMPILED
        views, state_views = _input_views(params, tuple(states))
        self._last = _Last(
            compiled,
            fused,
            params,
            tuple(optim_objs[p] for p in params),
            tuple(optimizers),
            tuple(o.state for o in optimizers),
            tuple(o.param_groups[0] for o in optimizers),
            grad_index,
            configs,
            views,
            state_views,
            tuple(
                (t, v)
                for t, v in zip(
                    params + tuple(t for s in states for t in s), views + tuple(v for s in state_views for v in s)
                )
                if t.dim() == 0
            ),
            tuple(tuple(zip(keys, state)) for keys, state in zip(state_keys, states)),
        )
        return _Plan(compiled, fused, views, state_views, rates, compile_now, host_state, params)
