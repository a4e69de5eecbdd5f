# SPDX-License-Identifier: Apache-2.0
"""
An SVI training loop that records the ELBO's decomposition on every step.

:class:`SVIRunner` takes the place of a hand-written ``for step in range(n): svi.step()``
loop. It keeps a per-step history (a :class:`pandas.DataFrame`) of the terms the loss
already computed (:attr:`pyro_elbo_lab.BetaELBO.last_terms`), shows them in a tqdm
progress bar, stops on convergence, a wall-time limit, Ctrl-C or non-finite values,
writes resumable checkpoints and can run several independent fits (chains) from
different seeds. The result, :class:`SVIResult`, converts to ArviZ
(:func:`pyro_elbo_lab.to_inference_data`).

**Non-finite values.** The loss is computed and its gradients accumulated first; the
loss value and every gradient are checked before the optimiser touches the parameters.
On an accelerator a step synchronises with the device a few times, not once: reading the
loss value, the all-finite check of the gradients (one reduction over all of them) and
reading :attr:`~pyro_elbo_lab.BetaELBO.last_terms` into the history each wait for the
device (besides any synchronisation inside the loss itself). A step with a NaN or infinite loss or gradient
is therefore never applied: the parameter store still holds the last parameters
produced by a finite update, with no per-step copy of the parameters (which would
double the memory traffic of a large model). Only on such a step are the culprit ELBO
terms, sites and parameters looked up, from :attr:`~pyro_elbo_lab.BetaELBO.last_terms`
and the parameter store, without another model/guide pass.
"""
from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import pyro
import pyro.poutine as poutine
import pyro.util

__all__ = ["SVIRunner", "SVIResult", "NonFiniteError", "SVISummary"]

#: Checkpoint format tag, checked on resume.
CHECKPOINT_FORMAT = "pyro_elbo_lab.checkpoint/1"

_NAN_WARNING = r"Encountered (NaN|[+-]?inf)"


class NonFiniteError(ValueError):
    """
    A step produced a NaN or infinite loss or gradient (or a distribution saw non-finite
    parameters). The update of that step was not applied.

    :ivar int step: the step (0-based, the count the loss's schedules see).
    :ivar list terms: names of the non-finite ELBO totals (``"reconstruction"``,
        ``"kl"``, ...); empty for losses that do not record terms.
    :ivar dict sites: ``{site: [non-finite terms]}``.
    :ivar list grads: names of parameters with non-finite gradients.
    :ivar list params: names of parameters with non-finite values.
    :ivar SVIResult result: the partial result: history up to (excluding) ``step`` and
        the last finite parameters.
    """

    def __init__(
        self,
        message: str,
        *,
        step: int,
        terms: list[str],
        sites: dict[str, list[str]],
        grads: list[str],
        params: list[str],
        result: SVIResult | None = None,
    ):
        super().__init__(message)
        self.step = step
        self.terms = terms
        self.sites = sites
        self.grads = grads
        self.params = params
        self.result = result


# ------------------------------------------------------------------------------------------
# result


