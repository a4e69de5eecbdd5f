# SPDX-License-Identifier: Apache-2.0
"""
The one place where the package meets :class:`pyro.optim.PyroOptim` below its documented
API: making a parameter's torch optimiser from the state ``optim.set_state(...)`` left
waiting for it, *without* the optimiser step that :meth:`pyro.optim.PyroOptim.__call__`
takes when it does the same (:class:`~pyro_elbo_lab.losses.fused.FusedSVI` uses it, so
that a run resumed from a checkpoint is fused from its first step).

* Re-implemented here from Pyro 1.9's ``pyro/optim/optim.py`` (Apache-2.0):
  :func:`load_optimizer_state` (``_load_state_dict``).
* Still Pyro's own: ``PyroOptim._state_waiting_to_be_consumed``, ``PyroOptim._get_optim``
  and ``PyroOptim._get_grad_clip``, used by :func:`restore_waiting_optimizers` only. They
  are checked when this module is imported: a Pyro outside :data:`SUPPORTED_PYRO` that
  lacks them raises an ``ImportError`` naming the supported range.

Imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pyro
import torch
from pyro import __version__ as _pyro_version
from pyro.optim import PyroOptim
from pyro.optim.optim import is_scheduler

#: the pyro-ppl versions this module is written against (and ``pyproject.toml`` requires)
SUPPORTED_PYRO = ">=1.9,<1.10"

_probe = PyroOptim(torch.optim.SGD, {"lr": 0.1})
if not (
    isinstance(getattr(_probe, "_state_waiting_to_be_consumed", None), dict)
    and callable(getattr(_probe, "_get_optim", None))
    and callable(getattr(_probe, "_get_grad_clip", None))
):  # pragma: no cover - only with an unsupported Pyro
    raise ImportError(
        "pyro_elbo_lab's FusedSVI reads pyro.optim.PyroOptim's _state_waiting_to_be_consumed, _get_optim and "
        f"_get_grad_clip, which pyro-ppl {_pyro_version} does not have. Install a supported version: "
        f"pip install 'pyro-ppl{SUPPORTED_PYRO}'."
    )
del _probe

__all__ = ["SUPPORTED_PYRO", "load_optimizer_state", "restore_waiting_optimizers"]


def load_optimizer_state(optimizer: Any, state: dict) -> None:
    """
    Load ``state`` (one entry of :meth:`pyro.optim.PyroOptim.get_state`) into a torch
    optimiser, or into a learning-rate scheduler and the optimiser it wraps.

    :param optimizer: a :class:`torch.optim.Optimizer` or a learning-rate scheduler.
    :param dict state: its ``state_dict()``; for a scheduler ``{"scheduler": ..., "optimizer": ...}``.
    """
    if is_scheduler(optimizer):
        optimizer.load_state_dict(state["scheduler"])
        optimizer.optimizer.load_state_dict(state["optimizer"])
    else:
        optimizer.load_state_dict(state)


def restore_waiting_optimizers(optim: PyroOptim, params: Iterable[torch.Tensor]) -> bool:
    """
    Whether ``optim`` has a torch optimiser for every parameter of ``params``. Those it
    lacks but has state for (``optim.set_state`` of a checkpoint, not yet consumed) are made
    and loaded here as :meth:`pyro.optim.PyroOptim.__call__` would, without a step (which
    would decay ClippedAdam's learning rate, or move a parameter with a zero gradient).
    Nothing is made when one of the missing parameters has no waiting state.

    :param pyro.optim.PyroOptim optim: the optimiser.
    :param params: the parameters (tensors of the parameter store).
    :returns: True when every parameter now has its torch optimiser.
    :rtype: bool
    """
    missing = [p for p in params if p not in optim.optim_objs]
    if not missing:
        return True
    store = pyro.get_param_store()
    waiting = optim._state_waiting_to_be_consumed
    if not all(store.param_name(p) in waiting for p in missing):
        return False
    for p in missing:
        optim.optim_objs[p] = optimizer = optim._get_optim(p)
        optim.grad_clip[p] = optim._get_grad_clip(p)  # type: ignore[arg-type]  # Pyro annotates p as str
        load_optimizer_state(optimizer, waiting.pop(store.param_name(p)))
    return True
