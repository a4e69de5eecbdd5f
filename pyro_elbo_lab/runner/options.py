# SPDX-License-Identifier: Apache-2.0
"""
Option objects of :class:`~pyro_elbo_lab.runner.SVIRunner`: options that travel together
(convergence, checkpointing, evaluation) are one small frozen dataclass, validated when
it is built.

Imports only :mod:`pyro_elbo_lab.checks`.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from ..checks import check_int, check_model_kwargs, nonnegative_number

__all__ = ["Convergence", "Checkpointing", "Evaluation"]


@dataclass(frozen=True)
class Convergence:
    """
    Stop when the objective stops improving.

    Every ``window`` steps the mean objective (:math:`-\\mathrm{loss}`, nats) over the
    last window is compared with the mean over the window before it; the run stops when
    the improvement :math:`\\bar{\\mathcal L}_{k} - \\bar{\\mathcal L}_{k-1} < \\mathrm{tol}
    \\cdot |\\bar{\\mathcal L}_{k}|` at ``patience`` consecutive checks. No check counts
    while β or the capacity changed within the two windows.

    :param float tol: relative tolerance (>= 0).
    :param int window: steps per window (>= 1).
    :param int patience: consecutive flat windows before stopping (>= 1).
    :raises ValueError: for a negative or non-finite ``tol`` or a bad count.
    """

    tol: float
    window: int = 100
    patience: int = 2

    def __post_init__(self):
        object.__setattr__(
            self, "tol", nonnegative_number(self.tol, "Convergence.tol", "a relative tolerance such as 1e-4")
        )
        check_int("Convergence.window", self.window, 1, hint="steps per window, e.g. 100")
        check_int("Convergence.patience", self.patience, 1, hint="consecutive flat windows, e.g. 2")


@dataclass(frozen=True)
class Checkpointing:
    """
    Write a resumable checkpoint every ``every`` steps.

    ``path`` is the checkpoint file (tensors, loaded with ``torch.load(weights_only=True)``,
    and plain JSON data; replaced atomically); the history rows are appended to the side
    file ``path + ".history.jsonl"``, so a checkpoint costs the same at any step.

    The path is checked now, not at the first write: its directory must exist and be
    writable, and ``path`` must not be a directory or a symbolic link.

    :param path: the checkpoint file.
    :param int every: steps between checkpoints (>= 1).
    :raises ValueError: for a bad ``every`` or an unusable ``path``.
    """

    path: str
    every: int

    def __post_init__(self):
        check_int("Checkpointing.every", self.every, 1, hint="steps between checkpoints, e.g. 100")
        if not isinstance(self.path, (str, os.PathLike)):
            raise ValueError(f"Checkpointing.path must be a file path, got path={self.path!r}")
        path = os.path.abspath(os.fspath(self.path))
        object.__setattr__(self, "path", path)
        check_writable_file(path, "Checkpointing.path")


def check_writable_file(path: str, name: str) -> None:
    """
    Refuse a path that a checkpoint could not be written to: a directory, a symbolic link,
    a missing or unwritable directory.

    :raises ValueError: naming ``name``, the path and the fix.
    """
    directory = os.path.dirname(path) or "."
    if os.path.islink(path):
        raise ValueError(f"{name}={path!r} is a symbolic link; checkpoints are never written through links: "
                         "give the real file's path")
    if os.path.isdir(path):
        raise ValueError(f"{name}={path!r} is a directory; give a file path inside it, e.g. {os.path.join(path, 'ckpt.pt')!r}")
    if not os.path.isdir(directory):
        raise ValueError(f"{name}={path!r}: the directory {directory!r} does not exist; create it first")
    try:  # a real write, not os.access: the owner's permission bits do not bind root, a read-only mount does
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise ValueError(
            f"{name}={path!r} is not writable: a file cannot be created in {directory!r} ({e.strerror or e}); "
            "choose a writable place"
        ) from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ValueError(f"{name}={path!r} is not writable (no write permission on the file); choose a writable place")


@dataclass(frozen=True)
class Evaluation:
    """
    Every ``every`` steps, estimate the log evidence with
    :func:`pyro_elbo_lab.estimate_evidence` (PSIS on) and record ``eval_*`` columns.

    :param int every: steps between evaluations (>= 1).
    :param tuple args: the model's positional data for the evaluation (default: the run's;
        required with minibatches).
    :param dict model_kwargs: the model's keyword data for the evaluation (default: the
        run's).
    :param int num_samples: importance samples per evaluation (>= 1).
    :raises ValueError: for bad counts, ``args`` that is not a tuple or list, or bad
        ``model_kwargs``.
    """

    every: int
    args: Any = None
    model_kwargs: Any = None
    num_samples: int = 1000

    def __post_init__(self):
        check_int("Evaluation.every", self.every, 1, hint="steps between evaluations, e.g. 100")
        check_int("Evaluation.num_samples", self.num_samples, 1, hint="importance samples, e.g. 1000")
        if self.args is not None:
            if not isinstance(self.args, (tuple, list)):
                raise ValueError(
                    f"Evaluation.args must be a tuple of the model's positional data, got args={self.args!r}; "
                    "e.g. Evaluation(every=100, args=(x_full,))"
                )
            object.__setattr__(self, "args", tuple(self.args))
        if self.model_kwargs is not None:
            object.__setattr__(self, "model_kwargs", check_model_kwargs(self.model_kwargs, "Evaluation.model_kwargs"))