@dataclass
class SVIResult:
    """
    The outcome of :meth:`SVIRunner.run`.

    :ivar pandas.DataFrame history: one row per step (and chain): ``step``, ``loss``
        (nats), ``objective``, ``elbo``, ``reconstruction``, ``kl``, ``entropy``,
        ``cross_entropy``, ``expected_log_joint``, ``beta`` and the per-site terms
        (``"kl/z"``) of the loss's :class:`~pyro_elbo_lab.ELBOTerms` (only ``loss``
        for losses without terms), ``wall_time`` (seconds since the start of the run),
        ``chain`` when there are several, ``skipped`` with ``on_nonfinite="skip"``, and
        at evaluation steps ``eval_log_evidence``, ``eval_log_evidence_stderr``,
        ``eval_elbo``, ``eval_gap``, ``eval_pareto_k``, ``eval_ess``.
    :ivar list chain_states: per chain, the parameter-store state (as
        :meth:`pyro.params.param_store.ParamStoreDict.get_state`) at its end.
    :ivar list terms: per chain, the :class:`~pyro_elbo_lab.ELBOTerms` of its last
        step (``None`` for losses without terms).
    :ivar list stop_reasons: per chain, why it stopped: ``"num_steps"``,
        ``"converged"``, ``"max_time"``, ``"interrupted"``, ``"callback"``,
        ``"exhausted"`` (the batches ran out) or ``"nonfinite"``.
    :ivar int best_chain: the chain with the highest final smoothed objective; its
        parameters are left in Pyro's parameter store.
    """

    history: Any
    chain_states: list[dict]
    terms: list[Any]
    stop_reasons: list[str]
    best_chain: int = 0
    model: Callable | None = field(default=None, repr=False)
    guide: Callable | None = field(default=None, repr=False)
    args: tuple = field(default=(), repr=False)
    kwargs: dict = field(default_factory=dict, repr=False)

    @property
    def num_chains(self) -> int:
        return len(self.chain_states)

    @property
    def stop_reason(self) -> str:
        """Why the last chain stopped."""
        return self.stop_reasons[-1]

    @property
    def num_steps(self) -> list[int]:
        """Steps completed per chain (skipped steps included)."""
        if "chain" in self.history.columns:
            return [int((self.history["chain"] == c).sum()) for c in range(self.num_chains)]
        return [len(self.history)]

    @property
    def params(self) -> dict[str, torch.Tensor]:
        """Constrained parameter values of :attr:`best_chain`, detached."""
        return _constrained_params(self.chain_states[self.best_chain])

    def chain_history(self, chain: int):
        """The history rows of one chain."""
        if "chain" not in self.history.columns:
            return self.history
        return self.history[self.history["chain"] == chain].reset_index(drop=True)

    @contextmanager
    def use_params(self, chain: int | None = None):
        """
        Load a chain's parameters into Pyro's parameter store for the duration of the
        ``with`` block; the store is restored afterwards.

        The values are copied in place into the parameters already in the store (so a
        module registered with :func:`pyro.module`, which keeps using its own
        parameters, sees them too) and copied back afterwards; the store's tensor
        objects, and with them the optimiser's per-parameter state, are unchanged.

        :param int chain: the chain (default :attr:`best_chain`).
        :raises ValueError: if ``chain`` is not in ``[0, num_chains)``.
        """
        chain = self.best_chain if chain is None else chain
        if not 0 <= chain < self.num_chains:
            raise ValueError(f"chain must be in [0, {self.num_chains}), got {chain!r}")
        store = pyro.get_param_store()
        tensors = dict(store._params)  # the very tensor objects, put back afterwards
        saved = _store_state()  # their values, copied back in place
        _load_store(self.chain_states[chain])
        try:
            yield
        finally:
            for name in [n for n in store.keys() if store._params[n] is not tensors.get(n)]:
                del store[name]
            store.set_state(
                {
                    "params": {n: t for n, t in tensors.items() if n not in store._params},
                    "constraints": {n: saved["constraints"][n] for n in tensors if n not in store._params},
                }
            )
            _load_store(saved)

    def _data_args(self, args, kwargs) -> tuple[tuple, dict]:
        """The run's data, with positional ``args`` replacing its positional data and
        ``kwargs`` updating its keyword data."""
        if not args and not kwargs and self.args is None:
            raise ValueError(
                "this result was fitted on minibatches, so it has no data of its own: pass the data, "
                "e.g. result.to_inference_data(x_full)"
            )
        return tuple(args) or tuple(self.args or ()), {**self.kwargs, **kwargs}

    def to_inference_data(self, *args, num_samples: int = 1000, **kwargs):
        """
        An :class:`arviz.InferenceData` with every chain's guide draws as a chain, the
        pointwise log-likelihood, observed data, per-draw importance weights and this
        result's history in the ``optimization_history`` group. See
        :func:`pyro_elbo_lab.to_inference_data` for the groups and options.

        :param args: the model's data; default the positional arguments of the run
            (not available after a minibatch run: pass the full data).
        :param int num_samples: draws per chain.
        :param kwargs: model keyword arguments (updating those of the run) and the
            options of :func:`~pyro_elbo_lab.to_inference_data` (``coords``, ``dims``,
            ``constant_data``, ``posterior_predictive``, ``max_plate_nesting``).
        :rtype: arviz.InferenceData
        :raises ValueError: after a minibatch run without data given; and as
            :func:`~pyro_elbo_lab.to_inference_data` (bad ``num_samples`` or ``dims``, a
            model without sample sites).
        """
        from .inference_data import _OPTION_NAMES, to_inference_data

        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_NAMES}
        args, kwargs = self._data_args(args, kwargs)
        return to_inference_data(
            self.model, self.guide, *args, num_samples=num_samples, _result=self, **options, **kwargs
        )

    def summary(self, *args, num_samples: int = 1000, idata=None, last: int = 50, **kwargs) -> SVISummary:
        """
        A report of the fit: ``az.summary`` of the guide's draws beside the
        PSIS-corrected posterior means, and a VI table per chain.

        The VI table has the ELBO terms averaged over the last ``last`` steps (nats), the
        log-evidence estimate :math:`\\log \\frac{1}{S}\\sum_s w_s` with its standard
        error, the gap :math:`\\log p(x) - \\mathrm{ELBO}` (an estimate of
        :math:`\\mathrm{KL}(q \\| p(z \\mid x))`), Pareto :math:`\\hat k` with its
        verdict, the importance-sampling ESS, and the largest :math:`\\hat R` of the
        posterior across chains (NaN for one chain). All are computed from the
        ``sample_stats`` of the InferenceData.

        :param args: the model's data (default: the run's).
        :param int num_samples: draws per chain when ``idata`` is not given.
        :param arviz.InferenceData idata: reuse an existing conversion.
        :param int last: steps averaged for the ELBO terms.
        :rtype: SVISummary
        :raises ValueError: as :meth:`to_inference_data` when ``idata`` is not given, or
            if ``last`` is not a positive integer.
        """
        from .inference_data import summarize

        if idata is None:
            idata = self.to_inference_data(*args, num_samples=num_samples, **kwargs)
        return summarize(idata, self.history, last=last)


