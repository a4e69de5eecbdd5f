# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

from typing import Any

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine import Trace
from pyro.poutine.runtime import Message

from .. import sites
from .attribution import auxiliary_sites
from .objective import WeightedObjective

__all__ = ["BetaMeanFieldELBO"]


def _check_reparameterised(name: str, guide_site: Any) -> None:
    """As Pyro's ``check_fully_reparametrized``, with a message that names the classes that can."""
    _, score_function_term, entropy_term = guide_site["score_parts"]
    if not (
        guide_site["fn"].has_rsample
        and not is_identically_zero(entropy_term)
        and is_identically_zero(score_function_term)
    ):
        raise NotImplementedError(
            f"BetaMeanFieldELBO needs reparameterised guide sites, but guide site '{name}' "
            f"({type(guide_site['fn']).__name__}) has no rsample; use BetaELBO (score-function gradient) or "
            "BetaTraceGraphELBO (Rao-Blackwellised score function with baselines), or BetaTraceEnumELBO to "
            "enumerate a discrete site."
        )


class BetaMeanFieldELBO(WeightedObjective, TraceMeanField_ELBO):
    """
    A drop-in replacement for :class:`pyro.infer.TraceMeanField_ELBO`: the objective of
    :class:`~pyro_elbo_lab.BetaELBO` (β weighting, free bits, capacity), with the analytic
    :math:`\\mathrm{KL}(q(z_s) \\| p(z_s))` wherever :func:`torch.distributions.kl_divergence`
    is registered for the (guide, prior) pair of a site, and the Monte Carlo estimate
    :math:`\\log q(z_s) - \\log p(z_s)` per site otherwise. The decomposition uses the
    analytic entropy :math:`\\mathbb{H}[q(z_s)]` where the guide distribution has one, so
    every reported term is an unbiased estimate and the identities of
    :class:`~pyro_elbo_lab.ELBOTerms` hold exactly.

    With ``beta=1`` and neither ``free_bits`` nor ``capacity``, loss and gradients are those
    of :class:`~pyro.infer.TraceMeanField_ELBO` for the same seed. Like it, it assumes a
    mean-field guide whose sites are all reparameterised (checked under validation).

    Free bits use the analytic KL per latent dimension when both distributions are
    ``Independent`` over the same event dimensions.

    :param beta: β >= 0, or a schedule ``step -> β``.
    :param sites: the latent sites β (and free bits / capacity) apply to: names, a glob
        pattern (``"z_*"``) or a callable ``name -> bool``; all latent sites when None.
    :param float free_bits: λ, nats per latent dimension, >= 0; or None.
    :param capacity: C in nats per data element (>= 0) or a schedule; or None.
    :param float gamma: γ >= 0, the weight of the capacity term (default 1000).
    :param kwargs: :class:`~pyro.infer.TraceMeanField_ELBO` arguments.
    :raises ValueError: as :class:`~pyro_elbo_lab.BetaELBO`.
    :raises NotImplementedError: under validation, for non-reparameterised guide sites (naming
        the classes that handle them).

    The KL of a guide :math:`N(1, 1)` from the prior :math:`N(0, 1)` is 1/2 nat, analytic;
    the recorded terms are unweighted, β only enters the loss:

    >>> import torch, pyro, pyro.distributions as dist
    >>> def model(y):
    ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
    ...     pyro.sample("y", dist.Normal(z, 1.0), obs=y)
    >>> def guide(y):
    ...     pyro.sample("z", dist.Normal(1.0, 1.0))
    >>> loss = BetaMeanFieldELBO(beta=4.0)
    >>> value = loss.loss(model, guide, torch.tensor(0.5))
    >>> loss.last_terms.kl, loss.current_beta()
    (0.5, 4.0)

    References

    [1] `beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework`,
        Irina Higgins et al. (2017)

    [2] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (2014), whose
        second estimator uses the analytic KL.
    """

    analytic_kl = True

    def _latent_site_terms(
        self, name: str, model_site: Message, guide_site: Message
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if is_validation_enabled():
            _check_reparameterised(name, guide_site)
        kl, analytic = sites.kl(model_site, guide_site)
        if not analytic:  # Monte Carlo from Pyro's memoised sums, as TraceMeanField_ELBO
            lp = self._log_prob_per_particle(model_site)
            lq = self._log_prob_per_particle(guide_site).detach()
            kl_surrogate = self._entropy_term_per_particle(guide_site) - lp
            return kl_surrogate, lq - lp.detach(), -lq
        kl = self._per_particle(kl)
        entropy, analytic = sites.entropy(guide_site, model_site)
        if analytic:
            entropy = self._per_particle(entropy.detach())
        else:
            # H[q] = -E_q[log p(z)] - KL(q||p): the Monte Carlo cross-entropy minus the
            # registered KL, so that cross_entropy stays -log p(z) (for a Delta guide site,
            # whose registered KL is -log p(v), the entropy is then 0, as that KL assumes)
            entropy = (-self._log_prob_per_particle(model_site) - kl).detach()
        return kl, kl.detach(), entropy

    def _particle(
        self, model_trace: Trace, guide_trace: Trace, beta: float, capacity: float | None
    ) -> tuple[torch.Tensor, torch.Tensor | float, list, torch.Tensor]:
        if is_validation_enabled():
            for name, site in auxiliary_sites(model_trace, guide_trace):
                _check_reparameterised(name, site)
        return super()._particle(model_trace, guide_trace, beta, capacity)
