# SPDX-License-Identifier: Apache-2.0
"""
The aggregate posterior q̄(z) = (1/N) Σ_n q(z | x_n): ELBO surgery and the β-TCVAE split
of the average KL into index-code mutual information, total correlation and
dimension-wise KL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..checks import check_int, check_model_kwargs
from ..losses.attribution import unwrap_guide
from .collapse import use_autoguide_sites
from .local import ELEMENT_BUDGET, collect_local_sites, dimension_names, find_data_plate, local_sites
from .traces import guess_max_plate_nesting, vectorized_traces

__all__ = ["AggregatePosteriorReport", "aggregate_posterior", "ESTIMATORS"]

#: Estimators of log q̄(z): exact over the elements present, minibatch weighted sampling
#: (Chen et al. 2018, Sec. 4.1), and the stratified (unbiased for q̄) minibatch form.
ESTIMATORS = ("full", "mws", "stratified")


@dataclass(frozen=True)
class AggregatePosteriorReport:
    """
    The average KL of local latents split by the aggregate posterior, in nats per
    datapoint; the parts add up to :attr:`kl` on the same samples (to float precision):

    ``kl == mutual_information + marginal_kl`` and, for factorised guides and priors,
    ``marginal_kl == total_correlation + dimensionwise_kl``.

    :ivar str estimator: ``"full"``, ``"mws"`` or ``"stratified"``.
    :ivar str plate: the data plate.
    :ivar tuple sites: the latent sites (jointly ``z``).
    :ivar tuple dimensions: latent dimension names, length ``D``.
    :ivar int num_datapoints: ``N``, the data size the estimator assumes (the plate's full
        size; for ``"full"`` the elements present).
    :ivar int minibatch_size: ``M``, the plate elements present.
    :ivar int num_samples: draws per datapoint.
    :ivar float kl: :math:`\\frac1N \\sum_n \\mathbb{E}_{q(z|x_n)}[\\log q(z \\mid x_n) -
        \\log p(z)]`, Monte Carlo on the samples used for the parts.
    :ivar kl_analytic: the same average with analytic KL where every site has one, else
        ``None``.
    :ivar float mutual_information: index-code mutual information :math:`I_q(n; z)`.
    :ivar float marginal_kl: :math:`\\mathrm{KL}(\\bar q(z) \\| p(z))`.
    :ivar total_correlation: :math:`\\mathrm{KL}(\\bar q(z) \\| \\prod_u \\bar q(z_u))`, or
        ``None`` when a guide or prior does not factorise over dimensions.
    :ivar dimensionwise_kl: :math:`\\sum_u \\mathrm{KL}(\\bar q(z_u) \\| p(z_u))`, or ``None``.
    :ivar dimensionwise_kl_per_dimension: its terms, shape ``(D,)``, or ``None``.
    """

    estimator: str
    plate: str
    sites: tuple[str, ...]
    dimensions: tuple[str, ...]
    num_datapoints: int
    minibatch_size: int
    num_samples: int
    kl: float
    kl_analytic: float | None
    mutual_information: float
    marginal_kl: float
    total_correlation: float | None
    dimensionwise_kl: float | None
    dimensionwise_kl_per_dimension: torch.Tensor | None = field(default=None, repr=False)

    @property
    def mutual_information_bound(self) -> float:
        """:math:`\\log N`, the largest index-code mutual information (exact for ``"full"``)."""
        return math.log(self.num_datapoints)

    def as_dict(self) -> dict[str, float]:
        """The scalar fields (``None`` ones left out) as a flat dict."""
        out: dict[str, float] = {
            "kl": self.kl,
            "mutual_information": self.mutual_information,
            "marginal_kl": self.marginal_kl,
        }
        for name in ("kl_analytic", "total_correlation", "dimensionwise_kl"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        if self.dimensionwise_kl_per_dimension is not None:
            for name, value in zip(self.dimensions, self.dimensionwise_kl_per_dimension.tolist()):
                out[f"dimensionwise_kl/{name}"] = value
        return out

    def __str__(self) -> str:
        parts = [
            f"kl={self.kl:.4g}",
            f"mutual_information={self.mutual_information:.4g} (<= log N = {self.mutual_information_bound:.4g})",
        ]
        if self.total_correlation is not None:
            parts += [
                f"total_correlation={self.total_correlation:.4g}",
                f"dimensionwise_kl={self.dimensionwise_kl:.4g}",
            ]
        else:
            parts.append(f"marginal_kl={self.marginal_kl:.4g}")
        return f"AggregatePosteriorReport[{self.estimator}](" + ", ".join(parts) + ")"


def _log_mixture(pairwise: torch.Tensor, rows: torch.Tensor, estimator: str, N: int, M: int) -> torch.Tensor:
    """
    log q̄ at the query points from ``pairwise[i, s, m, ...] = log q(z_{s,i} | x_m)``
    (``rows[i]`` is the query's own element ``m``).
    """
    if estimator == "full":
        return torch.logsumexp(pairwise, 2) - math.log(M)
    if estimator == "mws":
        return torch.logsumexp(pairwise, 2) - math.log(N * M)
    # stratified: (1/N) q(z_i | x_i) + (N - 1)/(N (M - 1)) Σ_{m != i} q(z_i | x_m)
    own = torch.zeros(pairwise.shape[0], pairwise.shape[2], dtype=torch.bool, device=pairwise.device)
    own[torch.arange(len(rows)), rows] = True
    own = own.reshape(own.shape[:1] + (1,) + own.shape[1:] + (1,) * (pairwise.dim() - 3))
    log_w = torch.where(
        own,
        torch.tensor(-math.log(N), dtype=pairwise.dtype, device=pairwise.device),
        torch.tensor(math.log(N - 1) - math.log(N) - math.log(M - 1), dtype=pairwise.dtype, device=pairwise.device),
    )
    return torch.logsumexp(pairwise + log_w, 2)


def aggregate_posterior(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    plate: str | None = None,
    sites: Iterable[str] | str | None = None,
    estimator: str = "full",
    num_samples: int = 1,
    max_plate_nesting: int | None = None,
) -> AggregatePosteriorReport:
    """
    ELBO surgery and the β-TCVAE decomposition of the average KL of local latents.

    With :math:`\\bar q(z) = \\frac1N \\sum_n q(z \\mid x_n)` the aggregate posterior and
    :math:`z_{s,n} \\sim q(z \\mid x_n)` (``num_samples`` per datapoint, one vectorised
    trace), every term is a Monte Carlo average over :math:`(s, n)` of

    .. math::

        \\underbrace{\\log q(z \\mid x_n) - \\log p(z)}_{\\text{average KL}}
        = \\underbrace{\\log q(z \\mid x_n) - \\log \\bar q(z)}_{I_q(n; z)}
        + \\underbrace{\\log \\bar q(z) - \\textstyle\\sum_u \\log \\bar q(z_u)}_{\\text{total correlation}}
        + \\underbrace{\\textstyle\\sum_u \\log \\bar q(z_u) - \\log p(z_u)}_{\\text{dimension-wise KL}},

    (Hoffman & Johnson 2016: average KL = :math:`I_q(n;z) + \\mathrm{KL}(\\bar q \\| p)`;
    Chen et al. 2018 split the second term), so the parts add up to the average KL on the
    same samples whichever estimator of :math:`\\log \\bar q` is used:

    - ``"full"``: :math:`\\log \\bar q(z) = \\log \\frac1M \\sum_{m=1}^M q(z \\mid x_m)` over the
      ``M`` plate elements present, exact (O(M²) per sample) when the plate is not
      subsampled; then :math:`0 \\le I_q(n;z) \\le \\log N`.
    - ``"mws"``: minibatch weighted sampling (Chen et al. 2018, Sec. 4.1),
      :math:`\\log \\frac{1}{NM} \\sum_{m=1}^M q(z \\mid x_m)`, with the present elements as
      the minibatch and ``N`` the plate's full size (``pyro.plate(name, N,
      subsample_size=M)``). It is biased: on a collapsed guide it reports
      :math:`I = \\log N` and total correlation :math:`(D-1)\\log N` instead of 0; use it to
      compare with β-TCVAE training, not as a measurement.
    - ``"stratified"``: :math:`\\log[\\frac1N q(z_i \\mid x_i) + \\frac{N-1}{N(M-1)}
      \\sum_{m \\ne i} q(z_i \\mid x_m)]`, unbiased for :math:`\\bar q(z_i)` when the minibatch
      is a uniform subsample (the idea of Chen et al.'s stratified sampling); equals
      ``"full"`` without subsampling.

    Total correlation and dimension-wise KL need guides and priors that factorise over
    dimensions (e.g. ``Normal(loc, scale).to_event(1)`` against ``Normal(0, 1)``); otherwise
    they are ``None`` and only the surgery is reported. The analysed sites are taken
    jointly as ``z``, assuming each site's guide factor depends on ``x_n`` (not on draws
    of other latents). With :class:`~pyro.infer.autoguide.AutoNormal` or
    :class:`~pyro.infer.autoguide.AutoDiagonalNormal`, :math:`q(z \\mid x_m)` of a site is the
    pushforward of the autoguide's unconstrained Normal for datapoint ``m`` (its log density
    plus the log-Jacobian of the transform to the site's support, per dimension:
    :func:`~pyro_elbo_lab.diagnostics.collapse.autoguide_site`), not the ``Delta`` the guide
    samples the site from; a site drawn through an auxiliary site any other way (a joint latent
    that does not factorise, e.g. :class:`~pyro.infer.autoguide.AutoMultivariateNormal`, or a
    transform to a simplex) is refused. Per-site values come from :mod:`pyro_elbo_lab.sites`; Pyro's site
    scale is not applied (per-datapoint values), masks are: a masked element of the data
    plate is left out of the averages and of :math:`\\bar q` (``M`` counts the unmasked
    elements present; for ``"mws"`` and ``"stratified"``, ``N`` is the full size less the
    masked share of the minibatch).

    :param model: a Pyro model with local latents in a data plate.
    :param guide: an amortised guide for them.
    :param args: model/guide positional arguments (the data).
    :param dict model_kwargs: model/guide keyword arguments.
    :param str plate: the data plate (inferred when ``None``).
    :param sites: local latent sites (default: all inside the plate).
    :param str estimator: ``"full"``, ``"mws"`` or ``"stratified"``.
    :param int num_samples: draws per datapoint (>= 1; Chen et al. use 1).
    :param int max_plate_nesting: the model's plate depth; guessed when ``None``.
    :returns: the decomposition, in nats per datapoint.
    :rtype: AggregatePosteriorReport
    :raises ValueError: for an unknown estimator, ``"stratified"`` with one element
        present, a plate/site that cannot be found, or a site drawn through an auxiliary
        guide site whose density per datapoint is unknown (AutoMultivariateNormal, low-rank,
        flows; an autoguide on a simplex-valued site).

    References

    - *ELBO surgery: yet another way to carve up the variational evidence lower bound*,
      M. D. Hoffman, M. J. Johnson (2016)
    - *Isolating Sources of Disentanglement in Variational Autoencoders*, R. T. Q. Chen,
      X. Li, R. Grosse, D. Duvenaud (2018)
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got estimator={estimator!r}")
    check_int("num_samples", num_samples, 1)
    kwargs = check_model_kwargs(model_kwargs)

    with torch.no_grad():
        if max_plate_nesting is None:
            max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
        traces = vectorized_traces(model, guide, args, kwargs, num_samples, max_plate_nesting)
        frame = find_data_plate(traces.model_trace, plate)
        names = local_sites(traces.model_trace, frame, sites)
        # an autoguide's Delta at a site becomes the pushforward of its auxiliary Normal, whose
        # density can be evaluated at the other datapoints' draws
        attribution, _, replaced = use_autoguide_sites(guide, traces, names)
        for name in names:
            entry = attribution.entry_of(name)
            if name not in replaced and entry is not None and entry.auxiliary:
                raise ValueError(
                    f"aggregate_posterior needs the guide density q(z | x_n) of site '{name}' for every datapoint "
                    f"n, but the guide {type(unwrap_guide(guide)).__name__} draws the site through the auxiliary "
                    f"site(s) {list(entry.auxiliary)} in a way it cannot evaluate per datapoint (a joint latent "
                    f"that does not factorise, e.g. AutoMultivariateNormal, or a transform that is not "
                    f"elementwise, e.g. to a simplex); use AutoNormal or AutoDiagonalNormal on real or "
                    f"elementwise-constrained sites, or a hand-written guide with a Normal site per datapoint "
                    f"in the data plate"
                )
        views = collect_local_sites(traces, frame, names, elementwise=False)
        factorised = all(v.elementwise for v in views)

        # masked elements of the data plate are left out: of the averages and of the mixture q̄
        kls = [v.kl() for v in views]  # (S, M_present, D_site) each, 0 where masked
        kept = torch.cat([v.mask().expand(kl.shape) for v, (kl, _) in zip(views, kls)], -1)[0].any(-1)
        index = kept.nonzero().squeeze(-1)
        M_present = kept.shape[0]
        log_q_sites = [v.log_q()[:, index] for v in views]  # (S, M, D_site) each
        log_q = torch.cat(log_q_sites, -1)  # (S, M, D)
        log_p = torch.cat([v.log_p()[:, index] for v in views], -1)
        S, M, D = log_q.shape
        if M == 0:
            raise ValueError(
                f"every element of plate '{frame.name}' is masked at sites {names}: there is no datapoint for the "
                "aggregate posterior; unmask some (poutine.mask / Distribution.mask)"
            )
        if estimator == "full":
            N = M
        else:  # the plate's full size, less the masked share of the minibatch
            full = frame.full_size if frame.full_size is not None else frame.size
            N = max(M, round(full * M / M_present))
        if estimator == "stratified" and M < 2:
            raise ValueError(
                f"estimator='stratified' needs at least 2 elements of plate '{frame.name}' present, found {M} "
                "(masked elements do not count)"
            )
        kl_analytic: float | None = None
        if all(analytic for _, analytic in kls):
            kl_analytic = float(torch.cat([kl[:, index] for kl, _ in kls], -1).sum(-1).mean())

        # log q̄(z_{s,i}) and log q̄_u(z_{s,i,u}), in chunks of query elements
        chunk = max(1, ELEMENT_BUDGET // max(1, S * M_present * D))
        log_qbar_chunks: list[torch.Tensor] = []  # (I, S) each
        log_qbar_dims_chunks: list[torch.Tensor] = []  # (I, S, D) each
        for start in range(0, M, chunk):
            local = torch.arange(start, min(M, start + chunk), device=log_q.device)
            pairwise = torch.cat([v.pairwise_log_q(index[local]) for v in views], -1)[:, :, index]  # (I, S, M, D)
            log_qbar_chunks.append(_log_mixture(pairwise.sum(-1), local, estimator, N, M))
            if factorised:
                log_qbar_dims_chunks.append(_log_mixture(pairwise, local, estimator, N, M))
        log_qbar = torch.cat(log_qbar_chunks, 0).transpose(0, 1)  # (S, M)

        log_q_joint, log_p_joint = log_q.sum(-1), log_p.sum(-1)
        kl = float((log_q_joint - log_p_joint).mean())
        mutual_information = float((log_q_joint - log_qbar).mean())
        marginal_kl = float((log_qbar - log_p_joint).mean())
        total_correlation: float | None = None
        dimensionwise: float | None = None
        per_dim: torch.Tensor | None = None
        if factorised:
            log_qbar_dims = torch.cat(log_qbar_dims_chunks, 0).transpose(0, 1)  # (S, M, D)
            total_correlation = float((log_qbar - log_qbar_dims.sum(-1)).mean())
            per_dim = (log_qbar_dims - log_p).mean((0, 1))
            dimensionwise = float(per_dim.sum())

    dims = tuple(d for v, lq in zip(views, log_q_sites) for d in dimension_names(v.name, lq.shape[-1]))
    return AggregatePosteriorReport(
        estimator=estimator,
        plate=frame.name,
        sites=tuple(names),
        dimensions=dims,
        num_datapoints=int(N),
        minibatch_size=int(M),
        num_samples=num_samples,
        kl=kl,
        kl_analytic=kl_analytic,
        mutual_information=mutual_information,
        marginal_kl=marginal_kl,
        total_correlation=total_correlation,
        dimensionwise_kl=dimensionwise,
        dimensionwise_kl_per_dimension=per_dim,
    )