@dataclass
class SVISummary:
    """
    :ivar pandas.DataFrame posterior: ``az.summary`` of the guide's draws with a
        ``psis_mean`` column (PSIS-corrected posterior mean, averaged over chains) beside
        the raw guide ``mean``.
    :ivar pandas.DataFrame vi: one row per chain: final ELBO terms, ``log_evidence``,
        ``log_evidence_stderr``, ``gap``, ``pareto_k``, ``verdict``, ``ess``, ``r_hat``.
    """

    posterior: Any
    vi: Any

    def __str__(self) -> str:
        import pandas as pd

        with pd.option_context("display.width", 120, "display.max_columns", 20):
            return f"Variational inference\n{self.vi}\n\nPosterior (guide draws)\n{self.posterior}"

    def _repr_html_(self) -> str:
        return (
            "<h4>Variational inference</h4>" + self.vi.to_html() + "<h4>Posterior (guide draws)</h4>"
            + self.posterior.to_html()
        )


# ------------------------------------------------------------------------------------------
# the runner


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

    **Convergence** (``convergence_tol``): every ``convergence_window`` steps the mean
    objective (:math:`-\\mathrm{loss}`) over the last window is compared with the mean over
    the window before it; the run stops when the improvement
    :math:`\\bar{\\mathcal L}_{k} - \\bar{\\mathcal L}_{k-1} < \\mathrm{tol} \\cdot
    |\\bar{\\mathcal L}_{k}|` at ``convergence_patience`` consecutive checks. Window means
    reduce the Monte Carlo noise of single-step estimates by :math:`\\sqrt{w}`, and
    patience guards against one noisy flat window. No check counts while β or the
    capacity changed within the two windows (the objective moves with its schedule).

    **Chains** (``num_chains > 1``): independent fits, each from a fresh parameter
    store, fresh copies of the optimiser and loss (and of the model and guide when they
    are :class:`torch.nn.Module` s, e.g. autoguides), seeded ``seed + chain``. Their
    final parameters are kept as chains, so that :math:`\\hat R` of the guide draws
    across chains flags multimodality or failed optimisation. A module registered with
    :func:`pyro.module` by a plain function or a bound method (as in a VAE's
    ``self.model``) is shared by the chains: its parameters are reset in place, before
    each chain, to the weights it had when the run first registered them, so every
    chain starts from the same weights; :meth:`SVIResult.use_params` and the ArviZ
    conversion copy each chain's values into the module's own parameters.

    :param model: a Pyro model.
    :param guide: a Pyro guide.
    :param pyro.optim.PyroOptim optim: a Pyro optimiser or learning-rate scheduler.
    :param loss: an ELBO (default :class:`~pyro_elbo_lab.BetaELBO` ``()``).
    :param bool progress_bar: show a tqdm bar with loss, ELBO, reconstruction, KL and β
        (only when stderr is a terminal).
    :param int num_chains: independent fits.
    :param int seed: chain ``c`` is seeded with ``seed + c``; None keeps the current
        RNG state for a single chain and draws a base seed from it for several.
    :param str on_nonfinite: ``"raise"`` (raise :class:`NonFiniteError`) or ``"skip"``
        (drop the step's update, as NumPyro's ``stable_update``; it is recorded with
        ``skipped=True``). Non-finite *parameters* always raise.
    :param float convergence_tol: relative tolerance of the convergence check; None
        disables it.
    :param int convergence_window: steps per window of the convergence check.
    :param int convergence_patience: consecutive flat windows before stopping.
    :param float max_time: wall-time limit per chain, in seconds.
    :param int checkpoint_every: write a checkpoint every this many steps (needs
        ``checkpoint_path``).
    :param str checkpoint_path: the checkpoint file (overwritten atomically).
    :param int evaluate_every: every this many steps, estimate the evidence with
        :func:`pyro_elbo_lab.estimate_evidence` (PSIS on) on ``eval_args`` /
        ``eval_kwargs`` (default: the run's data) and record ``eval_*`` columns.
    :param tuple eval_args: data for the evaluation.
    :param dict eval_kwargs: keyword data for the evaluation.
    :param int eval_num_samples: importance samples per evaluation.
    :param callbacks: callables ``callback(step, row) -> bool | None`` called after each
        step with the history row (a dict); returning True stops the run.
    :param int scheduler_every: for learning-rate schedulers, call ``optim.step()``
        every this many steps (``ReduceLROnPlateau`` receives the loss).
    :raises ValueError: for invalid options.

    Example::

        runner = SVIRunner(model, guide, pyro.optim.Adam({"lr": 0.01}), BetaELBO(beta=4.0))
        result = runner.run(data, num_steps=2000)
        result.history.plot(x="step", y=["elbo", "kl"])
        idata = result.to_inference_data(data)

    References

    [1] `Automatic Differentiation Variational Inference`, Alp Kucukelbir, Dustin Tran,
        Rajesh Ranganath, Andrew Gelman, David M. Blei (2017)

    [2] `Composable Effects for Flexible and Accelerated Probabilistic Programming in
        NumPyro`, Du Phan, Neeraj Pradhan, Martin Jankowiak (2019)
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim,
        loss=None,
        *,
        progress_bar: bool = True,
        num_chains: int = 1,
        seed: int | None = None,
        on_nonfinite: str = "raise",
        convergence_tol: float | None = None,
        convergence_window: int = 100,
        convergence_patience: int = 2,
        max_time: float | None = None,
        checkpoint_every: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        evaluate_every: int | None = None,
        eval_args: tuple | None = None,
        eval_kwargs: dict | None = None,
        eval_num_samples: int = 1000,
        callbacks: Iterable[Callable] = (),
        scheduler_every: int = 1,
    ):
        if loss is None:
            from .losses import BetaELBO

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
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        _check_count("num_chains", num_chains)
        _check_count("convergence_window", convergence_window)
        _check_count("convergence_patience", convergence_patience)
        _check_count("eval_num_samples", eval_num_samples)
        _check_count("scheduler_every", scheduler_every)
        if convergence_tol is not None and not (isinstance(convergence_tol, (int, float)) and convergence_tol >= 0):
            raise ValueError(f"convergence_tol must be a number >= 0 or None, got {convergence_tol!r}")
        if max_time is not None and not (isinstance(max_time, (int, float)) and max_time > 0):
            raise ValueError(f"max_time must be a positive number of seconds or None, got {max_time!r}")
        if checkpoint_every is not None:
            _check_count("checkpoint_every", checkpoint_every)
            if checkpoint_path is None:
                raise ValueError("checkpoint_every needs checkpoint_path, the file to write checkpoints to")
        if evaluate_every is not None:
            _check_count("evaluate_every", evaluate_every)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an integer or None, got {seed!r}")
        callbacks = list(callbacks)
        for cb in callbacks:
            if not callable(cb):
                raise ValueError(f"callbacks must be callables callback(step, row), got {cb!r}")

        self.model = model
        self.guide = guide
        self.optim = optim
        self.loss = loss
        self.progress_bar = progress_bar
        self.num_chains = num_chains
        self.seed = seed
        self.on_nonfinite = on_nonfinite
        self.convergence_tol = convergence_tol
        self.convergence_window = convergence_window
        self.convergence_patience = convergence_patience
        self.max_time = max_time
        self.checkpoint_every = checkpoint_every
        self.checkpoint_path = None if checkpoint_path is None else os.fspath(checkpoint_path)
        self.evaluate_every = evaluate_every
        self.eval_args = eval_args
        self.eval_kwargs = eval_kwargs
        self.eval_num_samples = eval_num_samples
        self.callbacks = callbacks
        self.scheduler_every = scheduler_every

    # -- public ---------------------------------------------------------------------------

    def run(
        self,
        *args,
        num_steps: int,
        batches: Iterable | Callable[[int], Any] | None = None,
        resume_from: str | os.PathLike | None = None,
        **kwargs,
    ) -> SVIResult:
        """
        Fit, and return the history and final parameters.

        :param args: model/guide arguments used at every step (the data).
        :param int num_steps: total steps per chain (a resumed run continues up to it).
        :param batches: per-step data: an iterable of batches (a list, a
            :class:`torch.utils.data.DataLoader`; re-iterated each epoch), or a callable
            ``batches(step) -> batch``. A batch that is a tuple or list is appended to
            ``args``, a dict updates ``kwargs``, anything else is appended as one
            argument. For exact resumes use a callable or a list.
        :param resume_from: a checkpoint written by this runner's ``checkpoint_every``.
        :param kwargs: model/guide keyword arguments.

        Warnings: Pyro's "Encountered NaN/inf" warnings are silenced while the run
        lasts (the runner checks values itself); other warnings of the model, guide
        and callbacks follow the caller's filters, so a ``"once"`` warning shows once
        per run (an evaluation, ``evaluate_every``, resets Python's warning registry).

        Each call starts its history at step 0 (or at the checkpoint's step); the
        loss's own step count, which drives β and capacity schedules, continues across
        calls on the same loss (a new chain's copy starts at its pristine count).

        :returns: the result; on Ctrl-C the partial result, with a warning.
        :rtype: SVIResult
        :raises NonFiniteError: on a NaN/Inf loss or gradient (``on_nonfinite="raise"``)
            or non-finite parameters; ``error.result`` is the partial result.
        :raises ValueError: for a bad ``num_steps``, ``batches`` that are neither
            iterable nor callable or an empty sequence of them, ``evaluate_every`` with
            ``batches`` but no ``eval_args``, or a missing or foreign checkpoint (or one
            with another ``num_chains``).
        """
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be an integer >= 0, got {num_steps!r}")
        if batches is not None and not callable(batches) and not isinstance(batches, Iterable):
            raise ValueError(
                f"batches must be an iterable of batches (list, DataLoader) or a callable step -> batch, got {batches!r}"
            )
        if isinstance(batches, Sequence) and len(batches) == 0:
            raise ValueError(f"batches={batches!r} is empty: give at least one batch")
        if self.evaluate_every is not None and batches is not None and self.eval_args is None:
            raise ValueError(
                f"evaluate_every={self.evaluate_every} with batches needs eval_args, the data to estimate the "
                "evidence on (a minibatch is not the data set): pass SVIRunner(..., eval_args=(x_full,))"
            )
        ckpt = self._load_checkpoint(resume_from) if resume_from is not None else None

        seed = self.seed
        if ckpt is not None:
            seed = ckpt["seed"]
        elif seed is None and self.num_chains > 1:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())

        done: list[dict] = list(ckpt["chains_done"]) if ckpt is not None else []
        initial = initial_modules = None
        if self.num_chains > 1:
            # every chain starts from the store as it is now; parameters of modules that
            # pyro.module registers during the run are added (with their values before
            # the first update) by the first step that registers them
            initial = ckpt["initial_state"] if ckpt is not None else _store_state()
            if ckpt is not None:
                initial_modules = dict(ckpt.get("initial_modules") or {})
            else:
                initial_modules = {n: v for n, v in initial["params"].items() if _is_module_param(n)}
        interrupted = False
        error: NonFiniteError | None = None
        pristine = self._pristine() if self.num_chains > 1 else None
        for chain in range(len(done), self.num_chains):
            resume = ckpt if (ckpt is not None and ckpt["chain"] == chain) else None
            if self.num_chains > 1:
                model, guide = _fresh(pristine[0]), _fresh(pristine[1])
                optim, loss = copy.deepcopy(pristine[2]), copy.deepcopy(pristine[3])
            else:
                model, guide, optim, loss = self.model, self.guide, self.optim, self.loss
            chain_run = _ChainRun(self, chain, model, guide, optim, loss, seed, done, initial, initial_modules)
            try:
                outcome = chain_run.run(args, kwargs, num_steps, batches, resume)
            except NonFiniteError as e:
                outcome = chain_run.outcome("nonfinite")
                error = e
            done.append(outcome)
            if error is not None:
                break
            if outcome["stop_reason"] == "interrupted":
                interrupted = True
                break

        result = self._result(done, args, kwargs, batches)
        if error is not None:
            error.result = result
            raise error
        if interrupted:
            rows = result.num_steps[-1]
            warnings.warn(
                f"SVIRunner.run was interrupted (KeyboardInterrupt) after {rows} completed steps of chain "
                f"{len(done) - 1}; returning the partial result (stop_reason='interrupted').",
                UserWarning,
                stacklevel=2,
            )
        return result

    # -- internals --------------------------------------------------------------------------

    def _pristine(self):
        return (_fresh(self.model), _fresh(self.guide), copy.deepcopy(self.optim), copy.deepcopy(self.loss))

    def _load_checkpoint(self, path) -> dict:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ValueError(f"resume_from={path!r}: no such checkpoint file")
        ckpt = torch.load(path, weights_only=False, map_location="cpu")
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"resume_from={path!r} is not a checkpoint of SVIRunner (format {CHECKPOINT_FORMAT!r}); "
                "write one with SVIRunner(..., checkpoint_every=N, checkpoint_path=path)"
            )
        if ckpt["num_chains"] != self.num_chains:
            raise ValueError(
                f"the checkpoint {path!r} has num_chains={ckpt['num_chains']}, this runner {self.num_chains}; "
                "resume with the same number of chains"
            )
        return ckpt

    def _result(self, done, args, kwargs, batches) -> SVIResult:
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
        scores = [_final_score(o["rows"], self.convergence_window) for o in done]
        best = max(range(len(done)), key=lambda i: -math.inf if math.isnan(scores[i]) else scores[i])
        if len(done) > 1:
            _load_store(done[best]["state"])
        return SVIResult(
            history=history,
            chain_states=[o["state"] for o in done],
            terms=[o["terms"] for o in done],
            stop_reasons=[o["stop_reason"] for o in done],
            best_chain=best,
            model=self.model,
            guide=self.guide,
            args=None if batches is not None else tuple(args),
            kwargs=dict(kwargs),
        )


