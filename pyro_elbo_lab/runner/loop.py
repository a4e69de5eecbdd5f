# SPDX-License-Identifier: Apache-2.0
"""
One chain of a run: the step loop (the update, the non-finite check before it, the history
row, evaluation, callbacks, checkpoints, stopping) and its state. It gets the objects and
options it needs; it holds no reference to the runner.

**Non-finite values.** The loss is computed and its gradients accumulated first; the
loss value and every gradient are checked before the optimiser touches the parameters.
On an accelerator a step synchronises with the device a few times, not once: reading the
loss value, the all-finite check of the gradients (one reduction over all of them) and
reading :attr:`~pyro_elbo_lab.BetaELBO.last_terms` into the history. A step with a NaN
or infinite loss or gradient is therefore never applied: the parameter store still
holds the last parameters produced by a finite update, with no per-step copy of the
parameters. Only on such a step are the culprit ELBO terms, sites and parameters looked
up, from :attr:`~pyro_elbo_lab.BetaELBO.last_terms` and the parameter store, without
another model/guide pass.

**The fused step** (``SVIRunner(fused=True)``): the gradients and the optimiser's update
run as one compiled graph (:class:`~pyro_elbo_lab.losses.fused.FusedSVI`), which computes
the finite flag (loss and every gradient) itself and applies the update only where it
holds; the loop reads the flag with the loss (one synchronisation) and skips or raises as
for an unfused step, with the same history row. Steps the graph cannot take (the first,
the first after a resume) run unfused.

The non-finite check itself, the diagnostic pass and the error are
:mod:`pyro_elbo_lab.runner.nonfinite`'s.

Imports :mod:`pyro_elbo_lab.runner` siblings, and :mod:`pyro_elbo_lab.diagnostics` and
:mod:`pyro_elbo_lab.losses.fused` when it needs them.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyro
import pyro.poutine as poutine
import pyro.util
import torch

from .batches import BatchSource, Exhausted
from .nonfinite import all_finite_grads, invalid_sites, is_invalid_value_error, nonfinite_error
from .options import Evaluation
from .params import nonfinite_params, record_modules, store_state

if TYPE_CHECKING:
    from ..losses.fused import FusedSVI
    from .stopping import RhatRule

__all__ = ["ChainLoop", "LoopOptions", "NAN_WARNING"]

#: Pyro's "Encountered NaN/inf" warning, silenced while a run lasts (the loop checks itself).
NAN_WARNING = r"Encountered (NaN|[+-]?inf)"


@dataclass
class LoopOptions:
    """What every chain of a run shares."""

    on_nonfinite: str = "raise"
    scheduler_every: int = 1
    max_time: float | None = None
    evaluation: Evaluation | None = None
    callbacks: list = field(default_factory=list)
    progress_bar: bool = False
    num_chains: int = 1
    checkpoint_every: int | None = None
    fused: bool = False


class ChainLoop:
    """
    The step loop of one chain.

    :param int chain: the chain's index.
    :param model: the chain's model.
    :param guide: the chain's guide.
    :param optim: the chain's :class:`pyro.optim.PyroOptim`.
    :param loss: the chain's ELBO.
    :param LoopOptions options: shared options.
    :param rule: the convergence rule (``should_stop(rows, step)``) or None.
    :param dict initial_modules: ``{name: start value}`` of :func:`pyro.module` parameters
        (several chains), filled by the first step that registers them; or None.
    :param save: ``save(loop, steps_done)`` writes a checkpoint, or None.
    """

    def __init__(
        self,
        chain: int,
        model: Callable,
        guide: Callable,
        optim: pyro.optim.PyroOptim,
        loss: Any,
        options: LoopOptions,
        rule: RhatRule | None = None,
        initial_modules: dict | None = None,
        save: Callable[..., None] | None = None,
    ):
        self.chain = chain
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        self.options = options
        self.rule = rule
        self.initial_modules = initial_modules
        self.save = save
        self.rows: list[dict] = []
        self.elapsed0 = 0.0
        self.t0 = time.perf_counter()
        self.has_state = hasattr(loss, "state_dict") and hasattr(loss, "load_state_dict")
        self._last_postfix = 0.0
        self.interrupted = self.hard_interrupt = False
        self.last_iterate: dict | None = None  # the store before averaged iterates replaced it
        # the fused step (gradients and update in one compiled graph), or None: every step unfused
        self.fused: FusedSVI | None = None
        if options.fused:
            from ..losses.fused import FusedSVI

            self.fused = FusedSVI(model, guide, optim, loss)

    def wall_time(self) -> float:
        """Seconds of this chain so far, resumed runs included."""
        return self.elapsed0 + time.perf_counter() - self.t0

    def warm_up(self, args: tuple, model_kwargs: dict) -> set[str]:
        """
        Before a resume: one pass of the loss without gradients, so that lazy set-up that
        consumes random numbers (autoguide prototypes, the loss's plate-nesting guess,
        :func:`pyro.module` parameters) happens before the RNG state is restored.

        :returns: the names of the parameters the pass registered.
        """
        with torch.no_grad(), warnings.catch_warnings(), poutine.trace(param_only=True) as capture:
            warnings.filterwarnings("ignore", message=NAN_WARNING)
            if hasattr(self.loss, "decompose"):
                self.loss.decompose(self.model, self.guide, *args, **model_kwargs)
            else:
                self.loss.loss(self.model, self.guide, *args, **model_kwargs)
        return set(capture.trace.nodes)

    def run(self, batches: BatchSource, num_steps: int, start: int = 0) -> str:
        """
        Steps ``start .. num_steps - 1``.

        :returns: the stop reason.
        :raises NonFiniteError: on a non-finite step that is not skipped.
        """
        self.t0 = time.perf_counter()
        bar = self._bar(num_steps, start)
        stop_reason = "num_steps"
        options = self.options
        deadline = None if options.max_time is None else self.t0 + options.max_time
        self.interrupted = False
        self.hard_interrupt = False
        self.last_iterate = None
        previous = self._defer_sigint()
        try:
            # opened once per run, not per step: entering catch_warnings resets Python's
            # warning registry, so a "once"/"default" warning of the model would fire on
            # every step
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=NAN_WARNING)
                for step in range(start, num_steps):
                    if deadline is not None and time.perf_counter() >= deadline:
                        stop_reason = "max_time"
                        break
                    try:
                        args, model_kwargs = batches.get(step)
                    except Exhausted:
                        stop_reason = "exhausted"
                        break
                    row = self.step(step, args, model_kwargs)
                    if self.rule is not None and hasattr(self.rule, "observe"):
                        self.rule.observe(pyro.get_param_store().named_parameters())
                        if getattr(self.rule, "averaging_since", None) is not None:
                            row["averaged_iterates"] = self.rule.count
                    if bar is not None:
                        bar.update(1)
                        self._postfix(bar, row)
                    evaluation = options.evaluation
                    if evaluation is not None and (step + 1) % evaluation.every == 0:
                        row.update(self.evaluate(evaluation, batches))
                    stop = False
                    for cb in options.callbacks:
                        stop = bool(cb(step, row)) or stop
                    # decide first, then checkpoint, so that a checkpoint holds the rule's state
                    # after this step's check; a chain that ends here gets its checkpoint from
                    # the runner, which records the chain as done
                    if stop:
                        stop_reason = "callback"
                        break
                    if self.rule is not None and self.rule.should_stop(self.rows, step):
                        stop_reason = "converged"
                        break
                    if self.interrupted:
                        stop_reason = "interrupted"
                        break
                    every = options.checkpoint_every
                    if self.save is not None and every is not None and (step + 1) % every == 0 and step + 1 < num_steps:
                        self.save(self, step + 1)
            # every end but an error or a hard interrupt: the averaged iterates, if any, become
            # the parameters, so that what the result reports is what the store holds
            if self.rule is not None and hasattr(self.rule, "finish"):
                if getattr(self.rule, "averaging_since", None) is not None:
                    self.last_iterate = store_state()  # a checkpoint continues from it, not from the average
                self.rule.finish()
        except KeyboardInterrupt:
            # a second Ctrl-C within a step: that step may be half done
            stop_reason = "interrupted"
            self.hard_interrupt = True
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            if bar is not None:
                bar.close()
        return stop_reason

    def _defer_sigint(self):
        """
        In the main thread, with Python's default SIGINT handler: hold a Ctrl-C until the
        step under way is complete (update, history row, evaluation, callbacks, checkpoint),
        so that an interrupted run keeps parameters and history that agree. A second Ctrl-C
        interrupts at once.

        :returns: the handler to put back, or None when none was installed.
        """
        if (
            threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
        ):
            return None

        def handler(signum, frame):
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True

        return signal.signal(signal.SIGINT, handler)

    def step(self, step: int, args: tuple, model_kwargs: dict) -> dict:
        """One update and its history row (appended to :attr:`rows`)."""
        if self.fused is not None:
            fused_row = self.fused_step(step, args, model_kwargs)
            if fused_row is not None:
                return fused_row
        loss_state = self.loss.state_dict() if self.has_state else None
        params: set = set()
        try:
            try:
                with poutine.trace(param_only=True) as capture:
                    loss = self.loss.loss_and_grads(self.model, self.guide, *args, **model_kwargs)
            except ValueError as e:
                # with validation on, a NaN, infinite or zero scale (or a NaN value) surfaces as a
                # distribution's argument check instead of a non-finite loss: the same fault
                if nonfinite_params() or is_invalid_value_error(e):
                    sites = invalid_sites(self.model, self.guide, args, model_kwargs) if not nonfinite_params() else {}
                    if self.options.on_nonfinite == "skip" and not nonfinite_params():
                        for _, p in pyro.get_param_store().named_parameters():
                            p.grad = None
                        if loss_state is not None:
                            self.loss.load_state_dict(loss_state)
                        skipped = {"step": step, "loss": math.nan, "wall_time": self.wall_time(), "skipped": True}
                        self.rows.append(skipped)
                        return skipped
                    raise nonfinite_error(self.loss, self.chain, step, math.nan, set(), e, sites) from e
                raise
            params = {
                site["value"].unconstrained() for site in capture.trace.nodes.values() if site["value"] is not None
            }
            if self.initial_modules is not None:
                record_modules(capture.trace, self.initial_modules)
            loss = float(loss[0] if isinstance(loss, tuple) else loss)
            finite = math.isfinite(loss) and all_finite_grads(params)
            error = None
            if not finite and (self.options.on_nonfinite == "raise" or nonfinite_params()):
                # before the gradients are cleared; losses without per-site terms: one diagnostic pass
                located = (
                    None
                    if getattr(self.loss, "last_terms", None) is not None
                    else invalid_sites(self.model, self.guide, args, model_kwargs)
                )
                error = nonfinite_error(self.loss, self.chain, step, loss, params, None, located)
            if error is not None:
                raise error
            # the row is built before the update, so that the update and the row go together
            row: dict[str, Any] = {"step": step, "loss": loss}
            terms = getattr(self.loss, "last_terms", None)
            if terms is not None:
                row.update(terms.as_dict(per_site=True))
            row["wall_time"] = self.wall_time()
            if self.options.on_nonfinite == "skip":
                row["skipped"] = not finite
            if finite:
                self.optim(list(params))
            elif loss_state is not None:
                # a skipped step is no optimiser step: the β / capacity schedules do not advance
                self.loss.load_state_dict(loss_state)
            self.rows.append(row)
        except BaseException:
            # leave no half-done step behind: gradients cleared, the loss's step count back
            for _, p in pyro.get_param_store().named_parameters():
                p.grad = None
            if loss_state is not None:
                self.loss.load_state_dict(loss_state)
            raise
        pyro.infer.util.zero_grads(params)
        if finite:
            self._scheduler_step(step, loss)
        return row

    def fused_step(self, step: int, args: tuple, model_kwargs: dict) -> dict | None:
        """
        One step of the fused graph (:meth:`~pyro_elbo_lab.losses.fused.FusedSVI.fused_step`)
        and its history row, or ``None`` (nothing done) when this step cannot be fused and
        must run unfused. The graph applies the update only if the loss and every gradient
        are finite; the flag is read with the loss, and the rest (skip or raise, the row,
        the learning-rate scheduler) is as for an unfused step.
        """
        assert self.fused is not None
        loss_state = self.loss.state_dict() if self.has_state else None
        try:
            outcome = self.fused.fused_step(*args, **model_kwargs)
            if outcome is None:
                return None
            finite = outcome.finite
            if not finite and (self.options.on_nonfinite == "raise" or nonfinite_params()):
                grads = outcome.nonfinite_grads
                raise nonfinite_error(self.loss, self.chain, step, outcome.loss, outcome.params, None, grads=grads)
            row: dict[str, Any] = {"step": step, "loss": outcome.loss}
            terms = getattr(self.loss, "last_terms", None)
            if terms is not None:
                row.update(terms.as_dict(per_site=True))
            row["wall_time"] = self.wall_time()
            if self.options.on_nonfinite == "skip":
                row["skipped"] = not finite
            if not finite and loss_state is not None:
                self.loss.load_state_dict(loss_state)  # as for an unfused skipped step
            self.rows.append(row)
        except BaseException:
            # the loss's step count back, as for an unfused step (the graph applied no update)
            if loss_state is not None:
                self.loss.load_state_dict(loss_state)
            raise
        if finite:
            self._scheduler_step(step, outcome.loss)
        return row

    def _scheduler_step(self, step: int, loss: float) -> None:
        """After an applied update: step a learning-rate scheduler every ``scheduler_every`` steps."""
        if isinstance(self.optim, pyro.optim.PyroLRScheduler) and (step + 1) % self.options.scheduler_every == 0:
            plateau = any(
                isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) for s in self.optim.optim_objs.values()
            )
            self.optim.step(loss) if plateau else self.optim.step()

    def evaluate(self, evaluation: Evaluation, batches: BatchSource) -> dict:
        """The ``eval_*`` columns: :func:`~pyro_elbo_lab.estimate_evidence` with PSIS."""
        from ..diagnostics import ImportanceSamplingWarning, estimate_evidence

        args = evaluation.args if evaluation.args is not None else batches.args
        model_kwargs = evaluation.model_kwargs if evaluation.model_kwargs is not None else batches.model_kwargs
        # k̂ is recorded in the history (eval_pareto_k): no warning for each evaluation of a
        # guide that is still far from the posterior
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ImportanceSamplingWarning)
            est = estimate_evidence(
                self.model,
                self.guide,
                *args,
                model_kwargs=model_kwargs,
                num_samples=evaluation.num_samples,
                psis=True,
            )
        return {
            "eval_log_evidence": float(est.log_evidence),
            "eval_log_evidence_stderr": float(est.log_evidence_stderr),
            "eval_elbo": float(est.elbo),
            "eval_gap": float(est.gap),
            "eval_pareto_k": float(est.pareto_k),  # nan below 21 draws, -inf for constant weights
            "eval_ess": float(est.ess),
        }

    def _bar(self, num_steps, start):
        if not self.options.progress_bar or not sys.stderr.isatty() or num_steps <= start:
            return None
        from tqdm.auto import tqdm

        desc = f"chain {self.chain}" if self.options.num_chains > 1 else "SVI"
        return tqdm(total=num_steps, initial=start, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def _postfix(self, bar: Any, row: dict) -> None:
        now = time.perf_counter()
        if now - self._last_postfix < 0.2:
            return
        self._last_postfix = now
        keys = (("loss", "loss"), ("elbo", "elbo"), ("reconstruction", "rec"), ("kl", "kl"), ("beta", "β"))
        bar.set_postfix({short: f"{row[k]:.4g}" for k, short in keys if k in row}, refresh=False)
