# SPDX-License-Identifier: Apache-2.0
"""
The interface between the compiled losses (:mod:`pyro_elbo_lab.losses.compiled`) and a
compiler (:mod:`~pyro_elbo_lab.losses.torchscript`, :mod:`~pyro_elbo_lab.losses.inductor`):
:class:`CompileStrategy` turns the traced step into a :class:`CompiledFunction` and runs it;
:func:`freeze_kwargs` makes the model's keyword arguments part of a cache key.

Imports nothing of the package: the strategies know nothing of the objective, and the losses know
nothing of the compiler beyond this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

__all__ = ["CompileStrategy", "CompiledFunction", "StepOutputs", "freeze_kwargs", "tensor_signature"]

#: what :meth:`CompileStrategy.run` returns: ``(loss, surrogate, values, compile_seconds)``;
#: ``surrogate`` is ``None`` when the strategy has already accumulated the gradients
StepOutputs = tuple


class CompiledFunction:
    """
    One compiled step and what is needed to call it.

    :param function: the compiled callable, ``(beta, capacity, *params, *args)`` with the
        parameters unconstrained, in the order of :attr:`param_names`.
    :param list names: the ``(term, site)`` names of the rows of the recorded values.
    :param dict info: whatever the strategy needs at call time (e.g. TorchScript's
        ``optimize`` flag, inductor's ``grad_index``).
    """

    # __weakref__: the fused training step keys its own compiled functions on this object
    __slots__ = ("function", "names", "param_names", "param_signature", "info", "__weakref__")

    def __init__(self, function: Callable, names: list, info: dict | None = None) -> None:
        self.function = function
        self.names = names
        self.param_names: list = []
        self.param_signature: tuple = ()
        self.info = info or {}


class CompileStrategy(ABC):
    """
    A compiler for the compiled losses. The loss records the step
    ``traced(beta, capacity, *params, *args) -> (loss, surrogate, values)`` (β and C(t) as
    0-dim tensors, the parameters unconstrained) and hands it to :meth:`compile` once per
    cache key; later calls go through :meth:`run`.

    :param str owner: the loss's class name, for error messages.
    :param str fallback: the uncompiled class's name, offered in error messages.
    :param dict jit_options: options of the compiler (TorchScript: passed to
        :func:`torch.jit.trace`).
    """

    #: the value of the losses' ``compiler=`` argument that selects this strategy
    name: ClassVar[str]

    def __init__(self, owner: str, fallback: str, jit_options: dict | None = None) -> None:
        self.owner = owner
        self.fallback = fallback
        self.jit_options = dict(jit_options or {})

    def cache_key(self, args: tuple, mode: str) -> tuple:
        """
        What, besides the model, guide, arguments' shapes and dtypes and keyword
        arguments, makes a call need its own compiled function.

        :param tuple args: the model's positional tensors.
        :param str mode: ``"value"``, ``"differentiable"`` or ``"backward"``.
        """
        return ()

    @abstractmethod
    def compile(self, traced: Callable, example: tuple, num_params: int, names: list, mode: str) -> CompiledFunction:
        """
        Compile ``traced`` for inputs like ``example``. Called with grad mode on, Pyro's
        validation off and the random state forked (restored afterwards).

        :param traced: the step, ``(beta, capacity, *params, *args) -> (loss, surrogate, values)``.
        :param tuple example: example inputs, in that order.
        :param int num_params: how many of the inputs are parameters.
        :param list names: the names of the rows of ``values``.
        :param str mode: the entry point that compiles (see :meth:`cache_key`).
        """

    @abstractmethod
    def run(self, compiled: CompiledFunction, inputs: tuple, params: tuple, mode: str) -> StepOutputs:
        """
        Run a compiled step.

        :returns: ``(loss, surrogate, values, compile_seconds)``: the loss (0-dim), the
            surrogate to differentiate (or ``None`` when the gradients were accumulated
            into ``params``' ``.grad`` already), the recorded values (terms × particles) and
            the seconds this call spent compiling (lazy compilers).
        """


class _ByIdentity:
    """A key for an unhashable value: equal only to itself, and keeps the value alive (so
    its ``id`` cannot be reused by another object while it is in a cache)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ByIdentity) and other.value is self.value


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_freeze(v) for v in value))
    if isinstance(value, dict):
        return (dict, tuple(sorted(((k, _freeze(v)) for k, v in value.items()), key=lambda kv: repr(kv[0]))))
    if isinstance(value, (set, frozenset)):
        return (frozenset, frozenset(_freeze(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return _ByIdentity(value)
    # the type too: 1, 1.0 and True are equal as keys but may take other branches in a model
    return (type(value), value)


def freeze_kwargs(kwargs: dict) -> tuple:
    """
    A hashable key for a model's keyword arguments: containers (list, tuple, dict, set)
    by content, hashable values by type and value, anything else by identity. Written here
    instead of importing Pyro's private ``pyro.ops.jit._hashable_args_kwargs``; unlike it,
    ``1`` and ``1.0`` are different keys and an unhashable value is keyed by identity
    without a warning (the key holds a reference, so the identity is never reused).

    :param dict kwargs: keyword arguments.
    :rtype: tuple
    """
    return tuple(sorted(((name, _freeze(value)) for name, value in kwargs.items()), key=lambda kv: kv[0]))


def tensor_signature(tensors: Iterable[torch.Tensor]) -> tuple:
    """``(shape, dtype, device, requires_grad)`` of each tensor: what a compiled function specialises on."""
    return tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in tensors)