class _ChainRun:
    """One chain of :meth:`SVIRunner.run`: the step loop and its state."""

    def __init__(self, runner: SVIRunner, chain, model, guide, optim, loss, seed, done, initial, initial_modules):
        self.r = runner
        self.chain = chain
        self.model, self.guide, self.optim, self.loss = model, guide, optim, loss
        self.seed = seed
        self.done = done
        self.initial = initial  # the store at the start of every chain (several chains only)
        self.initial_modules = initial_modules  # {name: start value} of pyro.module parameters
        self.rows: list[dict] = []
        self.flat_checks = 0
        self.elapsed0 = 0.0
        self.has_state = hasattr(loss, "state_dict") and hasattr(loss, "load_state_dict")

    # -- setup -------------------------------------------------------------------------------

    def _start(self, args, kwargs, resume):
        if resume is None:
            if self.initial is not None:
                _reset_modules(self.initial_modules)
                _load_store(self.initial)
            if self.seed is not None:
                pyro.set_rng_seed(self.seed + self.chain)
            return 0
        # Lazy set-up that consumes random numbers in the uninterrupted run before the
        # checkpoint (autoguide prototypes, the loss's plate-nesting guess, parameters of
        # modules registered with pyro.module) happens here, before the RNG state is
        # restored, so that the resumed run draws the same numbers. It runs before the
        # checkpoint's parameters are loaded so that those are copied into the tensors the
        # model and guide use (a module's own Parameters), not beside them. The warm-up
        # batch is peeked at: the step loop still gets it.
        step_args, step_kwargs = args, kwargs
        if self.batch_fn is not None:
            step_args, step_kwargs = self.peek_fn(resume["step"])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NAN_WARNING)
            if hasattr(self.loss, "decompose"):
                self.loss.decompose(self.model, self.guide, *step_args, **step_kwargs)
            else:
                self.loss.loss(self.model, self.guide, *step_args, **step_kwargs)
        _load_store(resume["param_store"])
        self.optim.set_state(resume["optim"])
        if self.has_state and resume["loss"] is not None:
            self.loss.load_state_dict(resume["loss"])
        self.rows = list(resume["history"])
        self.flat_checks = resume["flat_checks"]
        self.elapsed0 = resume["wall_time"]
        pyro.util.set_rng_state(resume["rng"])
        return resume["step"]

    def _batches(self, args, kwargs, batches):
        """
        Sets ``self.batch_fn(step) -> (args, kwargs)`` (or None without batches) and
        ``self.peek_fn(step)``, the same batch without consuming it from an iterator.
        """
        self.batch_fn = self.peek_fn = None
        if batches is None:
            return

        def merge(batch):
            if isinstance(batch, Mapping):
                return tuple(args), {**kwargs, **batch}
            if isinstance(batch, (tuple, list)):
                return tuple(args) + tuple(batch), dict(kwargs)
            return tuple(args) + (batch,), dict(kwargs)

        if callable(batches) and not isinstance(batches, Iterable):
            self.batch_fn = self.peek_fn = lambda step: merge(batches(step))
            return
        if isinstance(batches, Sequence):
            # indexed by step: epochs repeat the sequence, and a resume at any step (or a
            # warm-up look at a batch) consumes nothing
            self.batch_fn = self.peek_fn = lambda step: merge(batches[step % len(batches)])
            return

        state: dict[str, Any] = {"it": batches if isinstance(batches, Iterator) else None, "pending": None}

        def fetch():
            for _ in range(2):
                if state["it"] is None:
                    state["it"] = iter(batches)
                try:
                    return next(state["it"])
                except StopIteration:
                    if isinstance(batches, Iterator):
                        raise _Exhausted() from None
                    state["it"] = None
            raise ValueError(f"batches={batches!r} is empty: give at least one batch")

        def next_batch(step):
            if state["pending"] is not None:
                batch, state["pending"] = state["pending"][0], None
                return merge(batch)
            return merge(fetch())

        def peek(step):
            if state["pending"] is None:
                state["pending"] = (fetch(),)
            return merge(state["pending"][0])

        self.batch_fn, self.peek_fn = next_batch, peek

    # -- the loop ----------------------------------------------------------------------------

    def run(self, args, kwargs, num_steps, batches, resume) -> dict:
        self._batches(args, kwargs, batches)
        start = self._start(args, kwargs, resume)
        self.t0 = time.perf_counter()
        bar = self._bar(num_steps, start)
        stop_reason = "num_steps"
        try:
            # opened once per run, not per step: entering catch_warnings resets Python's
            # warning registry, so a "once"/"default" warning of the model would fire on
            # every step (and the context costs time). Pyro's "Encountered NaN" warning is
            # silenced: the runner checks the loss and gradients itself.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NAN_WARNING)
                for step in range(start, num_steps):
                    if self.r.max_time is not None and time.perf_counter() - self.t0 >= self.r.max_time:
                        stop_reason = "max_time"
                        break
                    try:
                        row = self._step(step, args, kwargs)
                    except _Exhausted:
                        stop_reason = "exhausted"
                        break
                    if bar is not None:
                        bar.update(1)
                        self._postfix(bar, row)
                    if self.r.evaluate_every is not None and (step + 1) % self.r.evaluate_every == 0:
                        row.update(self._evaluate(args, kwargs))
                    stop = False
                    for cb in self.r.callbacks:
                        stop = bool(cb(step, row)) or stop
                    if self.r.checkpoint_every is not None and (step + 1) % self.r.checkpoint_every == 0:
                        self._checkpoint(step + 1)
                    if stop:
                        stop_reason = "callback"
                        break
                    if self._converged(step):
                        stop_reason = "converged"
                        break
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        finally:
            if bar is not None:
                bar.close()
        return self.outcome(stop_reason)

    def outcome(self, stop_reason) -> dict:
        return {
            "rows": self.rows,
            "state": _store_state(),
            "terms": getattr(self.loss, "last_terms", None),
            "stop_reason": stop_reason,
        }

    def _step(self, step: int, args, kwargs) -> dict:
        if self.batch_fn is not None:
            args, kwargs = self.batch_fn(step)
        loss_state = self.loss.state_dict() if self.has_state else None
        params: set = set()
        try:
            try:
                with poutine.trace(param_only=True) as capture:
                    loss = self.loss.loss_and_grads(self.model, self.guide, *args, **kwargs)
            except ValueError as e:
                # with validation on, a non-finite parameter surfaces as a distribution's
                # argument check; say which parameters are at fault
                bad = _nonfinite_params()
                if bad:
                    raise self._nonfinite(step, math.nan, set(), e) from e
                raise
            params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
            if self.initial_modules is not None:
                _record_modules(capture.trace, self.initial_modules)
            loss = float(loss[0] if isinstance(loss, tuple) else loss)
            finite = math.isfinite(loss) and _all_finite_grads(params)
            error = None
            if finite:
                self.optim(params)
            elif self.r.on_nonfinite == "raise" or _nonfinite_params():
                error = self._nonfinite(step, loss, params, None)  # before the gradients are cleared
            pyro.infer.util.zero_grads(params)
            if error is not None:
                raise error
        except BaseException:
            # leave no half-done step behind: gradients cleared, the loss's step count back
            for _, p in pyro.get_param_store().named_parameters():
                p.grad = None
            if loss_state is not None:
                self.loss.load_state_dict(loss_state)
            raise
        if (
            finite
            and isinstance(self.optim, pyro.optim.PyroLRScheduler)
            and (step + 1) % self.r.scheduler_every == 0
        ):
            plateau = any(isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau) for s in self.optim.optim_objs.values())
            self.optim.step(loss) if plateau else self.optim.step()

        row: dict[str, Any] = {"step": step, "loss": loss}
        terms = getattr(self.loss, "last_terms", None)
        if terms is not None:
            row.update(terms.as_dict(per_site=True))
        row["wall_time"] = self.elapsed0 + time.perf_counter() - self.t0
        if self.r.on_nonfinite == "skip":
            row["skipped"] = not finite
        self.rows.append(row)
        return row

    def _nonfinite(self, step, loss, params, cause) -> NonFiniteError:
        store = pyro.get_param_store()
        terms = getattr(self.loss, "last_terms", None) if cause is None else None
        bad_terms: list[str] = []
        bad_sites: dict[str, list[str]] = {}
        if terms is not None:
            from .terms import TOTAL_FIELDS

            bad_terms = [n for n in TOTAL_FIELDS if not math.isfinite(getattr(terms, n))]
            for site, values in terms.per_site.items():
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                if bad:
                    bad_sites[site] = bad
        bad_grads = sorted(
            store.param_name(p) for p in params if p.grad is not None and not bool(torch.isfinite(p.grad).all())
        )
        bad_params = _nonfinite_params()
        lines = [f"non-finite values at step {step} (chain {self.chain}); the update of this step was not applied."]
        if cause is not None:
            lines.append(f"The model or guide raised: {cause}")
        else:
            lines.append(f"loss = {loss}")
        if bad_terms:
            lines.append("ELBO terms: " + ", ".join(f"{n} = {getattr(terms, n)}" for n in bad_terms))
        if bad_sites:
            lines.append(
                "sites: "
                + "; ".join(f"'{s}' ({', '.join(f'{k} = {terms.per_site[s][k]}' for k in ks)})" for s, ks in bad_sites.items())
            )
        if bad_grads:
            lines.append("parameters with non-finite gradients: " + ", ".join(f"'{n}'" for n in bad_grads))
        if bad_params:
            lines.append(
                "parameters with non-finite values: " + ", ".join(f"'{n}'" for n in bad_params)
                + " (produced by an earlier update: lower the learning rate or clip gradients)"
            )
        lines.append(
            "The partial result (history before this step, last finite parameters) is error.result. Fix the "
            "log-probability of the named sites (e.g. clamp scales away from 0, check the data for inf/NaN), "
            "lower the learning rate, or pass on_nonfinite='skip' to drop such steps."
        )
        return NonFiniteError(
            "\n".join(lines), step=step, terms=bad_terms, sites=bad_sites, grads=bad_grads, params=bad_params
        )

    def _evaluate(self, args, kwargs) -> dict:
        from .diagnostics import ImportanceSamplingWarning, estimate_evidence

        eval_args = self.r.eval_args if self.r.eval_args is not None else args
        eval_kwargs = self.r.eval_kwargs if self.r.eval_kwargs is not None else kwargs
        # k̂ is recorded in the history (eval_pareto_k): no warning for each evaluation of a
        # guide that is still far from the posterior
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", ImportanceSamplingWarning)
            est = estimate_evidence(
                self.model, self.guide, *eval_args, num_samples=self.r.eval_num_samples, psis=True, **eval_kwargs
            )
        return {
            "eval_log_evidence": float(est.log_evidence),
            "eval_log_evidence_stderr": float(est.log_evidence_stderr),
            "eval_elbo": float(est.elbo),
            "eval_gap": float(est.gap),
            "eval_pareto_k": float(est.pareto_k),  # nan below 21 draws, -inf for constant weights
            "eval_ess": float(est.ess),
        }

    def _converged(self, step: int) -> bool:
        tol, w = self.r.convergence_tol, self.r.convergence_window
        n = len(self.rows)
        if tol is None or (step + 1) % w != 0 or n < 2 * w:
            return False
        window = self.rows[-2 * w:]
        for key in ("beta", "capacity"):
            if len({r.get(key) for r in window}) > 1:
                # the objective itself is moving with its schedule: not a plateau
                self.flat_checks = 0
                return False
        values = torch.tensor([-r["loss"] for r in window])
        older, newer = values[:w], values[w:]
        older, newer = older[torch.isfinite(older)], newer[torch.isfinite(newer)]
        if len(older) == 0 or len(newer) == 0:
            return False
        m_old, m_new = float(older.mean()), float(newer.mean())
        if m_new - m_old < tol * abs(m_new):
            self.flat_checks += 1
        else:
            self.flat_checks = 0
        return self.flat_checks >= self.r.convergence_patience

    def _checkpoint(self, steps_done: int) -> None:
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "step": steps_done,
            "chain": self.chain,
            "num_chains": self.r.num_chains,
            "seed": self.seed,
            "param_store": _store_state(),
            "optim": self.optim.get_state(),
            "loss": self.loss.state_dict() if self.has_state else None,
            "history": self.rows,
            "flat_checks": self.flat_checks,
            "rng": pyro.util.get_rng_state(),
            "wall_time": self.elapsed0 + time.perf_counter() - self.t0,
            "chains_done": self.done,
            "initial_state": self.initial,
            "initial_modules": self.initial_modules,
        }
        path = self.r.checkpoint_path
        tmp = f"{path}.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, path)

    def _bar(self, num_steps, start):
        if not self.r.progress_bar or not sys.stderr.isatty() or num_steps <= start:
            return None
        from tqdm.auto import tqdm

        desc = f"chain {self.chain}" if self.r.num_chains > 1 else "SVI"
        self._last_postfix = 0.0
        return tqdm(total=num_steps, initial=start, desc=desc, file=sys.stderr, dynamic_ncols=True)

    def _postfix(self, bar, row) -> None:
        now = time.perf_counter()
        if now - self._last_postfix < 0.2:
            return
        self._last_postfix = now
        keys = (("loss", "loss"), ("elbo", "elbo"), ("reconstruction", "rec"), ("kl", "kl"), ("beta", "β"))
        bar.set_postfix({short: f"{row[k]:.4g}" for k, short in keys if k in row}, refresh=False)


