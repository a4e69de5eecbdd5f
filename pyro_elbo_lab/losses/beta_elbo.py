# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO
from pyro.poutine.runtime import Message

from .objective import WeightedObjective

__all__ = ["BetaELBO"]


class BetaELBO(WeightedObjective, Trace_ELBO):
    """
    A drop-in replacement for :class:`pyro.infer.Trace_ELBO` that maximises the β-weighted
    ELBO with the Monte Carlo KL,

    .. math::

        \\mathcal{L}_\\beta = \\mathbb{E}_{q(z)}[\\log p(x \\mid z)]
            - \\beta \\, \\mathbb{E}_{q(z)}[\\log q(z) - \\log p(z)],

    and records the ELBO's decomposition (:class:`~pyro_elbo_lab.ELBOTerms`) on every call
    from the traces the step already computed: :attr:`last_terms`.

    With ``beta=1`` and neither ``free_bits`` nor ``capacity`` the loss and its gradients
    are those of :class:`~pyro.infer.Trace_ELBO` for the same seed. Everything
    ``Trace_ELBO`` handles is supported: reparameterised and score-function guide sites
    (the score-function term uses the β-weighted downstream cost, with Pyro's plate-wise
    Rao-Blackwellisation), subsampled plates, masks, auxiliary guide sites,
    ``num_particles`` and ``vectorize_particles``.

    **β on a subset of sites.** ``sites=["z"]`` weights only the KL of the named latent
    sites (e.g. a VAE's local code, not its global weights); the others keep weight 1.

    **Guides with auxiliary sites.** The log q of an auxiliary guide site is part of the KL
    of the model site(s) it stands for (:mod:`~pyro_elbo_lab.losses.attribution`):
    :class:`~pyro.infer.autoguide.AutoNormal`'s ``<z>_unconstrained`` belongs to ``z``,
    each slice of :class:`~pyro.infer.autoguide.AutoDiagonalNormal`'s latent to its site,
    and a hand-written site marked ``infer={"is_auxiliary": True, "auxiliary_for": "z"}``
    to ``z``. So ``last_terms.per_site["z"]["kl"]`` is z's KL, and β, free bits and
    capacity apply to it (``sites=["z"]``; naming ``"z_unconstrained"`` selects ``z`` too).
    A joint that cannot be split (:class:`~pyro.infer.autoguide.AutoMultivariateNormal`,
    low-rank, flows) has one KL for its sites: one per-site entry named after its latent
    site (``last_terms.groups`` lists the sites), weighted whole (``sites`` selects all of
    them or none), with capacity but not free bits. A hand-written auxiliary site without
    ``auxiliary_for`` is an entry of its own; β on a subset must then include it, and free
    bits and capacity are refused.

    **Free bits** (``free_bits=λ``, Kingma et al. 2016): for each selected site the KL term
    becomes :math:`\\beta \\sum_j N \\max(\\lambda, \\overline{\\mathrm{KL}}_j)`, with
    :math:`\\overline{\\mathrm{KL}}_j` the KL of latent dimension j averaged over the
    site's plates (the data plate) and N their scaled size (the data size under
    subsampling). Latent dimensions are the event dimensions of an ``Independent``
    (``.to_event``) distribution; a site with another distribution counts as one
    dimension per batch element.

    **Controlled capacity** (``capacity=C``, a number or schedule, Burgess et al. 2018):
    :math:`\\mathbb{E}_q[\\log p(x \\mid z)] - \\gamma\\,|\\mathrm{KL}_S - N C(t)|`, with
    C in nats per element of the data plate (N as above).

    Free bits and capacity need reparameterised guide sites among the selected ones, and
    a KL per selected site (see above: refused with a ``ValueError`` naming the site where
    none exists).
    A model without sample sites has loss 0 and all-zero terms, as in ``Trace_ELBO``.
    Score-function sites left out of ``sites`` are fine: their downstream cost contains
    the whole (non-linear) free-bits or capacity term of each particle.

    :param beta: β >= 0, or a schedule ``step -> β`` (:mod:`pyro_elbo_lab.schedules`).
    :param sites: the latent sites β (and free bits / capacity) apply to: names, a glob
        pattern (``"z_*"``) or a callable ``name -> bool``; all latent sites when None.
    :param float free_bits: λ, nats per latent dimension, >= 0; or None.
    :param capacity: C in nats per data element (>= 0) or a schedule; or None.
    :param float gamma: γ >= 0, the weight of the capacity term (default 1000 as in
        Burgess et al. 2018).
    :param kwargs: :class:`~pyro.infer.Trace_ELBO` arguments (``num_particles``,
        ``vectorize_particles``, ``max_plate_nesting``, ...).
    :raises ValueError: for negative or NaN β, λ < 0, γ < 0, negative capacity, both free
        bits and capacity, capacity with β != 1, ``num_particles`` not an integer >= 1; at
        the first call, for ``sites`` that are not latent sites of the model, for free bits
        on a joint auxiliary site (``AutoMultivariateNormal``, low-rank, flows) or on a
        site of several latent dimensions with an auxiliary site, for free bits or capacity
        with an auxiliary site that does not say which model site it stands for, and for β
        on ``sites`` that split the sites of one joint or leave out such an auxiliary site.
    :raises NotImplementedError: for free bits or capacity on a non-reparameterised site.

    Example::

        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
                             BetaELBO(beta=4.0))
        svi.step(data)
        print(svi.loss.last_terms)

    References

    [1] `beta-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework`,
        Irina Higgins, Loic Matthey, Arka Pal, Christopher Burgess, Xavier
        Glorot, Matthew Botvinick, Shakir Mohamed, Alexander Lerchner (2017)

    [2] `Improved Variational Inference with Inverse Autoregressive Flow`, Diederik P.
        Kingma, Tim Salimans, Rafal Jozefowicz, Xi Chen, Ilya Sutskever, Max Welling (2016)

    [3] `Understanding disentangling in beta-VAE`, Christopher P. Burgess, Irina Higgins,
        Arka Pal, Loic Matthey, Nick Watters, Guillaume Desjardins, Alexander Lerchner (2018)

    [4] `Black Box Variational Inference`, Rajesh Ranganath, Sean Gerrish, David M. Blei
        (2014)
    """

    def _latent_site_terms(
        self, name: str, model_site: Message, guide_site: Message
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # per-particle sums only: the batch-shaped log_probs were already summed by Pyro
        lp = self._log_prob_per_particle(model_site)
        lq = self._log_prob_per_particle(guide_site).detach()
        kl_surrogate = self._entropy_term_per_particle(guide_site) - lp
        return kl_surrogate, lq - lp.detach(), -lq

    def _latent_terms(self, latent: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Monte Carlo terms from Pyro's memoised per-site sums, stacked once:
        # KL = log q - log p, H = -log q; surrogate = entropy_term - log p
        log_p: list[torch.Tensor] = []
        log_q: list[torch.Tensor] = []
        entropy_term: list[torch.Tensor] = []
        zero = None  # log p of auxiliary guide sites (no model site), one tensor for all
        for _, model_site, guide_site in latent:
            log_q.append(self._log_prob_per_particle(guide_site))
            entropy_term.append(self._entropy_term_per_particle(guide_site))
            if model_site is None:
                if zero is None:
                    zero = torch.zeros_like(log_q[-1])
                log_p.append(zero)
            else:
                log_p.append(self._log_prob_per_particle(model_site))
        lp, lq = torch.stack(log_p), torch.stack(log_q).detach()
        kl_surrogate = torch.stack(entropy_term) - lp
        return kl_surrogate, lq - lp.detach(), -lq
