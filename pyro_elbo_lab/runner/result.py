# SPDX-License-Identifier: Apache-2.0
"""
What :meth:`~pyro_elbo_lab.runner.SVIRunner.run` returns (:class:`SVIResult`) and raises
(:class:`NonFiniteError`). Plain data: converting a result to ArviZ is
:func:`pyro_elbo_lab.inference_data.from_svi_result`, summarising it
:func:`pyro_elbo_lab.summary.summarize`.

Imports only :mod:`pyro_elbo_lab.runner.params`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import pandas as pd

from .params import constrained_params, keep_store_tensors, load_store

__all__ = ["SVIResult", "NonFiniteError", "attach_partial_result", "partial_result"]


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
        the last finite parameters (also ``partial_result``, the name every other
        exception escaping :meth:`~pyro_elbo_lab.runner.SVIRunner.run` carries it under).
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
        self.partial_result = result


@dataclass
class SVIResult:
    """
    The outcome of :meth:`~pyro_elbo_lab.runner.SVIRunner.run`.

    :ivar pandas.DataFrame history: one row per step (and chain): ``step``, ``loss``
        (nats), ``objective``, ``elbo``, ``reconstruction``, ``kl``, ``entropy``,
        ``cross_entropy``, ``expected_log_joint``, ``beta`` and the per-site terms
        (``"kl/z"``) of the loss's :class:`~pyro_elbo_lab.ELBOTerms` (only ``loss``
        for losses without terms), ``wall_time`` (seconds since the start of the run),
        ``chain`` when there are several, ``skipped`` with ``on_nonfinite="skip"``, and
        at evaluation steps ``eval_log_evidence``, ``eval_log_evidence_stderr``,
        ``eval_elbo``, ``eval_gap``, ``eval_pareto_k``, ``eval_ess``.
    :ivar list chain_states: per chain, the parameter-store state (as
        :meth:`pyro.params.param_store.ParamStoreDict.get_state`, detached copies) at its end.
    :ivar list terms: per chain, the :class:`~pyro_elbo_lab.ELBOTerms` of its last
        step (``None`` for losses without terms).
    :ivar list stop_reasons: per chain, why it stopped: ``"num_steps"``,
        ``"converged"``, ``"max_time"``, ``"interrupted"``, ``"callback"``,
        ``"exhausted"`` (the batches ran out), ``"nonfinite"``, ``"all_skipped"`` (every
        step skipped with ``on_nonfinite="skip"``) or ``"error"`` (in an exception's
        ``partial_result``).
    :ivar int best_chain: the chain with the highest final smoothed objective; its
        parameters are left in Pyro's parameter store.
    :ivar model: the model.
    :ivar guide: the guide.
    :ivar tuple args: the run's positional data (``None`` after a run on minibatches,
        which has no data set of its own).
    :ivar dict model_kwargs: the run's keyword data.
    :ivar list convergence: per chain, the evidence for :attr:`converged`: a dict with
        ``converged``, ``rule`` (``"split-rhat"``), ``rhat`` (rank-normalised split
        :math:`\\hat R` of the objective over the last ``window`` steps), ``slope_t``
        (Student's t of its trend), ``stationary``, ``window``, ``step`` (of the check) and
        ``reason`` in words.
    """

    history: Any
    chain_states: list[dict]
    terms: list[Any]
    stop_reasons: list[str]
    best_chain: int = 0
    model: Callable | None = field(default=None, repr=False)
    guide: Callable | None = field(default=None, repr=False)
    args: tuple | None = field(default=(), repr=False)
    model_kwargs: dict = field(default_factory=dict, repr=False)
    convergence: list = field(default_factory=list)

    @property
    def converged(self) -> list[bool]:
        """
        Per chain, whether the objective's trace was stationary
        (:class:`~pyro_elbo_lab.runner.Convergence`): when the rule stopped the chain, or,
        for a chain that ran to ``num_steps`` (or stopped otherwise), judged on its final
        window. The statistics are in :attr:`convergence`.
        """
        return [bool(c and c.get("converged")) for c in self.convergence]

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
        return constrained_params(self.chain_states[self.best_chain])

    def _check_chain(self, chain: object) -> int:
        if isinstance(chain, bool) or not isinstance(chain, int) or not 0 <= chain < self.num_chains:
            raise ValueError(
                f"chain must be an integer in [0, {self.num_chains}) (this result has {self.num_chains} "
                f"chain{'s' if self.num_chains != 1 else ''}), got chain={chain!r}"
            )
        return chain

    def chain_history(self, chain: int) -> pd.DataFrame:
        """
        The history rows of one chain.

        :raises ValueError: if ``chain`` is not in ``[0, num_chains)``.
        """
        chain = self._check_chain(chain)
        if "chain" not in self.history.columns:
            return self.history
        return self.history[self.history["chain"] == chain].reset_index(drop=True)

    @contextmanager
    def use_params(self, chain: int | None = None) -> Iterator[None]:
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
        chain = self._check_chain(self.best_chain if chain is None else chain)
        with keep_store_tensors():
            load_store(self.chain_states[chain])
            yield


def attach_partial_result(error: BaseException, result: SVIResult) -> None:
    """
    Attach the partial result of a run to an exception escaping
    :meth:`~pyro_elbo_lab.runner.SVIRunner.run`, as ``error.partial_result`` (and
    ``error.result`` for a :class:`NonFiniteError`). The exception keeps its type (a
    ``KeyboardInterrupt`` stays one), so the result is an attribute of the instance.

    :param BaseException error: the exception.
    :param SVIResult result: the history up to the last completed step and the last
        finite parameters.
    """
    if isinstance(error, NonFiniteError):
        error.result = error.partial_result = result
    else:
        # an exception of any class, the caller's included: the one documented attribute name
        vars(error)["partial_result"] = result


def partial_result(error: BaseException) -> SVIResult | None:
    """
    The partial result an exception from :meth:`~pyro_elbo_lab.runner.SVIRunner.run`
    carries (``error.partial_result``), or ``None`` when it carries none.

    :param BaseException error: the exception caught.
    :rtype: SVIResult or None
    """
    result = getattr(error, "partial_result", None)
    return result if isinstance(result, SVIResult) else None