class _Exhausted(Exception):
    """The iterator of batches ran out."""


# ------------------------------------------------------------------------------------------
# helpers


def _fresh(x):
    """
    A deep copy of an :class:`torch.nn.Module` (other callables as they are).

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


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _all_finite_grads(params) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _nonfinite_params() -> list[str]:
    return sorted(
        name for name, p in pyro.get_param_store().named_parameters() if not bool(torch.isfinite(p).all())
    )


def _is_module_param(name: str) -> bool:
    """Whether a parameter-store name was registered by :func:`pyro.module` (``"net$$$weight"``)."""
    return pyro.params.user_param_name(name) != name


def _record_modules(param_trace, initial_modules: dict) -> None:
    """
    Record the values of :func:`pyro.module` parameters seen for the first time in
    ``param_trace`` (a param-only trace of a step, taken before the update).
    """
    for name, site in param_trace.nodes.items():
        if name not in initial_modules and _is_module_param(name):
            initial_modules[name] = site["value"].unconstrained().detach().clone()


def _reset_modules(initial_modules: dict) -> None:
    """
    Before a chain: copy the start values into the :func:`pyro.module` parameters in the
    store (in place, so a module shared by the chains, used by a plain function or a
    bound method, starts each chain from the same weights), then drop them from the
    store, so that the chain's first step registers the parameters of the module it
    actually uses (its own copy when the model or guide is a module).
    """
    store = pyro.get_param_store()
    for name in [n for n in store.keys() if _is_module_param(n)]:
        value = initial_modules.get(name)
        tensor = store._params[name]
        if value is not None and tensor.shape == value.shape:
            with torch.no_grad():
                tensor.copy_(value)
        del store[name]


def _store_state() -> dict:
    """A detached copy of the parameter store's state (unconstrained values, constraints)."""
    state = pyro.get_param_store().get_state()
    return {
        "params": {k: v.detach().clone() for k, v in state["params"].items()},
        "constraints": dict(state["constraints"]),
    }


