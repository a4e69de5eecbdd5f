# SPDX-License-Identifier: Apache-2.0
"""
The latent list every loss and diagnostic stacks, and the entries of the per-site record its
rows move onto: the per-step half of the attribution of auxiliary guide sites
(:mod:`~pyro_elbo_lab.losses.attribution` computes, once per guide and set of sites, which
model sites they stand for).

:func:`sample_sites` builds the latent list (latent model sites in model order, then the
auxiliary guide sites, :func:`auxiliary_sites`, in guide order), the one home of that list;
an :class:`Attribution` holds the :class:`Entry` rows of the per-site record and the
:class:`Split` auxiliary sites, and :meth:`Attribution.apply` moves the stacked per-site rows
onto the entries with one matrix product (plus one per-dimension ``log_prob`` of a split
auxiliary site): no second model or guide pass and no device sync.

Imports :mod:`pyro_elbo_lab.sites` and :mod:`.beta_state` (the enumerated-site check) only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pyro.distributions import ExpandedDistribution, MaskedDistribution
from pyro.poutine import Trace
from pyro.poutine.runtime import Message
from torch.distributions import Independent

from .. import sites
from .beta_state import enumerated_site_error, is_enumerated

__all__ = [
    "Attribution",
    "Entry",
    "LatentRow",
    "Split",
    "auxiliary_sites",
    "missing_guide_site",
    "sample_sites",
]

#: One row of the latent list: ``(name, model_site or None, guide_site)``; ``None`` for an
#: auxiliary guide site (one the model does not have).
LatentRow = tuple[str, Message | None, Message]


def auxiliary_sites(model_trace: Trace, guide_trace: Trace) -> list[tuple[str, Message]]:
    """
    The guide's auxiliary sites: its sample sites that the model does not have, in guide order.

    :param model_trace: the model's trace.
    :param guide_trace: the guide's trace.
    :returns: ``[(name, guide_site), ...]``.
    :rtype: list
    """
    model_nodes = model_trace.nodes
    return [
        (name, site) for name, site in guide_trace.nodes.items() if site["type"] == "sample" and name not in model_nodes
    ]


def missing_guide_site(name: str, model_site: Message) -> ValueError:
    """
    The error for a latent model site without a guide site (what :func:`sample_sites`
    raises); for a site enumerated in the model it names the class that sums it out
    (:func:`~.beta_state.enumerated_site_error`).

    :param str name: the site's name.
    :param model_site: the model's site.
    :rtype: ValueError
    """
    if is_enumerated(model_site):
        return enumerated_site_error(name)
    return ValueError(
        f"The model's latent site '{name}' has no site in the guide. Every latent site of the model "
        "needs a matching guide site of the same name (or pass it as observed data)."
    )


def sample_sites(
    model_trace: Trace,
    guide_trace: Trace,
    *,
    missing: Literal["raise", "skip"] | Callable[[str, Message], Exception] = "raise",
) -> tuple[list[tuple[str, Message]], list[LatentRow]]:
    """
    The model's observed sites and the latent list every loss and diagnostic stacks, from one
    walk of each trace: the latent model sites (each with its guide site) in model order,
    then the guide's auxiliary sites (:func:`auxiliary_sites`) in guide order. Row ``i`` of
    the latent list is row ``i`` of the stacked per-site terms that :func:`~.attribution.attribute` and
    :meth:`Attribution.apply` read.

    :param model_trace: the model's trace.
    :param guide_trace: the guide's trace.
    :param missing: what to do with a latent model site that has no guide site: ``"raise"``
        a ``ValueError`` naming it (:func:`missing_guide_site`: for a site enumerated in the
        model, the class that sums it out), ``"skip"`` it (it gets no row), or a callable
        ``(name, model_site) -> Exception`` whose result is raised (a loss's own message).
    :returns: ``(observed, latent)``: ``observed`` is ``[(name, model_site), ...]`` in model
        order; ``latent`` is ``[(name, model_site or None, guide_site), ...]``
        (:data:`LatentRow`), ``None`` for an auxiliary guide site.
    :rtype: tuple
    :raises ValueError: with ``missing="raise"``, for a latent model site without a guide site.
    """
    if not callable(missing) and missing not in ("raise", "skip"):
        raise ValueError(
            f"missing must be 'raise', 'skip' or a callable (name, model_site) -> Exception, got {missing!r}"
        )
    observed: list[tuple[str, Message]] = []
    latent: list[LatentRow] = []
    guide_nodes = guide_trace.nodes
    for name, model_site in model_trace.nodes.items():
        if model_site["type"] != "sample":
            continue
        if model_site["is_observed"]:
            observed.append((name, model_site))
            continue
        guide_site = guide_nodes.get(name)
        if guide_site is None:
            if missing == "skip":
                continue
            raise missing_guide_site(name, model_site) if missing == "raise" else missing(name, model_site)
        latent.append((name, model_site, guide_site))
    model_nodes = model_trace.nodes
    for name, guide_site in guide_nodes.items():  # auxiliary_sites, inlined: a loss calls this every step
        if guide_site["type"] == "sample" and name not in model_nodes:
            latent.append((name, None, guide_site))
    return observed, latent


@dataclass(frozen=True)
class Entry:
    """
    One row of the per-site record of the latent part of the ELBO.

    :ivar str name: the name the row is recorded under: a model site (kind ``"site"``) or an
        auxiliary guide site (kinds ``"group"`` and ``"auxiliary"``).
    :ivar str kind: ``"site"``: a model site with the log q of the auxiliary sites that stand
        for it; ``"group"``: several model sites whose joint log q cannot be split (one KL for
        all of them); ``"auxiliary"``: an auxiliary site whose model sites are not known.
    :ivar tuple rows: indices (into the latent list the loss stacks) of the rows summed whole.
    :ivar tuple sites: the model sites the entry covers.
    :ivar tuple auxiliary: the auxiliary sites whose log q (whole or a slice) it carries.
    """

    name: str
    kind: str
    rows: tuple[int, ...]
    sites: tuple[str, ...]
    auxiliary: tuple[str, ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Every name that selects this entry in ``sites=``."""
        return (self.name,) + tuple(n for n in self.sites + self.auxiliary if n != self.name)


@dataclass(frozen=True)
class Split:
    """
    A factorised joint auxiliary site whose log q is split over entries by dimension.

    :ivar int row: the auxiliary site's index in the latent list.
    :ivar tuple entries: the index of the entry each of its latent dimensions belongs to.
    :ivar tuple layout: ``((model site, unconstrained shape, event dims), ...)`` in the order
        of the latent's dimensions (the autoguide's ``_unpack_latent``): the slice of each
        model site and how it is shaped into the site's unconstrained value.
    """

    row: int
    entries: tuple[int, ...]
    layout: tuple[tuple[str, tuple[int, ...], int], ...] = ()


class Attribution:
    """
    The entries of the per-site record and how the stacked rows of the latent list
    ``[(name, model_site or None, guide_site), ...]`` (model sites first, then auxiliary
    guide sites, as :class:`~.objective.WeightedObjective` stacks them) move onto them.

    :ivar list entries: the :class:`Entry` rows, in model order (a group at its first site),
        then the unattributed auxiliary sites.
    :ivar bool trivial: no auxiliary site: one entry per latent row, in the same order.
    """

    def __init__(self, entries: list[Entry], splits: list[Split], num_rows: int, aux_rows: frozenset[int]):
        self.entries = entries
        self._splits = splits
        self._num_rows = num_rows
        self._aux_rows = aux_rows
        self.trivial = not aux_rows
        self._matrices: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.groups = {e.name: e.sites for e in entries if e.kind == "group"}

    def entry_of(self, name: str) -> Entry | None:
        """The entry a model or auxiliary site belongs to (``None`` if none)."""
        for entry in self.entries:
            if name == entry.name or name in entry.sites or name in entry.auxiliary:
                return entry
        return None

    def split_log_q(self, latent: list, name: str) -> torch.Tensor | None:
        """
        The log q that factorised joint auxiliary sites (the latent of
        :class:`~pyro.infer.autoguide.AutoDiagonalNormal`) split onto the model site ``name``,
        per element and latent dimension: the slice of the auxiliary site's per-dimension
        :math:`\\log q(u)` (nats, unscaled, masked: :func:`pyro_elbo_lab.sites.log_prob` with
        ``scaled=False, per_dim=True``) that the autoguide unpacks into ``name``, shaped as
        the autoguide shapes the site's unconstrained value and laid out as
        :func:`pyro_elbo_lab.sites.log_prob` lays out a site: ``batch_shape + (J,)``, ``J``
        the site's latent dimensions (its event dims flattened; 1 for a scalar site).

        :param list latent: the latent list the attribution was computed for
            (:func:`sample_sites`), from a trace of the same guide (e.g. another batch of draws).
        :param str name: a model site.
        :returns: the log q per element and dimension, or ``None`` when no split auxiliary
            site covers ``name``.
        :rtype: torch.Tensor or None
        """
        total: torch.Tensor | None = None
        for part, event_dims in self.unpack(latent, name, lambda s: sites.log_prob(s, scaled=False, per_dim=True)):
            part = part.reshape(part.shape[: part.dim() - event_dims] + (-1,)) if event_dims else part.unsqueeze(-1)
            total = part if total is None else total + part
        return total

    def unpack(self, latent: list, name: str, of: Callable[[Any], torch.Tensor]) -> list[tuple[torch.Tensor, int]]:
        """
        The slices of per-dimension tensors of the factorised joint auxiliary sites that the
        autoguide unpacks into the model site ``name``, shaped as it shapes the site's
        unconstrained value (``batch_shape + shape``, as ``AutoContinuous._unpack_latent``).

        :param list latent: as for :meth:`split_log_q`.
        :param str name: a model site.
        :param of: ``guide_site -> tensor`` of shape ``batch_shape + (D,)`` over the joint
            latent's ``D`` dimensions (its value, log q per dimension, loc, scale, ...).
        :returns: ``[(slice, event dims of the site), ...]``, one per split auxiliary site
            covering ``name`` (empty when none does).
        :rtype: list
        """
        out: list[tuple[torch.Tensor, int]] = []
        for split in self._splits:
            start = 0
            for site, shape, event_dims in split.layout:
                size = math.prod(shape)
                if site == name:
                    x = of(latent[split.row][2])  # batch_shape + (D,)
                    batch = x.shape[:-1]
                    out.append(
                        (
                            x[..., start : start + size].reshape(
                                torch.broadcast_shapes(shape, batch + (1,) * event_dims)
                            ),
                            event_dims,
                        )
                    )
                start += size
        return out

    def _matrices_for(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        ``(moves, auxiliary moves, signs)``, cached per dtype and device: ``moves`` is
        ``(E, num_rows + D_1 + ...)``, 1 where a row (or a latent dimension of a split
        auxiliary site, in the columns after the rows) belongs to an entry; ``auxiliary
        moves`` keeps the auxiliary columns only.
        """
        key = (like.dtype, like.device)
        found = self._matrices.get(key)
        if found is None:
            width = self._num_rows + sum(len(split.entries) for split in self._splits)
            moves = torch.zeros(len(self.entries), width, dtype=like.dtype, device=like.device)
            aux_moves = torch.zeros_like(moves)
            for e, entry in enumerate(self.entries):
                for r in entry.rows:
                    moves[e, r] = 1.0
                    if r in self._aux_rows:
                        aux_moves[e, r] = 1.0
            column = self._num_rows
            for split in self._splits:
                for e in split.entries:
                    moves[e, column] = aux_moves[e, column] = 1.0
                    column += 1
            # a split's log q enters the KL surrogate, the KL (+) and the entropy (-)
            signs = torch.tensor([1.0, 1.0, -1.0], dtype=like.dtype, device=like.device)
            found = self._matrices[key] = (moves, aux_moves, signs)
        return found

    def apply(
        self,
        latent: list,
        rows: torch.Tensor,
        per_particle: Callable[[torch.Tensor, int], torch.Tensor],
        auxiliary: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Move the stacked rows onto the entries.

        :param list latent: ``[(name, model_site or None, guide_site), ...]``.
        :param torch.Tensor rows: ``(3, num_rows)`` or ``(3, num_rows, P)``: the
            differentiable KL surrogate, the KL and the entropy per latent row (nats).
        :param per_particle: ``(tensor, event_dims) -> per-particle sums`` of the loss.
        :param bool auxiliary: also return the auxiliary part of each entry's surrogate.
        :returns: ``(entries, auxiliary)``: the rows of the entries, ``(3, E)`` or
            ``(3, E, P)``, and (with ``auxiliary=True``, else ``None``) the differentiable
            auxiliary log q in each entry, ``(E,)`` or ``(E, P)`` (what free bits add to an
            entry's single latent dimension).
        :rtype: tuple
        """
        moves, aux_moves, signs = self._matrices_for(rows)
        if self._splits:
            signs = signs.reshape((3, 1) + (1,) * (rows.dim() - 2))
            parts = [rows]
            for split in self._splits:
                per_dim = per_particle(_log_prob_per_dim(latent[split.row][2]), 1)  # (D,) or (P, D)
                parts.append(signs * per_dim.movedim(-1, 0))  # (3, D) or (3, D, P)
            rows = torch.cat(parts, 1)
        per_entry = rows @ moves.T if rows.dim() == 2 else moves @ rows
        aux = aux_moves @ rows[0] if auxiliary else None
        return per_entry, aux


def _log_prob_per_dim(guide_site: Any) -> torch.Tensor:
    """A factorised joint latent's log q per dimension, ``batch_shape + (D,)``, scaled and masked like the site."""
    fn, scale = guide_site["fn"], guide_site["scale"]
    plain = not torch.is_tensor(scale) and scale == 1.0 and guide_site.get("mask") is None
    if plain and isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1:
        element = fn.base_dist
        if not isinstance(element, (ExpandedDistribution, MaskedDistribution)):
            # the usual case (AutoDiagonalNormal); the value is the guide's own draw from this
            # distribution, so Pyro's validation of it is skipped
            validate = element._validate_args
            element._validate_args = False
            try:
                return element.log_prob(guide_site["value"])
            finally:
                element._validate_args = validate
    return sites.log_prob(guide_site, per_dim=True)
