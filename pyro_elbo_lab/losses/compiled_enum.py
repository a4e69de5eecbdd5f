# SPDX-License-Identifier: Apache-2.0
"""
:class:`JitBetaTraceEnumELBO`: :class:`~pyro_elbo_lab.BetaTraceEnumELBO` compiled (TorchScript
or inductor), with Pyro's :class:`~pyro.infer.JitTraceEnum_ELBO` as the baseline.

Imports :mod:`.compiled` (the compiled-loss machinery) and :mod:`.beta_trace_enum_elbo`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .beta_trace_enum_elbo import BetaTraceEnumELBO
from .compiled import COMPILE_LIMITS, CompiledObjective

__all__ = ["JitBetaTraceEnumELBO"]


class JitBetaTraceEnumELBO(CompiledObjective, BetaTraceEnumELBO):
    __doc__ = (
        """
    :class:`~pyro_elbo_lab.BetaTraceEnumELBO`, compiled: discrete sites summed out exactly,
    the same β-weighted objective, DiCE gradients and decomposition (``last_terms``,
    filled from the compiled function's outputs), with the enumerated model/guide pass
    compiled once and reused (``compiler="torchscript"`` or ``"inductor"``, as in
    :class:`~pyro_elbo_lab.JitBetaELBO`). The baseline is :class:`pyro.infer.JitTraceEnum_ELBO`,
    which compiles :meth:`differentiable_loss` and :meth:`loss_and_grads`; here :meth:`loss`
    and :meth:`decompose` are compiled too (a forward-only graph). Sequentially enumerated
    guide sites are unrolled into the graph, one branch per value.

    .. math::

        \\mathcal{L}_\\beta = \\mathbb{E}_{q}\\Big[\\log \\sum_{z_e} p(x, z_e \\mid z)\\Big]
            - \\beta \\sum_{s \\in S} \\mathrm{KL}_s - \\sum_{s \\notin S} \\mathrm{KL}_s \\quad\\text{(nats)}
"""
        + COMPILE_LIMITS
        + """
    β is an input of the compiled step, so the check that β may weight every guide site
    (``sites=None`` with a guide site whose model ``log_prob`` depends on a model-enumerated
    site) is made on the schedule: only a constant β = 1 passes it.

    :param str compiler: ``"torchscript"`` (default) or ``"inductor"``; see
        :class:`~pyro_elbo_lab.JitBetaELBO`.
    :raises ValueError: as :class:`~pyro_elbo_lab.BetaTraceEnumELBO`; and as
        :class:`~pyro_elbo_lab.JitBetaELBO`.
    :raises NotImplementedError: as :class:`~pyro_elbo_lab.BetaTraceEnumELBO`.
    :raises RuntimeError: with ``compiler="inductor"``, when inductor fails to compile.

    Example::

        elbo = JitBetaTraceEnumELBO(beta=0.5, sites=["doc_topics"], max_plate_nesting=2)
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
        svi.step(data)          # compiled on the first step, reused afterwards
        print(elbo.last_terms)

    References

    [1] `Tensor Variable Elimination for Plated Factor Graphs`, Fritz Obermeyer et al. (2019)

    [2] `Pyro: Deep Universal Probabilistic Programming`, Eli Bingham et al. (2019)
    """
    )

    _uncompiled = BetaTraceEnumELBO

    def _compiled_step(
        self,
        model: Callable,
        guide: Callable,
        args: tuple,
        kwargs: dict,
        beta: torch.Tensor,
        capacity: torch.Tensor | None,
    ) -> tuple:
        # the uncompiled class's whole step (sequentially enumerated traces summed per
        # particle), differentiable: the compiled loss differentiates it once
        return self._evaluate(model, guide, args, kwargs, beta, False)
