# SPDX-License-Identifier: Apache-2.0
"""
The per-site sums per particle that ``WeightedObjective`` (:mod:`.objective`) weights, and the
estimator hooks that compute them: :class:`ParticleSums`, the mixin whose
:meth:`~ParticleSums._latent_site_terms` (or :meth:`~ParticleSums._latent_terms` for all
sites at once) a loss class implements (:class:`~pyro_elbo_lab.BetaELBO`: Monte Carlo KL;
:class:`~pyro_elbo_lab.BetaMeanFieldELBO`: analytic KL where registered).

A per-particle sum has shape ``()`` for sequential particles (one particle per trace) and
``(num_particles,)`` inside Pyro's vectorised particle plate; the sums themselves are
:mod:`pyro_elbo_lab.sites`' (:func:`~pyro_elbo_lab.sites.sum_per_particle`,
:func:`~pyro_elbo_lab.sites.log_prob_per_particle`), with shortcuts for the sequential case
on the per-step hot path (Pyro's memoised ``log_prob_sum``).

Imports :mod:`pyro_elbo_lab.sites` only.
"""

from __future__ import annotations

import torch
from pyro.distributions.util import is_identically_zero
from pyro.poutine.runtime import Message

from .. import sites

__all__ = ["ParticleSums"]


class ParticleSums:
    """
    Mixin of the per-site, per-particle terms of a trace ELBO, combined with a Pyro ELBO
    (which sets ``num_particles``, ``vectorize_particles`` and ``max_plate_nesting``).
    Subclasses implement :meth:`_latent_site_terms` (or override :meth:`_latent_terms`).
    """

    # set by Pyro's ELBO.__init__ (the class this mixin is combined with)
    num_particles: int
    vectorize_particles: bool
    max_plate_nesting: int

    def _particle_plate(self) -> int | None:
        """The vectorised particle plate's size, or ``None`` for sequential particles."""
        return self.num_particles if self.vectorize_particles and self.num_particles > 1 else None

    def _per_particle(self, x: torch.Tensor | float, event_dims: int = 0) -> torch.Tensor:
        """:func:`pyro_elbo_lab.sites.sum_per_particle` with this loss's particle plate."""
        if not (self.vectorize_particles and self.num_particles > 1) and not event_dims and torch.is_tensor(x):
            return x.sum()  # the hot path
        # Pyro counts the vectorised particle plate in max_plate_nesting: it sits at -max_plate_nesting
        return sites.sum_per_particle(x, self._particle_plate(), self.max_plate_nesting - 1, event_dims)

    def _log_prob_per_particle(self, site: Message) -> torch.Tensor:
        """A site's scaled ``log_prob`` summed per particle (Pyro's memoised sum when sequential)."""
        if not (self.vectorize_particles and self.num_particles > 1):
            return site["log_prob_sum"]  # the hot path: no call into sites.py
        return sites.log_prob_per_particle(site, self.num_particles, self.max_plate_nesting - 1)

    def _entropy_term_per_particle(self, site: Message) -> torch.Tensor:
        """The differentiable ``entropy_term`` of a guide site's score parts, per particle."""
        term = site["score_parts"].entropy_term
        if term is site["log_prob"]:  # reparameterised, unscaled: reuse the memoised sum
            return self._log_prob_per_particle(site)
        if is_identically_zero(term):
            return torch.zeros_like(self._log_prob_per_particle(site))
        if self.vectorize_particles and self.num_particles > 1:
            return self._per_particle(term)
        return term.sum()

    def _latent_terms(self, latent: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Stacked per-site terms of the latent and auxiliary sites ``[(name, model_site or
        None, guide_site), ...]``: ``(kl_surrogate, kl, entropy)``, each of shape
        ``(num_sites,)`` or ``(num_sites, num_particles)``; see :meth:`_latent_site_terms`.
        """
        kl_surrogate, kl, entropy = [], [], []
        for name, model_site, guide_site in latent:
            if model_site is None:
                lq = self._log_prob_per_particle(guide_site).detach()
                terms = self._entropy_term_per_particle(guide_site), lq, -lq
            else:
                terms = self._latent_site_terms(name, model_site, guide_site)
            kl_surrogate.append(terms[0])
            kl.append(terms[1])
            entropy.append(terms[2])
        return torch.stack(kl_surrogate), torch.stack(kl), torch.stack(entropy)

    # -- estimator hooks ---------------------------------------------------------------------

    def _latent_site_terms(self, name, model_site, guide_site):
        """
        :returns: ``(kl_surrogate, kl, entropy)`` per particle (shape ``()`` or
            ``(num_particles,)``, see :meth:`_per_particle`), scaled and masked like the
            site: a differentiable surrogate whose gradient (together with the
            score-function term for non-reparameterised sites) estimates that of the KL,
            and detached estimates of KL(q‖p) and H[q] at this site.
        """
        raise NotImplementedError
