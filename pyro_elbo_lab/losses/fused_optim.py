# SPDX-License-Identifier: Apache-2.0
"""
The optimisers' updates inside the fused training step (:mod:`.fused`): Adam, Pyro's
ClippedAdam and SGD written out in torch ops, in the op order of the torch optimisers (so
a fused step equals an unfused one to rounding), reading and writing the torch
optimisers' own state tensors in place; their settings as the compiled graph's constant
configuration, and the learning rate of each step as its input.

Imports torch and Pyro's ClippedAdam only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro.optim.clipped_adam import ClippedAdam as TorchClippedAdam

__all__ = ["FUSED_OPTIMIZERS", "OPTIMIZER_CONFIGS", "fused_update", "restore_host_state", "step_rates"]

#: the torch optimisers (as wrapped by ``pyro.optim.Adam``, ``ClippedAdam``, ``SGD`` and
#: their learning-rate schedulers) whose update is fused into the step
FUSED_OPTIMIZERS = (torch.optim.Adam, TorchClippedAdam, torch.optim.SGD)


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


#: per fused torch optimiser, its settings (a param group) as the fused graph's constant
#: configuration; raises ValueError for settings it does not fuse
OPTIMIZER_CONFIGS: dict[type, Callable[[dict], tuple]] = {
    torch.optim.Adam: _adam_config,
    TorchClippedAdam: _clipped_adam_config,
    torch.optim.SGD: _sgd_config,
}


def _keep(ok: torch.Tensor, target: torch.Tensor, new: torch.Tensor) -> None:
    """``target`` becomes ``new`` where the step is finite and stays bit for bit what it was otherwise."""
    target.copy_(torch.where(ok, new, target))


def fused_update(
    config: tuple, param: torch.Tensor, grad: torch.Tensor, state: tuple, rate: torch.Tensor, ok: torch.Tensor
) -> None:
    """
    One parameter's update, in place, in the op order of the torch optimiser (so the result
    equals it to rounding), applied only where ``ok`` (a 0-dim bool tensor: the loss and
    every gradient of the step are finite) holds: otherwise the parameter and its state
    keep their exact values, without a host synchronisation inside the graph. ``rate`` is
    the learning rate (Adam, SGD) or ClippedAdam's step size (learning rate × bias
    corrections, computed in Python as ClippedAdam does).
    """
    kind = config[0]
    if kind == "adam":  # torch.optim.adam._single_tensor_adam
        _, beta1, beta2, eps, weight_decay = config
        exp_avg, exp_avg_sq, step = state
        new_step = step + 1
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        new_avg = exp_avg.lerp(grad, 1 - beta1)
        new_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        steps = new_step.to(torch.float64)
        step_size = rate / (1 - torch.pow(beta1, steps))
        bias_correction2_sqrt = (1 - torch.pow(beta2, steps)).sqrt()
        denom = (new_avg_sq.sqrt() / bias_correction2_sqrt.to(param.dtype)).add_(eps)
        new_param = param - step_size.to(param.dtype) * (new_avg / denom)
        _keep(ok, step, new_step)
        _keep(ok, exp_avg, new_avg)
        _keep(ok, exp_avg_sq, new_avg_sq)
    elif kind == "clipped_adam":  # pyro.optim.clipped_adam.ClippedAdam.step
        _, beta1, beta2, eps, weight_decay, clip_norm, centered = config
        exp_avg, exp_avg_sq = state
        grad = grad.clamp(-clip_norm, clip_norm)
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        new_avg = exp_avg.mul(beta1).add_(grad, alpha=1 - beta1)
        grad_var = grad - new_avg if centered else grad
        new_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad_var, grad_var, value=1 - beta2)
        denom = new_avg_sq.sqrt().add_(eps)
        new_param = param - rate.to(param.dtype) * (new_avg / denom)
        _keep(ok, exp_avg, new_avg)
        _keep(ok, exp_avg_sq, new_avg_sq)
    else:  # torch.optim.sgd._single_tensor_sgd
        _, momentum, dampening, weight_decay, nesterov = config
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        if momentum != 0:
            (buf,) = state
            new_buf = buf.mul(momentum).add_(grad, alpha=1 - dampening)
            grad = grad.add(new_buf, alpha=momentum) if nesterov else new_buf
            _keep(ok, buf, new_buf)
        new_param = param - rate.to(param.dtype) * grad
    _keep(ok, param, new_param)


def step_rates(optimizers: tuple, params: tuple, grad_index: tuple) -> tuple[tuple, list[float], list]:
    """
    Each updated parameter's optimiser settings and learning rate (or ClippedAdam's step
    size) for this step, and ClippedAdam's Python-side state as it was before it (which
    this advances: its decayed learning rate and step count, as ``ClippedAdam.step``).
    """
    host_state: list[tuple[dict, str, Any]] = []
    for optimizer in optimizers:
        if type(optimizer) is TorchClippedAdam:
            group = optimizer.param_groups[0]
            host_state.append((group, "lr", group["lr"]))
            group["lr"] *= group["lrd"]  # every step, as ClippedAdam.step, with or without a gradient
    configs = []
    rates: list[float] = []
    for i in grad_index:
        optimizer = optimizers[i]
        group = optimizer.param_groups[0]
        kind = type(optimizer)
        configs.append(OPTIMIZER_CONFIGS[kind](group))
        if kind is TorchClippedAdam:
            state = optimizer.state[params[i]]
            host_state.append((state, "step", state["step"]))
            state["step"] += 1
            beta1, beta2 = group["betas"]
            step = state["step"]
            rates.append(group["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step))
        else:
            rates.append(float(group["lr"]))
    return tuple(configs), rates, host_state


def restore_host_state(host_state: list) -> None:
    """Put back ClippedAdam's Python-side learning rate and step count as :func:`step_rates` found them."""
    for target, key, old in host_state:
        target[key] = old
