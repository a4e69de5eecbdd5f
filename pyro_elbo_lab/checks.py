# SPDX-License-Identifier: Apache-2.0
"""
Argument checks shared by every public entry point: one message format, naming the
argument, the value found and what to pass instead.

Imports nothing from the rest of the package, so any module may use it.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch

__all__ = ["check_int", "check_model_kwargs", "empty_plate_errors", "nonnegative_number"]


def check_int(name: str, value: Any, minimum: int, allow_none: bool = False, hint: str = "") -> None:
    """
    Check an integer argument.

    :param str name: the argument's name, for the message.
    :param value: its value.
    :param int minimum: the smallest value allowed.
    :param bool allow_none: whether ``None`` (automatic) is allowed.
    :param str hint: what to do, appended to the message.
    :raises ValueError: if ``value`` is not an integer (``bool`` excluded) ``>= minimum``.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(
            f"{name} must be an integer >= {minimum}{' or None (automatic)' if allow_none else ''}, "
            f"got {name}={value!r}{'; ' + hint if hint else ''}"
        )


def nonnegative_number(value: Any, name: str, hint: str) -> float:
    """
    ``value`` as a finite float >= 0.

    :param value: a Python, NumPy or one-element tensor number.
    :param str name: the argument's name, for the message.
    :param str hint: what the number means, appended to the message.
    :raises ValueError: if ``value`` is not a finite number >= 0.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value_ = value.item()
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        value_ = float(value)
    else:
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}; {hint}")
    if not math.isfinite(value_) or value_ < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}; {hint}")
    return float(value_)


def check_model_kwargs(model_kwargs: Any, name: str = "model_kwargs") -> dict[str, Any]:
    """
    The model's keyword arguments as a new dict (``{}`` for ``None``).

    Every public entry point that runs the model takes its positional data as ``*args``
    and its keyword data as this one dict (any mapping), so that no option of ours can
    swallow a model keyword of the same name.

    :param model_kwargs: what the caller passed: a mapping with string keys, or ``None``.
    :param str name: the argument's name, for the message.
    :raises ValueError: if ``model_kwargs`` is not a mapping with string keys.
    """
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping) or not all(isinstance(k, str) for k in model_kwargs):
        raise ValueError(
            f"{name} must be a dict (or another mapping) of the model's keyword arguments (str keys) or None, "
            f"got {name}={model_kwargs!r}; "
            "pass positional data as extra positional arguments"
        )
    return dict(model_kwargs)


@contextlib.contextmanager
def empty_plate_errors() -> Iterator[None]:
    """
    Turn Pyro's ``ZeroDivisionError: size cannot be zero`` (a ``pyro.plate`` of size 0,
    i.e. empty data) raised while a model or guide runs into a ValueError naming the plate.
    Entered once around each place the package runs a model (the diagnostics' trace
    helpers and the losses' trace methods).

    :raises ValueError: naming the plate whose size is 0.
    """
    try:
        yield
    except ZeroDivisionError as error:
        if str(error) != "size cannot be zero":
            raise
        name = None
        tb = error.__traceback__
        while tb is not None:  # the plate's name from the frame of its __init__
            local = tb.tb_frame.f_locals
            if tb.tb_frame.f_code.co_name == "__init__" and local.get("size") == 0 and "name" in local:
                name = local["name"]
            tb = tb.tb_next
        raise ValueError(
            f"plate {name!r} has size 0: the data are empty; pass at least one data point "
            "(skip the call for an empty batch)"
        ) from error
