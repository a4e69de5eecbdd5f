# SPDX-License-Identifier: Apache-2.0
from __future__ import annotations

import torch
from pyro.infer import Trace_ELBO

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
    With auxiliary guide sites (autoguides, ``infer={"is_auxiliary": True}``) the log q
    of a latent site lives (partly) at an auxiliary site, so ``sites`` must name each
    selected latent site together with the auxiliary sites that carry its log q
    (``sites=["z", "z_unconstrained"]`` for :class:`~pyro.infer.autoguide.AutoNormal`);
    a split is refused (``ValueError`` naming the missing sites).

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
    guide sites that carry their own log q (no auxiliary guide site: refused with a
    ``ValueError`` naming the site).
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
        or capacity on sites of an autoguide with auxiliary sites (``AutoNormal``,
        ``AutoDiagonalNormal``, ``AutoContinuous``: their per-site term is a cross-entropy,
        not a KL), and for β on ``sites`` that split a latent site from the auxiliary site
        that carries its log q.
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

    def _latent_site_terms(self, name, model_site, guide_site):
        # per-particle sums only: the batch-shaped log_probs were already summed by Pyro
        lp = self._log_prob_per_particle(model_site)
        lq = self._log_prob_per_particle(guide_site).detach()
        kl_surrogate = self._entropy_term_per_particle(guide_site) - lp
        return kl_surrogate, lq - lp.detach(), -lq

    def _latent_terms(self, latent):
        # Monte Carlo terms from Pyro's memoised per-site sums, stacked once:
        # KL = log q - log p, H = -log q; surrogate = entropy_term - log p
        log_p, log_q, entropy_term = [], [], []
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
        log_p, log_q = torch.stack(log_p), torch.stack(log_q).detach()
        kl_surrogate = torch.stack(entropy_term) - log_p
        return kl_surrogate, log_q - log_p.detach(), -log_q
