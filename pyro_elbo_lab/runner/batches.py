# SPDX-License-Identifier: Apache-2.0
"""
The per-step data of a run: the run's own ``*args`` / ``model_kwargs``, or one batch per
step from a list, an iterator (or any re-iterable such as a DataLoader) or a callable
``batches(step)``. A list or a callable is indexed by the step, so a resume at any step
takes the same batch as the uninterrupted run; an iterator is consumed in order.

Imports nothing from the rest of the package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

__all__ = ["BatchSource", "Exhausted", "check_batches"]


class Exhausted(Exception):
    """The iterator of batches ran out."""


def check_batches(batches: object) -> None:
    """
    :raises ValueError: if ``batches`` is neither iterable nor callable, or an empty sequence.
    """
    if batches is None:
        return
    if not callable(batches) and not isinstance(batches, Iterable):
        raise ValueError(
            f"batches must be an iterable of batches (list, DataLoader) or a callable step -> batch, got {batches!r}"
        )
    if isinstance(batches, Sequence) and len(batches) == 0:
        raise ValueError(f"batches={batches!r} is empty: give at least one batch")


class BatchSource:
    """
    ``source.get(step) -> (args, model_kwargs)`` for each step, and ``source.peek(step)``,
    the same batch without consuming it from an iterator (the resume's warm-up pass looks
    at the batch that the step loop then gets).

    A batch that is a tuple or list is appended to ``args``, a dict updates
    ``model_kwargs``, anything else is appended as one argument.

    :param tuple args: the run's positional data.
    :param dict model_kwargs: the run's keyword data.
    :param batches: None, a sequence, an iterable or a callable ``step -> batch``.
    """

    def __init__(self, args: tuple, model_kwargs: dict, batches: Iterable | Callable[[int], Any] | None):
        self.args = tuple(args)
        self.model_kwargs = dict(model_kwargs)
        self.batches = batches
        self._it = batches if isinstance(batches, Iterator) else None
        self._pending: tuple[Any] | None = None  # (batch,) peeked at and not consumed yet

    def _merge(self, batch: Any) -> tuple[tuple, dict]:
        if isinstance(batch, Mapping):
            return self.args, {**self.model_kwargs, **batch}
        if isinstance(batch, (tuple, list)):
            return self.args + tuple(batch), dict(self.model_kwargs)
        return self.args + (batch,), dict(self.model_kwargs)

    def _fetch(self) -> Any:
        batches = self.batches
        for _ in range(2):
            if self._it is None:
                if not isinstance(batches, Iterable):
                    raise ValueError(f"batches={batches!r} is not iterable: pass a list, a DataLoader or a callable")
                self._it = iter(batches)
            try:
                return next(self._it)
            except StopIteration:
                if isinstance(batches, Iterator):
                    raise Exhausted() from None
                self._it = None
        raise ValueError(f"batches={batches!r} is empty: give at least one batch")

    def get(self, step: int) -> tuple[tuple, dict]:
        """The data of ``step``.

        :raises Exhausted: when an iterator of batches ran out.
        """
        batches = self.batches
        if batches is None:
            return self.args, self.model_kwargs
        if callable(batches) and not isinstance(batches, Iterable):
            return self._merge(batches(step))
        if isinstance(batches, Sequence):
            return self._merge(batches[step % len(batches)])
        if self._pending is not None:
            batch, self._pending = self._pending[0], None
            return self._merge(batch)
        return self._merge(self._fetch())

    def peek(self, step: int) -> tuple[tuple, dict]:
        """The data of ``step`` without consuming it."""
        batches = self.batches
        if batches is None or callable(batches) and not isinstance(batches, Iterable) or isinstance(batches, Sequence):
            return self.get(step)
        if self._pending is None:
            self._pending = (self._fetch(),)
        return self._merge(self._pending[0])
