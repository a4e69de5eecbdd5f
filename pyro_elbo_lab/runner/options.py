# SPDX-License-Identifier: Apache-2.0
"""
Option objects of :class:`~pyro_elbo_lab.runner.SVIRunner`: options that travel together
(convergence, checkpointing, evaluation) are one small frozen dataclass, validated when
it is built.

Imports only :mod:`pyro_elbo_lab.checks`.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..checks import check_int, check_model_kwargs

if TYPE_CHECKING:
    from .stopping import RhatRule

__all__ = ["Convergence", "Checkpointing", "Evaluation"]


@dataclass(frozen=True)
class Convergence:
    """
    Stop when the objective's trace is stationary (Dhaka et al. 2020): every ``every``
    steps the last ``window`` values of the objective (:math:`-\\mathrm{loss}`, nats) are
    cut into ``num_chains`` chains; the trace is stationary when their rank-normalised split
    :math:`\\hat R` (and that of the parameters' iterates, ``params``) is below ``rhat``
    and the objective has no significant trend, up or down
    (:class:`~pyro_elbo_lab.runner.stopping.RhatRule` has the details). The run stops after
    ``patience`` consecutive stationary checks. The rule is scale-free: a constant added to
    the log joint does not change where it stops. Unlike a rule relative to
    :math:`|\\mathcal L|` (Stan ADVI's ``tol_rel_obj``), it stops no earlier for an ELBO in
    the thousands of nats, and a worsening objective never counts as converged.

    Every :class:`~pyro_elbo_lab.runner.SVIResult` reports ``converged`` and the statistics
    (``convergence``) per chain; without a ``Convergence`` the default one judges the final
    window.

    :param int window: recent steps examined (>= 8 * ``num_chains`` / 4, so each half chain
        has at least 2 values; e.g. 200).
    :param int num_chains: chains the window is cut into (>= 2; 4 as in Dhaka et al.).
    :param float rhat: the stationarity threshold (> 1; 1.1 as in Dhaka et al.; 1.01 is
        stricter and needs longer windows).
    :param int every: steps between checks (default ``window // num_chains``).
    :param int patience: consecutive stationary checks before stopping (>= 1).
    :param bool params: also require the iterates of the variational parameters to be
        stationary (:math:`\\hat R` of one fixed random projection per parameter tensor,
        unconstrained; costs one extra copy of the parameters' size and a reduction per
        tensor per step). The objective alone is blind to a parameter that still drifts
        slowly under a noisy ELBO: measured on a conjugate Normal model with 1 000
        observations and Adam (lr 0.05), the objective rule stopped at step 300 with the
        guide's scale 5× the exact posterior's, where ``params=True`` did not stop. Off by
        default because Adam's iterates at a constant learning rate are strongly
        autocorrelated and rarely reach :math:`\\hat R < 1.1` over a 200-step window; use a
        longer ``window`` (e.g. 800) or a decaying learning rate with it.
    :param int average: after the trace is stationary, average this many further iterates
        of the (unconstrained) parameters and stop with the average in the parameter store
        (Polyak-Ruppert averaging over the stationary phase, as in Dhaka et al.); the
        history's ``averaged_iterates`` column counts them. 0 (the default): no averaging.
        The running mean is kept in checkpoints (as JSON numbers: meant for models of
        modest size).
    :raises ValueError: for a bad count or threshold.

    References

    [1] `Robust, Accurate Stochastic Optimization for Variational Inference`, Akash Kumar
        Dhaka, Alejandro Catalina, Michael Riis Andersen, Måns Magnusson, Jonathan H.
        Huggins, Aki Vehtari (2020)
    """

    window: int = 200
    num_chains: int = 4
    rhat: float = 1.1
    every: int | None = None
    patience: int = 2
    params: bool = False
    average: int = 0

    def __post_init__(self):
        check_int("Convergence.window", self.window, 1, hint="steps examined, e.g. 200")
        check_int("Convergence.num_chains", self.num_chains, 2, hint="chains the window is cut into, e.g. 4")
        if self.window < 4 * self.num_chains:
            raise ValueError(
                f"Convergence.window must be at least 4 * num_chains = {4 * self.num_chains} (each half chain needs "
                f"2 values), got window={self.window!r}; e.g. Convergence(window=200)"
            )
        if (
            isinstance(self.rhat, bool)
            or not isinstance(self.rhat, (int, float))
            or not self.rhat > 1
            or not math.isfinite(self.rhat)
        ):
            raise ValueError(f"Convergence.rhat must be a finite number > 1 (e.g. 1.1), got rhat={self.rhat!r}")
        if self.every is None:
            object.__setattr__(self, "every", max(1, self.window // self.num_chains))
        check_int("Convergence.every", self.every, 1, hint="steps between checks, e.g. 50")
        check_int("Convergence.patience", self.patience, 1, hint="consecutive stationary checks, e.g. 2")
        check_int("Convergence.average", self.average, 0, hint="iterates to average after stationarity, e.g. 200")
        if not isinstance(self.params, bool):
            raise ValueError(f"Convergence.params must be True or False, got params={self.params!r}")

    def make_rule(self) -> RhatRule:
        """The rule object the runner asks after each step (:class:`~pyro_elbo_lab.runner.stopping.RhatRule`)."""
        from .stopping import RhatRule

        return RhatRule(self)


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
        raise ValueError(
            f"{name}={path!r} is a symbolic link; checkpoints are never written through links: "
            "give the real file's path"
        )
    if os.path.isdir(path):
        raise ValueError(
            f"{name}={path!r} is a directory; give a file path inside it, e.g. {os.path.join(path, 'ckpt.pt')!r}"
        )
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
