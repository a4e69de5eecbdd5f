# SPDX-License-Identifier: Apache-2.0
"""
Pyro's parameter store as plain state, through its public API only
(:meth:`~pyro.params.param_store.ParamStoreDict.get_state` / ``set_state``,
``named_parameters``): snapshots, in-place loads that keep the tensors a module or an
optimiser holds, and the start weights of modules registered with :func:`pyro.module`.

Imports nothing from the rest of the package.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

import pyro
import torch
from torch.distributions import transform_to

T = TypeVar("T")

__all__ = [
    "store_state",
    "load_store",
    "constrained_params",
    "keep_store_tensors",
    "is_module_param",
    "record_modules",
    "reset_modules",
    "nonfinite_params",
    "fresh_copy",
]


def store_state() -> dict:
    """A detached copy of the parameter store's state: ``{"params": {name: unconstrained
    tensor}, "constraints": {name: constraint}}``."""
    state = pyro.get_param_store().get_state()
    return {
        "params": {k: v.detach().clone() for k, v in state["params"].items()},
        "constraints": dict(state["constraints"]),
    }


def load_store(state: dict) -> None:
    """
    Make the parameter store hold ``state`` (as :func:`store_state`): names not in it are
    removed; a parameter already in the store with the same shape, dtype and device gets
    the value copied IN PLACE, so that tensors held elsewhere see it (a module's own
    Parameters, registered by :func:`pyro.module`; the optimiser's per-parameter state);
    other names get fresh leaf tensors. The tensors of ``state`` are never shared.
    """
    store = pyro.get_param_store()
    current = store.get_state()["params"]  # the store's own tensor objects
    params, constraints = state["params"], state["constraints"]
    for name in [n for n in current if n not in params]:
        del store[name]
    update_params, update_constraints = {}, {}
    for name, value in params.items():
        tensor = current.get(name)
        if tensor is not None and (tensor.shape, tensor.dtype, tensor.device) == (
            value.shape,
            value.dtype,
            value.device,
        ):
            with torch.no_grad():
                tensor.copy_(value)
            update_params[name] = tensor  # the same object: set_state only updates its constraint
        else:
            if tensor is not None:
                del store[name]
            update_params[name] = value.detach().clone().requires_grad_(True)
        update_constraints[name] = constraints[name]
    if update_params:
        store.set_state({"params": update_params, "constraints": update_constraints})


@contextmanager
def keep_store_tensors() -> Iterator[None]:
    """
    Within the block the store may be loaded with other values; afterwards the store holds
    the same tensor objects, with the same values and constraints, as before it.
    """
    store = pyro.get_param_store()
    before = store.get_state()
    tensors, constraints = dict(before["params"]), dict(before["constraints"])
    saved = store_state()
    try:
        yield
    finally:
        current = store.get_state()["params"]
        for name in [n for n in current if current[n] is not tensors.get(n)]:
            del store[name]
        current = store.get_state()["params"]
        missing = {n: t for n, t in tensors.items() if n not in current}
        if missing:
            store.set_state({"params": missing, "constraints": {n: constraints[n] for n in missing}})
        load_store(saved)


def constrained_params(state: dict) -> dict[str, torch.Tensor]:
    """The constrained values of a :func:`store_state` snapshot, detached."""
    return {name: transform_to(state["constraints"][name])(value).detach() for name, value in state["params"].items()}


def nonfinite_params() -> list[str]:
    """Names of the store's parameters holding a NaN or infinite value, sorted."""
    return sorted(name for name, p in pyro.get_param_store().named_parameters() if not bool(torch.isfinite(p).all()))


def is_module_param(name: str) -> bool:
    """Whether a parameter-store name was registered by :func:`pyro.module` (``"net$$$weight"``)."""
    return pyro.params.user_param_name(name) != name


def record_modules(param_trace: pyro.poutine.Trace, initial_modules: dict) -> None:
    """
    Record the values of :func:`pyro.module` parameters seen for the first time in
    ``param_trace`` (a param-only trace of a step, taken before the update).
    """
    for name, site in param_trace.nodes.items():
        value = site["value"]
        if name not in initial_modules and is_module_param(name) and value is not None:
            initial_modules[name] = value.unconstrained().detach().clone()


def reset_modules(initial_modules: dict) -> None:
    """
    Before a chain: copy the start values into the :func:`pyro.module` parameters in the
    store (in place, so a module shared by the chains, used by a plain function or a bound
    method, starts each chain from the same weights), then drop them from the store, so
    that the chain's first step registers the parameters of the module it actually uses.
    """
    store = pyro.get_param_store()
    current = store.get_state()["params"]
    for name in [n for n in current if is_module_param(n)]:
        value = initial_modules.get(name)
        tensor = current[name]
        if value is not None and tensor.shape == value.shape:
            with torch.no_grad():
                tensor.copy_(value)
        del store[name]


def fresh_copy(x: T) -> T:
    """
    A deep copy of a :class:`torch.nn.Module` (other callables as they are).

    :class:`~pyro.infer.autoguide.AutoGuide` ``.__getstate__`` drops (and clears on the
    original!) the reference to its model, so it is put back on both.
    """
    if not isinstance(x, torch.nn.Module):
        return x
    from pyro.infer.autoguide import AutoGuide

    models = [(m, m._model) for m in x.modules() if isinstance(m, AutoGuide)]
    try:
        clone = copy.deepcopy(x)
    finally:
        for m, saved in models:
            m._model = saved
    for (_, saved), m in zip(models, [m for m in clone.modules() if isinstance(m, AutoGuide)]):
        m._model = saved
    return clone
