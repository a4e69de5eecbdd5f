# SPDX-License-Identifier: Apache-2.0
"""
:class:`SVIRunner`: the options of a run, its chains, and the
:class:`~pyro_elbo_lab.runner.SVIResult` it returns. The step loop itself is
:class:`~pyro_elbo_lab.runner.loop.ChainLoop`; resuming from a checkpoint (the checks, the
state restored, the checkpoints written) is :mod:`pyro_elbo_lab.runner.resume`.

Imports its :mod:`pyro_elbo_lab.runner` siblings and :mod:`pyro_elbo_lab.losses` (the
default loss).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import pyro
import torch
from pyro.infer import ELBO

from ..checks import check_int, check_model_kwargs
from .batches import BatchSource, check_batches
from .checkpoint import CheckpointWriter, data_fingerprint, read_checkpoint
from .loop import ChainLoop, LoopOptions
from .options import Checkpointing, Convergence, Evaluation, check_writable_file
from .params import fresh_copy, is_module_param, load_store, reset_modules, store_state
from .result import NonFiniteError, SVIResult, attach_partial_result
from .resume import chains_done, check_resume, make_saver, resume_chain
from .stopping import final_score

__all__ = ["SVIRunner"]


class SVIRunner:
    """
    Runs stochastic variational inference and records the ELBO's decomposition.

    Each step does what :meth:`pyro.infer.SVI.step` does (``loss.loss_and_grads``, the
    optimiser on the parameters seen, zero gradients), checks the loss and the gradients
    for NaN/Inf *before* the update, and appends the loss's
    :attr:`~pyro_elbo_lab.BetaELBO.last_terms` to the history. Works with any
    :class:`pyro.optim.PyroOptim` (including learning-rate schedulers, stepped every
    ``scheduler_every`` steps) and any Pyro ELBO (only the loss is recorded for losses
    without ``last_terms``).

    **Chains** (``num_chains > 1``): independent fits, each from a fresh parameter
    store, fresh copies of the optimiser and loss (and of the model and guide when they
    are :class:`torch.nn.Module` s, e.g. autoguides), seeded ``seed + chain``, so that
    :math:`\\hat R` of the guide draws across chains flags multimodality or failed
    optimisation. A module registered with :func:`pyro.module` by a plain function or a
    bound method is shared by the chains: its parameters are reset in place, before each
    chain, to the weights it had when the run first registered them.

    :param model: a Pyro model.
    :param guide: a Pyro guide.
    :param pyro.optim.PyroOptim optim: a Pyro optimiser or learning-rate scheduler.
    :param loss: an ELBO (default :class:`~pyro_elbo_lab.BetaELBO` ``()``).
    :param int num_chains: independent fits.
    :param int seed: chain ``c`` is seeded with ``seed + c``; None keeps the current
        RNG state for a single chain and draws a base seed from it for several.
    :param str on_nonfinite: ``"raise"`` (raise :class:`NonFiniteError`) or ``"skip"``
        (drop the step's update, as NumPyro's ``stable_update``; it is recorded with
        ``skipped=True``). Non-finite *parameters* always raise.
    :param bool progress_bar: show a tqdm bar (only when stderr is a terminal).
    :param Convergence convergence: stop when the objective's trace is stationary (None:
        never; the result still reports whether the final window is stationary).
    :param Checkpointing checkpoint: write resumable checkpoints (None: never).
    :param Evaluation evaluation: estimate the evidence during the run (None: never).
    :param float max_time: wall-time limit per chain, in seconds.
    :param callbacks: callables ``callback(step, row) -> bool | None`` called after each
        step with the history row (a dict); returning True stops the run.
    :param int scheduler_every: for learning-rate schedulers, call ``optim.step()``
        every this many steps (``ReduceLROnPlateau`` receives the loss).
    :param bool fused: run each step as one compiled graph, the gradients *and* the
        optimiser's update (:class:`~pyro_elbo_lab.losses.fused.FusedSVI`): needs
        ``JitBetaELBO(compiler="inductor")`` or ``JitBetaMeanFieldELBO(compiler="inductor")``
        and ``pyro.optim.Adam`` (without ``amsgrad``), ``ClippedAdam`` or ``SGD`` (or a
        learning-rate scheduler around one), without ``clip_args``; anything else is
        refused with a ``ValueError`` at construction. The same losses, parameters,
        optimiser state and history as ``fused=False`` to float rounding; the graph
        checks the loss and gradients for NaN/Inf itself and applies no update for a
        non-finite step, so ``on_nonfinite``, checkpoints and resumes (the optimiser
        state is the torch optimisers' own), schedules, convergence and chains work
        unchanged. The first step (and the first after a resume) runs unfused; the fused
        graph compiles at the second (seconds, per model, argument shapes and optimiser
        settings, and per chain: each chain deep-copies the loss and compiles its own
        graph; inductor's on-disk cache makes later chains and later processes faster).
        ``JitBetaTraceEnumELBO`` is refused (not fusable).
    :raises ValueError: for invalid options (a checkpoint path that cannot be written
        included).

    Example::

        runner = SVIRunner(model, guide, pyro.optim.Adam({"lr": 0.01}), BetaELBO(beta=4.0),
                           convergence=Convergence(window=200),
                           checkpoint=Checkpointing("fit.ckpt", every=500))
        result = runner.run(data, num_steps=20000)
        result.history.plot(x="step", y=["elbo", "kl"])

    References

    [1] `Automatic Differentiation Variational Inference`, Alp Kucukelbir, Dustin Tran,
        Rajesh Ranganath, Andrew Gelman, David M. Blei (2017)

    [2] `Composable Effects for Flexible and Accelerated Probabilistic Programming in NumPyro`,
        Du Phan, Neeraj Pradhan, Martin Jankowiak (2019)
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: pyro.optim.PyroOptim,
        loss: ELBO | None = None,
        *,
        num_chains: int = 1,
        seed: int | None = None,
        on_nonfinite: str = "raise",
        progress_bar: bool = True,
        convergence: Convergence | None = None,
        checkpoint: Checkpointing | None = None,
        evaluation: Evaluation | None = None,
        max_time: float | None = None,
        callbacks: Iterable[Callable] = (),
        scheduler_every: int = 1,
        fused: bool = False,
    ):
        if loss is None:
            from ..losses import BetaELBO

            loss = BetaELBO()
        if not callable(model) or not callable(guide):
            raise ValueError(f"model and guide must be callables, got {model!r} and {guide!r}")
        if not isinstance(optim, pyro.optim.PyroOptim):
            raise ValueError(
                f"optim must be a pyro.optim optimiser (e.g. pyro.optim.Adam({{'lr': 1e-3}})), got {optim!r}; "
                "wrap torch optimisers with pyro.optim.PyroOptim"
            )
        if not hasattr(loss, "loss_and_grads"):
            raise ValueError(f"loss must be a Pyro ELBO with loss_and_grads (e.g. BetaELBO()), got {loss!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got on_nonfinite={on_nonfinite!r}")
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be True or False, got fused={fused!r}")
        if fused:
            from ..losses.fused import unfusable_reason

            reason = unfusable_reason(optim, loss)
            if reason is not None:
                raise ValueError(
                    f"SVIRunner(fused=True) runs the gradients and the optimiser's update as one compiled graph; "
                    f"the fused step {reason} Or pass fused=False (the default) to run every step unfused."
                )
        check_int("num_chains", num_chains, 1)
        check_int("scheduler_every", scheduler_every, 1)
        if seed is not None:
            check_int("seed", seed, 0, hint="a seed in [0, 2**32 - num_chains)")
            if seed + num_chains > 2**32:
                raise ValueError(f"seed + num_chains must be at most 2**32 (NumPy's seed range), got seed={seed!r}")
        for name, value, cls in (
            ("convergence", convergence, Convergence),
            ("checkpoint", checkpoint, Checkpointing),
            ("evaluation", evaluation, Evaluation),
        ):
            if value is not None and not isinstance(value, cls):
                raise ValueError(f"{name} must be a {cls.__name__}(...) or None, got {name}={value!r}")
        if checkpoint is not None:
            check_writable_file(checkpoint.path, "Checkpointing.path")
        if max_time is not None and (
            isinstance(max_time, bool)
            or not isinstance(max_time, (int, float))
            or not max_time > 0
            or not math.isfinite(max_time)
        ):
            raise ValueError(f"max_time must be a positive number of seconds or None, got max_time={max_time!r}")
        callbacks = list(callbacks)
        for cb in callbacks:
            if not callable(cb):
                raise ValueError(f"callbacks must be callables callback(step, row), got {cb!r}")

        self.model = model
        self.guide = guide
        self.optim = optim
        self.loss = loss
        self.num_chains = num_chains
        self.seed = seed
        self.on_nonfinite = on_nonfinite
        self.progress_bar = progress_bar
        self.convergence = convergence
        self.checkpoint = checkpoint
        self.evaluation = evaluation
        self.max_time = max_time
        self.callbacks = callbacks
        self.scheduler_every = scheduler_every
        self.fused = fused

    def run(
        self,
        *args: Any,
        num_steps: int,
        model_kwargs: dict | None = None,
        batches: Iterable | Callable[[int], Any] | None = None,
        resume_from: str | os.PathLike | None = None,
    ) -> SVIResult:
        """
        Fit, and return the history and final parameters.

        :param args: the model's positional data, used at every step.
        :param int num_steps: total steps per chain (a resumed run continues up to it).
        :param dict model_kwargs: the model's keyword data.
        :param batches: per-step data: an iterable of batches (a list, a
            :class:`torch.utils.data.DataLoader`; re-iterated each epoch), or a callable
            ``batches(step) -> batch``. A batch that is a tuple or list is appended to
            ``args``, a dict updates ``model_kwargs``, anything else is appended as one
            argument. For exact resumes use a callable or a list.
        :param resume_from: a checkpoint written by :class:`Checkpointing`.

        Pyro's "Encountered NaN/inf" warnings are silenced while the run lasts (the
        runner checks values itself); other warnings follow the caller's filters.
        Each call starts its history at step 0 (or at the checkpoint's step); the loss's
        own step count, which drives β and capacity schedules, continues across calls
        on the same loss.

        :returns: the result; on Ctrl-C the partial result, with a warning.
        :rtype: SVIResult
        :raises NonFiniteError: on a NaN/Inf loss or gradient (``on_nonfinite="raise"``),
            non-finite parameters, or (with Pyro's validation on) a distribution whose
            arguments or value are invalid (a NaN, infinite or zero scale, a NaN value),
            naming the step and the sites; ``error.result`` (also
            ``error.partial_result``) is the partial result.

        **Nothing is lost.** Any exception raised during the run (a callback, an
        evaluation, a checkpoint write, the model) carries the partial result as
        ``error.partial_result``: an :class:`SVIResult` with the history up to the last
        completed step, whose update is the last one applied (``stop_reason="error"`` for
        the failed chain). A Ctrl-C (SIGINT, main thread) is held until the step under way
        is complete, then the run returns the partial result with a warning; a second
        Ctrl-C interrupts at once. A chain whose every step was skipped
        (``on_nonfinite="skip"``) stops with ``stop_reason="all_skipped"`` and a warning.

        :raises ValueError: for a bad ``num_steps``, ``model_kwargs`` or ``batches``,
            an evaluation with ``batches`` but no ``Evaluation.args``, or a
            ``resume_from`` that is missing, unreadable, foreign, or does not match this
            run (parameters, optimiser, loss, ``num_chains``, a ``num_steps`` below its
            step).
        """
        check_int("num_steps", num_steps, 0)
        model_kwargs = check_model_kwargs(model_kwargs)
        check_batches(batches)
        if isinstance(batches, Iterator) and self.num_chains > 1:
            raise ValueError(
                f"batches={batches!r} is a one-shot iterator and num_chains={self.num_chains}: the chains would share "
                "it (the first consumes the batches the others need). Pass batches as a list, a callable "
                "batches(step) -> batch, or a re-iterable such as a torch DataLoader"
            )
        if self.evaluation is not None and batches is not None and self.evaluation.args is None:
            raise ValueError(
                f"evaluation=Evaluation(every={self.evaluation.every}) with batches needs Evaluation.args, the data "
                "to estimate the evidence on (a minibatch is not the data set): pass "
                "SVIRunner(..., evaluation=Evaluation(every=N, args=(x_full,)))"
            )
        fingerprint = data_fingerprint(tuple(args), model_kwargs)
        ckpt = None
        if resume_from is not None:
            ckpt = read_checkpoint(resume_from)
            check_resume(ckpt, num_steps, fingerprint, num_chains=self.num_chains, optim=self.optim, loss=self.loss)

        seed = self.seed
        if ckpt is not None:
            seed = ckpt.meta["seed"]
        elif seed is None and self.num_chains > 1:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())

        # the chains the checkpoint records as done (a last one cut short continues)
        done: list[dict] = chains_done(ckpt, num_steps) if ckpt is not None else []
        # the checkpoint's run had finished (nothing to continue): read before the chains run
        finished_run = ckpt is not None and len(done) == len(ckpt.meta["chains_done"]) == self.num_chains == 1
        initial = initial_modules = None
        if self.num_chains > 1:
            # every chain starts from the store as it is now; parameters of modules that
            # pyro.module registers during the run are added (with their values before the
            # first update) by the first step that registers them
            if ckpt is not None:
                initial = ckpt.meta["initial_state"]
                initial_modules = dict(ckpt.meta["initial_modules"] or {})
            else:
                initial = store_state()
                initial_modules = {n: v for n, v in initial["params"].items() if is_module_param(n)}
        writer = None
        if self.checkpoint is not None:
            writer = CheckpointWriter(self.checkpoint.path)
            if ckpt is not None:
                writer.continue_from(ckpt)
        options = LoopOptions(
            on_nonfinite=self.on_nonfinite,
            scheduler_every=self.scheduler_every,
            max_time=self.max_time,
            evaluation=self.evaluation,
            callbacks=self.callbacks,
            progress_bar=self.progress_bar,
            num_chains=self.num_chains,
            checkpoint_every=None if self.checkpoint is None else self.checkpoint.every,
            fused=self.fused,
        )
        pristine: tuple[Any, Any, Any, Any] | None = None
        if self.num_chains > 1:
            pristine = (
                fresh_copy(self.model),
                fresh_copy(self.guide),
                copy.deepcopy(self.optim),
                copy.deepcopy(self.loss),
            )

        interrupted = False
        error: NonFiniteError | None = None
        for chain in range(len(done), self.num_chains):
            if pristine is not None:
                model, guide = fresh_copy(pristine[0]), fresh_copy(pristine[1])
                optim, loss = copy.deepcopy(pristine[2]), copy.deepcopy(pristine[3])
            else:
                model, guide, optim, loss = self.model, self.guide, self.optim, self.loss
            rule = self.convergence.make_rule() if self.convergence is not None else None
            save = None
            if writer is not None:
                save = make_saver(writer, self.num_chains, done, seed, initial, initial_modules, rule, fingerprint)
            loop = ChainLoop(chain, model, guide, optim, loss, options, rule, initial_modules, save)
            source = BatchSource(args, model_kwargs, batches)
            resume = ckpt if (ckpt is not None and ckpt.meta["chain"] == chain) else None
            if resume is None:
                if initial_modules is not None:
                    reset_modules(initial_modules)
                if initial is not None:
                    load_store(initial)
                if seed is not None:
                    pyro.set_rng_seed(seed + chain)
                start = 0
            else:
                start = resume_chain(loop, source, resume, done, rule)
            try:
                stop_reason = loop.run(source, num_steps, start)
            except NonFiniteError as e:
                stop_reason, error = "nonfinite", e
            except BaseException as e:
                # any other failure (a callback, an evaluation, a checkpoint write, the model
                # itself): the steps completed so far are kept, attached to the exception
                done.append(
                    {
                        "rows": loop.rows,
                        "state": store_state(),
                        "terms": getattr(loss, "last_terms", None),
                        "stop_reason": "error",
                    }
                )
                try:
                    attach_partial_result(e, self._result(done, args, model_kwargs, batches))
                except Exception:  # noqa: BLE001  never mask the original error
                    pass
                raise
            if stop_reason == "exhausted" and len(loop.rows) < num_steps:
                warnings.warn(
                    f"the batches ran out after {len(loop.rows)} of num_steps={num_steps} steps of chain {chain} "
                    "(stop_reason='exhausted'): pass more batches, a list or a DataLoader (re-iterated each epoch), "
                    "or a callable batches(step) -> batch",
                    UserWarning,
                    stacklevel=2,
                )
            if (
                stop_reason not in ("nonfinite", "interrupted")
                and loop.rows
                and start < len(loop.rows)
                and all(r.get("skipped", False) for r in loop.rows[start:])
            ):
                stop_reason = "all_skipped"
                warnings.warn(
                    f"every step of chain {chain} ({len(loop.rows) - start} steps) was skipped for non-finite values "
                    "(on_nonfinite='skip'): nothing was fitted (stop_reason='all_skipped'); see the history's "
                    "'skipped' column and fix the model or the learning rate",
                    UserWarning,
                    stacklevel=2,
                )
            # without a rule, the objective's final window is judged (no parameter iterates were kept)
            judge = rule if rule is not None else Convergence(params=False).make_rule()
            done.append(
                {
                    "rows": loop.rows,
                    "state": store_state(),
                    "terms": getattr(loss, "last_terms", None),
                    "stop_reason": stop_reason,
                    "convergence": judge.evidence(loop.rows, stop_reason == "converged"),
                }
            )
            if error is not None:
                break
            if save is not None and not loop.hard_interrupt:
                # the chain's last checkpoint records it as done: a resume from it reproduces it
                try:
                    save(loop, len(loop.rows), finished=True)
                except BaseException as e:
                    try:
                        attach_partial_result(e, self._result(done, args, model_kwargs, batches))
                    except Exception:  # noqa: BLE001  never mask the original error
                        pass
                    raise
            if stop_reason == "interrupted" or loop.interrupted:  # a Ctrl-C during a chain's last step too
                interrupted = True
                break
        if ckpt is not None and finished_run:
            # the checkpoint's run had finished: its parameters are the result's, and the
            # optimiser, loss and RNG are left as the finished run left them
            resume_chain(
                ChainLoop(0, self.model, self.guide, self.optim, self.loss, options),
                BatchSource(args, model_kwargs, batches),
                ckpt,
                done,
                None,
            )
            load_store(done[0]["state"])

        result = self._result(done, args, model_kwargs, batches)
        if error is not None:
            attach_partial_result(error, result)
            raise error
        if interrupted:
            warnings.warn(
                f"SVIRunner.run was interrupted (KeyboardInterrupt) after {result.num_steps[-1]} completed steps of "
                f"chain {len(done) - 1} (stop_reason={done[-1]['stop_reason']!r}); returning the partial result"
                + (f" with {len(done)} of {self.num_chains} chains." if len(done) < self.num_chains else "."),
                UserWarning,
                stacklevel=2,
            )
        return result

    # -- result -----------------------------------------------------------------------------------

    def _result(
        self,
        done: list[dict],
        args: tuple[Any, ...],
        model_kwargs: Mapping[str, Any],
        batches: Iterable | Callable[[int], Any] | None,
    ) -> SVIResult:
        import pandas as pd

        frames = []
        for i, outcome in enumerate(done):
            frame = pd.DataFrame.from_records(outcome["rows"]) if outcome["rows"] else pd.DataFrame({"step": []})
            if self.num_chains > 1:
                frame.insert(0, "chain", i)
            frames.append(frame)
        history = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        if "step" in history.columns:
            history["step"] = history["step"].astype("int64")
        window = self.convergence.window if self.convergence is not None else Convergence().window
        scores = [final_score(o["rows"], window) for o in done]
        best = max(range(len(done)), key=lambda i: -math.inf if math.isnan(scores[i]) else scores[i])
        if len(done) > 1:
            load_store(done[best]["state"])
        return SVIResult(
            history=history,
            chain_states=[o["state"] for o in done],
            terms=[o["terms"] for o in done],
            stop_reasons=[o["stop_reason"] for o in done],
            convergence=[o.get("convergence") for o in done],
            best_chain=best,
            model=self.model,
            guide=self.guide,
            args=None if batches is not None else tuple(args),
            model_kwargs=dict(model_kwargs),
        )
