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

    def _stack_log_prob_per_particle(
        self, sites_: list[Message]
    ) -> tuple[torch.Tensor, tuple[int, ...] | None, torch.Tensor | None]:
        """
        The sites' scaled ``log_prob`` summed per particle and stacked, ``(sites,)`` or
        ``(sites, num_particles)``, the order of its rows
        (:func:`pyro_elbo_lab.sites.stack_per_particle`; ``None``: the sites' order), and the
        sums over all particles.

        :returns: ``(stacked, order, totals)``: in the vectorised particle plate, when every
            site's ``log_prob`` has the particle dim (so the sum over particles of a site's
            row is Pyro's memoised ``log_prob_sum``), ``stacked`` is detached and ``totals``
            the sites' ``log_prob_sum`` in the rows' order, ``(sites,)``, differentiable: the
            gradient then flows through Pyro's own sums, one node per site. Otherwise
            ``stacked`` is differentiable and ``totals`` is ``None``.
        """
        if not (self.vectorize_particles and self.num_particles > 1):
            return torch.stack([site["log_prob_sum"] for site in sites_]), None, None  # Pyro's memoised sums
        log_probs = [site["log_prob"] for site in sites_]
        # Pyro counts the vectorised particle plate in max_plate_nesting: it sits at -max_plate_nesting
        dim, num_particles = self.max_plate_nesting, self.num_particles
        traced = torch._C._get_tracing_state()  # TorchScript: shapes are tensors, keep the plain path
        if not traced and all(x.dim() >= dim and x.shape[-dim] == num_particles for x in log_probs):
            detached = [x.detach() for x in log_probs]  # (cheaper than entering torch.no_grad())
            stacked, order = sites.stack_per_particle(detached, num_particles, dim - 1)
            rows = range(len(sites_)) if order is None else order
            return stacked, order, torch.stack([sites_[i]["log_prob_sum"] for i in rows])
        stacked, order = sites.stack_per_particle(log_probs, num_particles, dim - 1)
        return stacked, order, None

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
