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

Imports torch, pyro and :mod:`.compiled` only.
"""

from __future__ import annotations

import math
import time
import warnings
import weakref
from collections.abc import Callable

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam as TorchClippedAdam
from pyro.optim.optim import is_scheduler
from pyro.util import warn_if_nan

from .compile_strategy import CompiledFunction, tensor_signature
from .compiled import CompiledObjective

__all__ = ["FUSED_OPTIMIZERS", "FusedSVI"]

#: the torch optimisers (as wrapped by ``pyro.optim.Adam``, ``ClippedAdam``, ``SGD`` and
#: their learning-rate schedulers) whose update is fused into the step
FUSED_OPTIMIZERS = (torch.optim.Adam, TorchClippedAdam, torch.optim.SGD)

# compiled fused steps, per recorded gradient graph (shared by every FusedSVI using the same
# loss, model, guide and argument shapes: chains and restarts compile once) and per
# optimiser configuration
_FUSED: weakref.WeakKeyDictionary[CompiledFunction, dict] = weakref.WeakKeyDictionary()


def _adam_config(group: dict) -> tuple:
    for flag in ("amsgrad", "maximize", "decoupled_weight_decay"):
        if group.get(flag):
            raise ValueError(
                f"FusedSVI fuses torch.optim.Adam without {flag}, but the optimiser has {flag}=True. "
                "Use pyro.infer.SVI for this optimiser."
            )
    beta1, beta2 = group["betas"]
    return ("adam", float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]))


def _clipped_adam_config(group: dict) -> tuple:
    beta1, beta2 = group["betas"]
    return (
        "clipped_adam",
        float(beta1),
        float(beta2),
        float(group["eps"]),
        float(group["weight_decay"]),
        float(group["clip_norm"]),
        bool(group["centered_variance"]),
    )


def _sgd_config(group: dict) -> tuple:
    if group.get("maximize"):
        raise ValueError(
            "FusedSVI fuses torch.optim.SGD without maximize, but the optimiser has maximize=True. "
            "Use pyro.infer.SVI for this optimiser."
        )
    return (
        "sgd",
        float(group["momentum"]),
        float(group["dampening"]),
        float(group["weight_decay"]),
        bool(group["nesterov"]),
    )


_CONFIGS: dict[type, Callable[[dict], tuple]] = {
    torch.optim.Adam: _adam_config,
    TorchClippedAdam: _clipped_adam_config,
    torch.optim.SGD: _sgd_config,
}


def _update(config: tuple, param: torch.Tensor, grad: torch.Tensor, state: tuple, rate: torch.Tensor) -> None:
    """
    One parameter's update, in place, in the op order of the torch optimiser (so the result
    equals it to rounding). ``rate`` is the learning rate (Adam, SGD) or ClippedAdam's
    step size (learning rate × bias corrections, computed in Python as ClippedAdam does).
    """
    kind = config[0]
    if kind == "adam":  # torch.optim.adam._single_tensor_adam
        _, beta1, beta2, eps, weight_decay = config
        exp_avg, exp_avg_sq, step = state
        step.add_(1)
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        steps = step.to(torch.float64)
        step_size = rate / (1 - torch.pow(beta1, steps))
        bias_correction2_sqrt = (1 - torch.pow(beta2, steps)).sqrt()
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt.to(param.dtype)).add_(eps)
        param.sub_(step_size.to(param.dtype) * (exp_avg / denom))
    elif kind == "clipped_adam":  # pyro.optim.clipped_adam.ClippedAdam.step
        _, beta1, beta2, eps, weight_decay, clip_norm, centered = config
        exp_avg, exp_avg_sq = state
        grad = grad.clamp(-clip_norm, clip_norm)
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        grad_var = grad - exp_avg if centered else grad
        exp_avg_sq.mul_(beta2).addcmul_(grad_var, grad_var, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        param.sub_(rate.to(param.dtype) * (exp_avg / denom))
    else:  # torch.optim.sgd._single_tensor_sgd
        _, momentum, dampening, weight_decay, nesterov = config
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            (buf,) = state
            buf.mul_(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(buf, alpha=momentum) if nesterov else buf
        param.sub_(rate.to(param.dtype) * grad)


def _make_fused(
    graph: Callable, grad_index: list, configs: tuple, scalar_params: tuple, scalar_states: tuple
) -> Callable:
    def fused(hyper, rates, params, states, args):
        # 0-dim tensors come in as 1-element views (see FusedSVI._plan)
        params = [p.view(()) if s else p for p, s in zip(params, scalar_params)]
        states = [
            tuple(t.view(()) if s else t for t, s in zip(state, scalars))
            for state, scalars in zip(states, scalar_states)
        ]
        loss, values, *grads = graph(hyper[0], hyper[1], *params, *args)
        for k, (i, grad) in enumerate(zip(grad_index, grads)):
            _update(configs[k], params[i], grad, states[k], rates[k])
        return loss, values

    return torch.compile(fused, fullgraph=True, dynamic=False, options={"fallback_random": True})


class FusedSVI(SVI):
    """
    :class:`pyro.infer.SVI` whose step (forward pass, recorded terms, gradients and the
    optimiser's update) runs as one compiled graph. Same arguments, same
    :meth:`step` (returns the loss, fills ``loss.last_terms``, advances ``loss``'s β
    schedule), same random stream, and the same losses, parameters and optimiser state as
    ``SVI(model, guide, optim, loss)`` for the same seed, to float rounding.

    The first step with new arguments (shapes, dtypes, keyword values), new parameters, or
    parameters the optimiser has not seen (a fresh optimiser, one after ``set_state``) runs
    as :class:`pyro.infer.SVI` does; it records the gradient graph and creates the torch
    optimisers. The next step compiles the fused graph (seconds, once per loss, model,
    guide, argument shapes and optimiser settings; several ``FusedSVI`` objects sharing a
    loss, e.g. chains, share it) and later steps run it.

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

    :param model: the model.
    :param guide: the guide.
    :param pyro.optim.PyroOptim optim: a supported Pyro optimiser.
    :param loss: ``JitBetaELBO(compiler="inductor")`` or ``JitBetaMeanFieldELBO(compiler="inductor")``.
    :raises ValueError: for another loss or compiler, an unsupported optimiser, or ``clip_args``.

    Attributes: :attr:`compile_seconds` (seconds spent compiling fused graphs),
    :attr:`num_fused_steps` and :attr:`num_unfused_steps`.
    """

    def __init__(self, model, guide, optim: PyroOptim, loss: CompiledObjective, **kwargs):
        if not isinstance(loss, CompiledObjective) or loss.compiler != "inductor":
            raise ValueError(
                "FusedSVI fuses the gradient graph of JitBetaELBO(compiler='inductor') or "
                f"JitBetaMeanFieldELBO(compiler='inductor'), got loss={loss!r}. "
                "Pass such a loss, or use pyro.infer.SVI."
            )
        if not isinstance(optim, PyroOptim):
            raise ValueError(
                f"FusedSVI needs a pyro.optim.PyroOptim, got optim={optim!r}. Wrap it, e.g. pyro.optim.Adam({{...}})."
            )
        constructor = optim.pt_optim_constructor
        if constructor not in _CONFIGS:
            supported = ", ".join(c.__name__ for c in FUSED_OPTIMIZERS)
            raise ValueError(
                f"FusedSVI fuses the updates of {supported}, but optim wraps "
                f"{getattr(constructor, '__name__', constructor)}. "
                "Use one of those, or pyro.infer.SVI for this optimiser."
            )
        if optim.pt_clip_args:
            raise ValueError(
                f"FusedSVI does not fuse gradient clipping by clip_args, got clip_args={optim.pt_clip_args!r}. "
                "Use pyro.optim.ClippedAdam (per-element clip_norm, fused), or pyro.infer.SVI."
            )
        super().__init__(model, guide, optim, loss, **kwargs)
        #: the loss object (SVI keeps only its bound methods, as ``self.loss`` and ``self.loss_and_grads``)
        self.elbo = loss
        self.compile_seconds = 0.0
        self.num_fused_steps = 0
        self.num_unfused_steps = 0

    def step(self, *args, **kwargs) -> float:
        """
        Take one gradient step.

        :returns: the loss (``-objective`` in nats) before the step.
        :rtype: float
        """
        plan = self._plan(args, kwargs)
        if plan is None:
            self.num_unfused_steps += 1
            return super().step(*args, **kwargs)
        compiled, fused, params, states, rates, compile_now = plan
        loss = self.elbo
        beta = loss.current_beta()
        capacity = loss.current_capacity()
        hyper = torch.tensor([beta, 0.0 if capacity is None else capacity], dtype=torch.get_default_dtype())
        rates_t = torch.tensor(rates, dtype=torch.float64)
        start = time.perf_counter()
        if compile_now:
            with torch.no_grad(), warnings.catch_warnings():
                # inductor's own use of torch.jit APIs that torch >= 2.9 marks deprecated
                warnings.filterwarnings(
                    "ignore", message=r".*torch\.jit\..* is deprecated", category=DeprecationWarning
                )
                value, values = fused(hyper, rates_t, params, states, args)
            self.compile_seconds += time.perf_counter() - start
        else:
            with torch.no_grad():
                value, values = fused(hyper, rates_t, params, states, args)
        loss.record_step(compiled, values, beta, capacity)
        self.num_fused_steps += 1
        value = value.item()
        warn_if_nan(value, "loss")
        return value

    def _plan(self, args: tuple, kwargs: dict):
        """Everything a fused step needs, or ``None`` when this step must run unfused."""
        compiled = self.elbo.gradient_graph(self.model, self.guide, args, kwargs)
        if compiled is None:
            return None
        named = dict(pyro.get_param_store().named_parameters())
        params = tuple(named.get(name) for name in compiled.param_names)
        if any(p is None for p in params) or tensor_signature(params) != compiled.param_signature:
            return None  # cleared or re-created parameters: the loss re-creates / recompiles
        optim_objs = self.optim.optim_objs
        optimizers = []
        for p in params:
            obj = optim_objs.get(p)
            if obj is None:
                return None  # not seen by the optimiser yet: SVI's path creates it (and loads set_state)
            optimizers.append(obj.optimizer if is_scheduler(obj) else obj)
        configs, states, rates = [], [], []
        for optimizer in optimizers:
            group = optimizer.param_groups[0]
            kind = type(optimizer)
            if kind is TorchClippedAdam:
                group["lr"] *= group["lrd"]  # every step, as ClippedAdam.step, with or without a gradient
        for i in compiled.info["grad_index"]:
            optimizer, param = optimizers[i], params[i]
            group = optimizer.param_groups[0]
            kind = type(optimizer)
            if kind not in _CONFIGS:
                raise ValueError(f"FusedSVI cannot fuse {kind.__name__}; use pyro.infer.SVI.")
            configs.append(_CONFIGS[kind](group))
            state = optimizer.state[param]
            if kind is torch.optim.Adam:
                states.append((state["exp_avg"], state["exp_avg_sq"], state["step"]))
                rates.append(float(group["lr"]))
            elif kind is TorchClippedAdam:
                states.append((state["exp_avg"], state["exp_avg_sq"]))
                state["step"] += 1
                beta1, beta2 = group["betas"]
                step = state["step"]
                rates.append(group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step))
            else:
                buf = state.get("momentum_buffer")
                states.append(() if group["momentum"] == 0 else (buf,))
                rates.append(float(group["lr"]))
        configs = tuple(configs)
        scalar_params = tuple(p.dim() == 0 for p in params)
        scalar_states = tuple(tuple(t.dim() == 0 for t in state) for state in states)
        key = (configs, scalar_states)
        cache = _FUSED.setdefault(compiled, {})
        fused = cache.get(key)
        compile_now = fused is None
        if compile_now:
            graph, grad_index = compiled.info["graph"], list(compiled.info["grad_index"])
            fused = cache[key] = _make_fused(graph, grad_index, configs, scalar_params, scalar_states)
        # 0-dim inputs as 1-element views: dynamo (torch 2.13) traces 0-dim inputs as symbolic
        # floats, restarts its analysis to specialise them, and the restarted trace drops the
        # in-place updates of the inputs
        # (made under no_grad: a view of a parameter would otherwise be a non-leaf that
        # requires grad, whose .grad dynamo reads, with a warning)
        with torch.no_grad():
            params = tuple(p.view(1) if s else p for p, s in zip(params, scalar_params))
            states = tuple(tuple(t.view(1) if t.dim() == 0 else t for t in state) for state in states)
        return compiled, fused, params, states, rates, compile_now