def _load_store(state: dict) -> None:
    """
    Make the parameter store hold ``state`` (unconstrained values and constraints, as
    :func:`_store_state`): names not in it are removed; a parameter already in the store
    with the same shape, dtype and device gets the value copied IN PLACE, so
    that tensors held elsewhere see it (a module's own Parameters, registered by
    :func:`pyro.module`, which keeps using them; the optimiser's per-parameter state);
    other names get fresh leaf tensors. The tensors of ``state`` are never shared.
    """
    store = pyro.get_param_store()
    params, constraints = state["params"], state["constraints"]
    for name in [n for n in store.keys() if n not in params]:
        del store[name]
    new_params, new_constraints = {}, {}
    for name, value in params.items():
        tensor = store._params.get(name)
        if tensor is not None and (tensor.shape, tensor.dtype, tensor.device) == (value.shape, value.dtype, value.device):
            with torch.no_grad():
                tensor.copy_(value)
            store._constraints[name] = constraints[name]
            continue
        if tensor is not None:
            del store[name]
        new_params[name] = value.detach().clone().requires_grad_(True)
        new_constraints[name] = constraints[name]
    if new_params:
        store.set_state({"params": new_params, "constraints": new_constraints})


def _constrained_params(state: dict) -> dict[str, torch.Tensor]:
    from torch.distributions import transform_to

    return {
        name: transform_to(state["constraints"][name])(value).detach()
        for name, value in state["params"].items()
    }


def _final_score(rows, window: int) -> float:
    """Mean objective (-loss) over the last ``window`` finite steps; NaN for none."""
    values = [-r["loss"] for r in rows[-window:] if math.isfinite(r["loss"])]
    return sum(values) / len(values) if values else math.nan
