# SPDX-License-Identifier: Apache-2.0
"""
An SVI training loop that records the ELBO's decomposition on every step.

:class:`SVIRunner` takes the place of a hand-written ``for step in range(n): svi.step()``
loop. It keeps a per-step history (a :class:`pandas.DataFrame`) of the terms the loss
already computed, stops on convergence (:class:`Convergence`), a wall-time limit, Ctrl-C
or non-finite values, writes checkpoints that cannot execute code
(:class:`Checkpointing`), estimates the evidence during the run (:class:`Evaluation`) and
can run several independent fits (chains). Its result, :class:`SVIResult`, converts to
ArviZ with :func:`pyro_elbo_lab.inference_data.from_svi_result`.

Modules: ``options`` (the option objects), ``params`` (parameter-store state),
``batches`` (per-step data), ``stopping`` (convergence rule, time limit), ``checkpoint``
(reading and writing checkpoints), ``loop`` (one chain's step loop), ``resume`` (resuming
from a checkpoint: the checks, the state restored, the saver), ``result``
(:class:`SVIResult`, :class:`NonFiniteError`), ``runner`` (:class:`SVIRunner`).
"""

from __future__ import annotations

from .options import Checkpointing, Convergence, Evaluation
from .result import NonFiniteError, SVIResult
from .runner import SVIRunner

__all__ = ["SVIRunner", "SVIResult", "NonFiniteError", "Convergence", "Checkpointing", "Evaluation"]
