# SPDX-License-Identifier: Apache-2.0
"""The ELBO's decompositions, as recorded by the losses of :mod:`pyro_elbo_lab.losses`.

The three decompositions of the evidence lower bound (all in nats):

.. math::

    \\mathrm{ELBO} = \\log p(x) - \\mathrm{KL}(q(z) \\| p(z \\mid x))
                   = \\mathbb{E}_q[\\log p(x \\mid z)] - \\mathrm{KL}(q(z) \\| p(z))
                   = \\mathbb{E}_q[\\log p(x, z)] + \\mathbb{H}[q]

and :math:`\\mathrm{KL}(q \\| p(z)) = -\\mathbb{E}_q[\\log p(z)] - \\mathbb{H}[q]`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ELBOTerms",
    "TermsRecord",
    "merge_records",
    "stack_columns",
    "TOTAL_FIELDS",
    "SITE_FIELDS_LATENT",
    "SITE_FIELDS_OBSERVED",
]

#: Fields of :class:`ELBOTerms` that are totals over sites, in the order they are recorded.
TOTAL_FIELDS = (
    "objective",
    "elbo",
    "reconstruction",
    "kl",
    "entropy",
    "cross_entropy",
    "expected_log_joint",
)
#: Terms recorded per latent (or auxiliary guide) site.
SITE_FIELDS_LATENT = ("kl", "entropy", "cross_entropy")
#: Terms recorded per observed site.
SITE_FIELDS_OBSERVED = ("reconstruction",)


@dataclass(frozen=True)
class ELBOTerms:
    """
    One evaluation of the ELBO and its decompositions, in nats, with the same data
    scaling as Pyro's loss (subsampled plates are scaled up to the full data), averaged
    over particles.

    The identities ``elbo == reconstruction - kl == expected_log_joint + entropy`` and
    ``kl == cross_entropy - entropy`` hold to float precision for whichever estimator
    produced the terms (Monte Carlo for :class:`~pyro_elbo_lab.BetaELBO`, analytic KL and
    entropy where available for :class:`~pyro_elbo_lab.BetaMeanFieldELBO`).

    :ivar float objective: the quantity that is maximised (Pyro's loss is ``-objective``);
        equals ``elbo`` for β = 1 without free bits or capacity.
    :ivar float elbo: the unweighted ELBO, :math:`\\mathbb{E}_q[\\log p(x,z) - \\log q(z)]`.
    :ivar float reconstruction: :math:`\\mathbb{E}_q[\\log p(x \\mid z)]` summed over
        observed sites.
    :ivar float kl: prior matching, :math:`\\sum_s \\mathbb{E}_q[\\log q(z_s) -
        \\log p(z_s \\mid \\mathrm{pa}(z_s))]` over latent sites (auxiliary guide sites
        contribute :math:`\\mathbb{E}_q \\log q`).
    :ivar float entropy: :math:`\\mathbb{H}[q] = -\\mathbb{E}_q[\\log q(z)]`.
    :ivar float cross_entropy: :math:`-\\mathbb{E}_q[\\log p(z)]`.
    :ivar float expected_log_joint: :math:`\\mathbb{E}_q[\\log p(x, z)]`, the expected
        complete-data log-likelihood maximised by the M-step of EM.
    :ivar float beta: the β in force for this evaluation.
    :ivar int num_particles: how many particles the averages are over.
    :ivar dict per_site: ``{site name: {term: value}}``; latent sites carry ``kl``,
        ``entropy`` and ``cross_entropy``, observed sites ``reconstruction``. With auxiliary
        guide sites (autoguides), the log q of an auxiliary site is part of the KL and
        entropy of the model site(s) it stands for (``AutoNormal``'s
        ``<site>_unconstrained``; the slice of ``AutoDiagonalNormal``'s latent), so
        ``kl/<site>`` is that site's KL. A joint that cannot be split per site
        (``AutoMultivariateNormal``, low-rank, flows) is one entry named after its auxiliary
        site, listed in :attr:`groups`; its model sites have no entry of their own. An
        auxiliary site whose model sites are not known (hand-written, without
        ``infer={"auxiliary_for": ...}``) is an entry of its own (``kl`` = its log q).
    :ivar dict groups: ``{entry: (model sites, ...)}`` for the per-site entries that hold
        the joint KL of several model sites (empty without such a guide).
    :ivar dict stderr: standard error over particles of each total field
        (``std / sqrt(num_particles)``); empty when ``num_particles == 1``.
    :ivar capacity: the capacity :math:`C(t)` in force (nats per element of the data
        plate), or ``None`` when the objective has no capacity term.

    References

    [1] `Variational Inference: A Review for Statisticians`, David M. Blei, Alp
        Kucukelbir, Jon D. McAuliffe (2017), Section 2.2: the ELBO and its decompositions.

    [2] `ELBO surgery: yet another way to carve up the variational evidence lower bound`,
        Matthew D. Hoffman, Matthew J. Johnson (2016)
    """

    objective: float
    elbo: float
    reconstruction: float
    kl: float
    entropy: float
    cross_entropy: float
    expected_log_joint: float
    beta: float
    num_particles: int = 1
    per_site: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    stderr: Mapping[str, float] = field(default_factory=dict)
    capacity: float | None = None
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        """Pyro's loss, ``-objective``, in nats."""
        return -self.objective

    def as_dict(self, per_site: bool = True) -> dict[str, float]:
        """
        A flat ``{name: float}`` view, handy for logging and history tables.

        Per-site entries are named ``"<term>/<site>"`` (``"kl/z"``), standard errors
        ``"<field>_stderr"``.

        :param bool per_site: include the per-site entries.
        """
        out: dict[str, float] = {name: getattr(self, name) for name in TOTAL_FIELDS}
        out["beta"] = self.beta
        if self.capacity is not None:
            out["capacity"] = self.capacity
        for name, value in self.stderr.items():
            out[f"{name}_stderr"] = value
        if per_site:
            for site, terms in self.per_site.items():
                for term, value in terms.items():
                    out[f"{term}/{site}"] = value
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """
        The per-site terms as a :class:`pandas.DataFrame` (one row per site; columns
        ``kl``, ``entropy``, ``cross_entropy``, ``reconstruction``; NaN where a term does
        not apply to a site), with a final ``total`` row.
        """
        import pandas as pd

        columns = list(SITE_FIELDS_LATENT) + list(SITE_FIELDS_OBSERVED)
        rows = {site: {c: terms.get(c, math.nan) for c in columns} for site, terms in self.per_site.items()}
        rows["total"] = {c: getattr(self, c) for c in columns}
        frame = pd.DataFrame.from_dict(rows, orient="index", columns=columns)
        frame.index.name = "site"
        return frame

    def __str__(self) -> str:
        parts = [f"{name}={getattr(self, name):.4g}" for name in TOTAL_FIELDS]
        parts.append(f"beta={self.beta:.4g}")
        if self.capacity is not None:
            parts.append(f"capacity={self.capacity:.4g}")
        return "ELBOTerms(" + ", ".join(parts) + ")"


class TermsRecord:
    """
    Terms of one loss call kept as a single detached tensor on the loss's device.

    The loss records only the objective and the per-site terms; totals, cross-entropies,
    means and standard errors are derived here on first access, ending with one
    ``tolist()`` (one device sync), so a step that never reads its terms pays for one
    ``torch.stack`` and nothing else.

    :param list names: entry names: ``"objective"`` first, then ``(term, site)`` pairs with
        term ``"reconstruction"`` (observed sites), ``"kl"`` or ``"entropy"`` (latent and
        auxiliary sites); a group entry (one KL for several model sites) is
        ``(term, name, (model sites, ...))``.
    :param torch.Tensor values: shape ``(num_entries, num_particles)``.
    """

    __slots__ = ("names", "values", "num_particles", "beta", "capacity", "_terms")

    def __init__(self, names: list, values: torch.Tensor, beta: float, capacity: float | None) -> None:
        self.names = names
        self.values = values
        self.num_particles = values.shape[-1]
        self.beta = beta
        self.capacity = capacity
        self._terms: ELBOTerms | None = None

    def terms(self) -> ELBOTerms:
        """The recorded terms as an :class:`ELBOTerms` (floats; one device sync on first call)."""
        terms = self._terms
        if terms is None:
            terms = self._terms = self._materialise()
        return terms

    def _materialise(self) -> ELBOTerms:
        values = self.values
        if values.dim() == 1:
            values = values.unsqueeze(-1)
        entries = self.names[1:]
        if self.num_particles == 1:
            # one sync, then plain float arithmetic: cheaper than a dozen tiny tensor ops
            return self._build(entries, values.reshape(-1).tolist(), {})
        rows: dict[str, list[int]] = {"reconstruction": [], "kl": [], "entropy": []}
        for i, entry in enumerate(entries, start=1):
            rows[entry[0]].append(i)

        def total(term):
            index = rows[term]
            if not index:
                return values.new_zeros(values.shape[-1])
            return values[index].sum(0)

        objective, recon, kl, entropy = values[0], total("reconstruction"), total("kl"), total("entropy")
        cross = kl + entropy
        # rows in the order of TOTAL_FIELDS
        totals = torch.stack([objective, recon - kl, recon, kl, entropy, cross, recon - cross])
        site_values = values[1:]
        parts = [totals.mean(-1), site_values.mean(-1)]
        if self.num_particles > 1:
            parts.append(totals.std(-1) / math.sqrt(self.num_particles))
        flat = torch.cat(parts).tolist()
        num_totals, num_sites = len(TOTAL_FIELDS), len(entries)
        stderr = dict(zip(TOTAL_FIELDS, flat[num_totals + num_sites :]))
        return self._build(entries, [flat[0]] + flat[num_totals : num_totals + num_sites], stderr)

    def _build(self, entries: list, means: list, stderr: dict) -> ELBOTerms:
        """ELBOTerms from the particle means ``[objective, *per-entry values]``."""
        recon = kl = entropy = 0.0
        per_site: dict[str, dict[str, float]] = {}
        groups: dict[str, tuple[str, ...]] = {}
        for entry, value in zip(entries, means[1:]):
            term, site = entry[0], entry[1]
            if len(entry) > 2:
                groups[site] = tuple(entry[2])
            per_site.setdefault(site, {})[term] = value
            if term == "reconstruction":
                recon += value
            elif term == "kl":
                kl += value
            else:
                entropy += value
        cross = kl + entropy
        totals_mean = [means[0], recon - kl, recon, kl, entropy, cross, recon - cross]
        for terms in per_site.values():
            if "kl" in terms:
                terms["cross_entropy"] = terms["kl"] + terms["entropy"]
        return ELBOTerms(
            beta=self.beta,
            num_particles=self.num_particles,
            per_site=per_site,
            stderr=stderr,
            capacity=self.capacity,
            groups=groups,
            **dict(zip(TOTAL_FIELDS, totals_mean)),
        )


def merge_records(
    names: list, records: list[torch.Tensor], names_p: list, record_p: torch.Tensor
) -> tuple[list, list[torch.Tensor]]:
    """
    Union of record entries when sequential particles visit different sites (zeros
    elsewhere).

    :param list names: the entries recorded so far.
    :param list records: their tensors.
    :param list names_p: the new particle's entries.
    :param torch.Tensor record_p: its tensor.
    :returns: ``(union of names, records widened to it)``.
    """
    union = list(names) + [n for n in names_p if n not in names]
    index = {n: i for i, n in enumerate(union)}
    merged = [_widen(index, names, r) for r in records] + [_widen(index, names_p, record_p)]
    return union, merged


def stack_columns(columns: Sequence[tuple[list, torch.Tensor]]) -> tuple[list, torch.Tensor]:
    """
    Per-particle record columns side by side along the particle axis, zeros where a column
    lacks an entry (sequential particles that visit different sites).

    :param list columns: ``(names, values)`` pairs; ``values`` has shape ``(len(names),)``
        (one particle) or ``(len(names), P_i)``.
    :returns: ``(names, values)``: the union of the names in first-seen order and a tensor of
        shape ``(len(names), sum_i P_i)``.
    :rtype: tuple
    """
    union: list = []
    index: dict = {}
    for names, _ in columns:
        for n in names:
            if n not in index:
                index[n] = len(union)
                union.append(n)
    parts = [_widen(index, names, v if v.dim() == 2 else v.unsqueeze(-1)) for names, v in columns]
    return union, torch.cat(parts, -1)


def _widen(index: dict, names: list, values: torch.Tensor) -> torch.Tensor:
    """``values`` (rows named ``names``) placed in the rows ``index`` gives them; zeros elsewhere."""
    out = values.new_zeros((len(index),) + tuple(values.shape[1:]))
    out[[index[n] for n in names]] = values
    return out
