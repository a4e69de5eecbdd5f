# SPDX-License-Identifier: Apache-2.0
"""
Rate R = E_x KL(q(z|x) ‖ p(z)) and distortion D = -E_x E_q log p(x|z) of a fitted model,
or over a sweep of β (Alemi et al. 2018).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.trace_struct import Trace

from .. import sites
from ..checks import check_int, check_model_kwargs, nonnegative_number
from ..losses.attribution import Attribution, attribute, sample_sites
from .local import batches, find_data_plate, plan, plate_dim
from .traces import vectorized_traces

if TYPE_CHECKING:
    import pandas

__all__ = ["RateDistortion", "rate_distortion", "rate_distortion_sweep"]


@dataclass(frozen=True)
class RateDistortion:
    """
    Rate and distortion in nats per datapoint (totals with Pyro's data scaling, divided by
    the data plate's full size ``N``).

    :ivar float rate: :math:`R`, the KL of the latents from their prior per datapoint.
    :ivar float distortion: :math:`D`, the negative expected log-likelihood per datapoint.
    :ivar float rate_stderr: Monte Carlo standard error (0 when every KL is analytic and
        the guide's parameters do not depend on its own draws; ``nan`` for one sample).
    :ivar float distortion_stderr: Monte Carlo standard error of ``distortion``.
    :ivar dict rate_per_site: ``{latent site: R contribution}``.
    :ivar dict distortion_per_site: ``{observed site: D contribution}``.
    :ivar dict kl_method: ``{latent site: "analytic" | "monte carlo"}``.
    :ivar str plate: the data plate (``None``: no plate, values are per dataset).
    :ivar int num_datapoints: ``N``.
    :ivar int num_samples: draws from the guide.
    :ivar beta: the β the model was fitted with, when known (sweeps).
    """

    rate: float
    distortion: float
    rate_stderr: float
    distortion_stderr: float
    rate_per_site: Mapping[str, float] = field(default_factory=dict)
    distortion_per_site: Mapping[str, float] = field(default_factory=dict)
    kl_method: Mapping[str, str] = field(default_factory=dict)
    plate: str | None = None
    num_datapoints: int = 1
    num_samples: int = 1
    beta: float | None = None

    @property
    def elbo(self) -> float:
        """:math:`-(D + R)`, the ELBO per datapoint."""
        return -(self.distortion + self.rate)

    def objective(self, beta: float) -> float:
        """:math:`-(D + \\beta R)`, the β-VAE objective per datapoint."""
        return -(self.distortion + beta * self.rate)

    def _totals(self) -> dict[str, float]:
        """The totals, one home for :meth:`as_dict` and :meth:`to_dataframe`."""
        return {
            "rate": self.rate,
            "distortion": self.distortion,
            "rate_stderr": self.rate_stderr,
            "distortion_stderr": self.distortion_stderr,
            "elbo": self.elbo,
        }

    def as_dict(self) -> dict[str, float]:
        """Flat ``{name: number}``, with per-site entries ``"rate/z"``, ``"distortion/x"``."""
        out = self._totals()
        if self.beta is not None:
            out["beta"] = self.beta
        out.update({f"rate/{k}": v for k, v in self.rate_per_site.items()})
        out.update({f"distortion/{k}": v for k, v in self.distortion_per_site.items()})
        return out

    def to_dataframe(self) -> pandas.DataFrame:
        """
        One row (index ``beta`` when known) with columns ``rate``, ``distortion``,
        ``rate_stderr``, ``distortion_stderr``, ``elbo``: the shape of
        :func:`rate_distortion_sweep`'s table, for :func:`pyro_elbo_lab.plots.plot_rate_distortion`.
        """
        import pandas as pd

        row = self._totals()
        if self.beta is not None:
            row = {"beta": self.beta, **row, "objective": self.objective(self.beta)}
            return pd.DataFrame([row]).set_index("beta", drop=False).rename_axis(None)
        return pd.DataFrame([row])

    def __str__(self) -> str:
        return (
            f"RateDistortion(rate={self.rate:.4g} ± {self.rate_stderr:.2g}, distortion={self.distortion:.4g} ± "
            f"{self.distortion_stderr:.2g} nats per datapoint, N={self.num_datapoints})"
        )


def _kept_share(model_trace: Trace, frame: CondIndepStackFrame) -> float:
    """
    The share of the data plate's present elements that are not masked at every observed
    site inside it (1.0 without masks): an element counts where any observed site keeps it.
    """
    kept: torch.Tensor | None = None
    dim = plate_dim(frame)
    for site in model_trace.nodes.values():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        if not any(f.name == frame.name for f in site["cond_indep_stack"]):
            continue
        mask = sites.element_mask(site)  # batch_shape: (..., N, ...), N at frame.dim
        mask = mask.reshape((1,) * max(0, -dim - mask.dim()) + mask.shape)
        mask = mask.movedim(dim, 0)
        mask = mask.reshape(mask.shape[0], -1).any(-1)
        kept = mask if kept is None else kept | mask
    if kept is None:
        return 1.0
    return float(kept.sum()) / kept.numel()


def _per_particle(x: torch.Tensor, event_dims: int, *, num: int, max_plate_nesting: int) -> torch.Tensor:
    """Per-sample sums keeping ``event_dims`` trailing dims (the callable :meth:`Attribution.apply` takes)."""
    return sites.sum_per_particle(x, num, max_plate_nesting, event_dims=event_dims)


def rate_distortion(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    plate: str | None = None,
    num_samples: int = 10,
    batch_size: int | None = None,
    max_plate_nesting: int | None = None,
    beta: float | None = None,
) -> RateDistortion:
    """
    Rate and distortion of a fitted model and guide (Alemi et al. 2018), per datapoint:

    .. math::

        R = \\frac1N \\sum_{\\text{latent } s} \\mathbb{E}_q\\,
            \\mathrm{KL}(q(z_s \\mid \\cdot) \\| p(z_s \\mid \\mathrm{pa}(z_s))),
        \\qquad
        D = -\\frac1N \\sum_{\\text{observed } s} \\mathbb{E}_q \\log p(x_s \\mid z),

    so that :math:`\\mathrm{ELBO} = -N(D + R)` and the β-VAE objective is :math:`-N(D +
    \\beta R)`. For a VAE, :math:`R = \\mathbb{E}_x \\mathrm{KL}(q(z \\mid x) \\| p(z))`; global
    latents contribute their KL divided by ``N``. ``N`` is the full size of the data plate
    (given, or the outermost plate holding observed sites; 1 without one), and sums use
    Pyro's data scaling, so a subsampled plate gives unbiased per-datapoint values.
    Masks are applied (the rule of :mod:`pyro_elbo_lab.sites`): a masked element
    contributes 0, and ``N`` counts only the elements of the data plate that some
    observed site keeps (the full size times the kept share of the elements present).

    Estimators: KL analytic where :func:`torch.distributions.kl_divergence` knows the
    guide/prior pair at a site (as :class:`~pyro_elbo_lab.BetaMeanFieldELBO`), else
    :math:`\\log q(z) - \\log p(z)`; :math:`\\mathbb{E}_q` is a Monte Carlo average over
    ``num_samples`` draws from one vectorised guide/model trace per batch (no Python loop
    over samples), under :func:`torch.no_grad`. Auxiliary guide sites (autoguides) count in
    ``R`` with :math:`\\mathbb{E}_q \\log q`, attributed to the model sites they stand for as
    in the losses (:func:`pyro_elbo_lab.losses.attribution.attribute`): ``rate_per_site["z"]``
    of an :class:`~pyro.infer.autoguide.AutoNormal` holds ``z_unconstrained``'s log q plus the
    log-Jacobian of its ``Delta`` minus :math:`\\log p(z)`, z's KL (Monte Carlo); each slice
    of :class:`~pyro.infer.autoguide.AutoDiagonalNormal`'s latent goes to its site; a joint
    that does not split per site (:class:`~pyro.infer.autoguide.AutoMultivariateNormal`,
    flows) is one entry named after its latent site (``"_AutoMultivariateNormal_latent"``)
    holding the joint KL of its sites, which get no entry of their own; an auxiliary site
    that says nothing of its model sites stays an entry of its own.

    :param model: a fitted Pyro model with observed data.
    :param guide: its guide.
    :param args: model/guide positional arguments (the data).
    :param dict model_kwargs: model/guide keyword arguments.
    :param str plate: the data plate (inferred when ``None``).
    :param int num_samples: draws from the guide (>= 1).
    :param int batch_size: draws per vectorised trace; automatic when ``None``.
    :param int max_plate_nesting: the model's plate depth; guessed when ``None``.
    :param float beta: the β the model was fitted with (>= 0), recorded in the result.
    :returns: rate and distortion in nats per datapoint.
    :rtype: RateDistortion
    :raises ValueError: if an argument is out of range (``beta`` < 0 included), ``plate``
        is not a plate of the model, every element of the data plate is masked, or a
        latent site has no guide site.

    References

    - *Fixing a Broken ELBO*, A. A. Alemi, B. Poole, I. Fischer, J. V. Dillon, R. A. Saurous,
      K. Murphy (2018)
    """
    check_int("num_samples", num_samples, 1)
    check_int("batch_size", batch_size, 1, allow_none=True)
    if beta is not None:
        beta = nonnegative_number(beta, "beta", "the β the model was fitted with, or None")
    kwargs = check_model_kwargs(model_kwargs)

    with torch.no_grad():
        max_plate_nesting, batch_size = plan(model, guide, args, kwargs, max_plate_nesting, batch_size)
        rate_sites: dict[str, torch.Tensor] = {}
        dist_sites: dict[str, torch.Tensor] = {}
        kl_method: dict[str, str] = {}
        chunks: list[torch.Tensor] = []  # (n, 2) per batch: rate and distortion per sample
        frame: CondIndepStackFrame | None = None
        attribution: Attribution | None = None
        share = 1.0
        for i, n in enumerate(batches(num_samples, batch_size)):
            traces = vectorized_traces(model, guide, args, kwargs, n, max_plate_nesting)
            mt, gt = traces.model_trace, traces.guide_trace
            if i == 0:  # None is a valid answer (no data plate), so resolve on the first batch
                frame = find_data_plate(mt, plate, need_latent=False)
                share = 1.0 if frame is None else _kept_share(mt, frame)
                if frame is not None and share == 0.0:
                    raise ValueError(
                        f"every element of plate '{frame.name}' is masked at the observed sites: there is no datapoint "
                        "to average over; unmask some (poutine.mask / Distribution.mask)"
                    )
            # (n,) tensors on the model's device; None while no site has added to them
            rate: torch.Tensor | None = None
            distortion: torch.Tensor | None = None
            observed, latent = sample_sites(mt, gt)  # latent model sites, then auxiliary guide sites, as the losses
            for name, site in observed:
                term = -sites.sum_per_particle(sites.log_prob(site), n, max_plate_nesting)
                dist_sites[name] = dist_sites.get(name, 0.0) + term.sum()
                distortion = term if distortion is None else distortion + term
            if latent and attribution is None:  # the sites of every batch are the same
                attribution = attribute(guide, mt, gt, latent)
            # a site drawn through an auxiliary site is a Delta whose log density (the log-Jacobian)
            # the analytic kl_divergence(Delta, p) leaves out: Monte Carlo there
            drawn = {s for e in attribution.entries if e.auxiliary for s in e.sites} if attribution else set()
            rows: list[torch.Tensor] = []  # (n,) per latent row
            analytic_rows: list[bool] = []
            for name, model_site, guide_site in latent:
                if model_site is None:  # auxiliary guide site: its log q
                    kl, analytic = sites.log_prob(guide_site), False
                else:
                    kl, analytic = sites.kl(model_site, guide_site, analytic=name not in drawn)
                rows.append(sites.sum_per_particle(kl, n, max_plate_nesting))
                analytic_rows.append(analytic)
            if latent and attribution is not None:
                stacked = torch.stack(rows, 0).expand(3, len(rows), n)  # (3, R, n): the layout apply moves
                per_entry = attribution.apply(
                    latent, stacked, functools.partial(_per_particle, num=n, max_plate_nesting=max_plate_nesting)
                )[0][1]  # (E, n)
                for e, entry in enumerate(attribution.entries):
                    analytic = not entry.auxiliary and all(analytic_rows[r] for r in entry.rows)
                    kl_method.setdefault(entry.name, "analytic" if analytic else "monte carlo")
                    rate_sites[entry.name] = rate_sites.get(entry.name, 0.0) + per_entry[e].sum()
                rate = per_entry.sum(0)
            if rate is None:  # no latent site
                rate = torch.zeros(n) if distortion is None else torch.zeros_like(distortion)
            if distortion is None:  # no observed site
                distortion = torch.zeros_like(rate)
            chunks.append(torch.stack([rate, distortion], -1))
        totals = torch.cat(chunks, 0)  # (S, 2)

    N = 1 if frame is None else (frame.full_size or frame.size) * share
    S = num_samples
    mean: list[float] = (totals.mean(0) / N).tolist()
    stderr: list[float] = (totals.std(0) / (math.sqrt(S) * N) if S > 1 else torch.full((2,), math.nan)).tolist()
    return RateDistortion(
        rate=mean[0],
        distortion=mean[1],
        rate_stderr=stderr[0],
        distortion_stderr=stderr[1],
        rate_per_site={k: float(v) / (S * N) for k, v in rate_sites.items()},
        distortion_per_site={k: float(v) / (S * N) for k, v in dist_sites.items()},
        kl_method=kl_method,
        plate=None if frame is None else frame.name,
        num_datapoints=int(round(N)),
        num_samples=S,
        beta=None if beta is None else float(beta),
    )


def rate_distortion_sweep(
    fit: Callable[[float], tuple[Callable[..., Any], Callable[..., Any]]],
    betas: Iterable[float],
    *args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    plate: str | None = None,
    num_samples: int = 10,
    batch_size: int | None = None,
    max_plate_nesting: int | None = None,
) -> pandas.DataFrame:
    """
    Rate and distortion over a sweep of β: for each β, ``model, guide = fit(beta)`` (your
    training at that β, e.g. an :class:`~pyro_elbo_lab.SVIRunner` run with
    ``BetaELBO(beta)``), then :func:`rate_distortion` of the result, evaluated right away
    (so the parameter store holds that fit).

    :param callable fit: ``fit(beta) -> (model, guide)``.
    :param betas: the β values (finite, >= 0).
    :param args: the data, passed to :func:`rate_distortion`.
    :param dict model_kwargs: the model's keyword arguments.
    :param plate: as :func:`rate_distortion`.
    :param int num_samples: as :func:`rate_distortion`.
    :param int batch_size: as :func:`rate_distortion`.
    :param int max_plate_nesting: as :func:`rate_distortion`.
    :returns: one row per β (indexed by β) with columns ``beta``, ``rate``, ``distortion``,
        ``rate_stderr``, ``distortion_stderr``, ``elbo`` (:math:`-(D+R)`) and
        ``objective`` (:math:`-(D+\\beta R)`), in nats per datapoint: the points of the
        rate–distortion plane of Alemi et al. (2018).
    :rtype: pandas.DataFrame
    :raises ValueError: if ``betas`` is empty, a β is not a finite number >= 0, or ``fit``
        does not return a ``(model, guide)`` pair.

    References

    - *Fixing a Broken ELBO*, A. A. Alemi, B. Poole, I. Fischer, J. V. Dillon, R. A. Saurous,
      K. Murphy (2018)
    - *β-VAE: Learning Basic Visual Concepts with a Constrained Variational Framework*,
      I. Higgins, L. Matthey, A. Pal, C. Burgess, X. Glorot, M. Botvinick, S. Mohamed,
      A. Lerchner (2017)
    """
    import pandas as pd

    rows = []
    for beta in betas:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"betas must be finite numbers >= 0, got {beta!r}")
        fitted = fit(beta)
        if not (isinstance(fitted, tuple) and len(fitted) == 2):
            raise ValueError(
                f"fit(beta) must return a (model, guide) pair, got {type(fitted).__name__} for beta={beta}"
            )
        report = rate_distortion(
            fitted[0],
            fitted[1],
            *args,
            model_kwargs=model_kwargs,
            plate=plate,
            num_samples=num_samples,
            batch_size=batch_size,
            max_plate_nesting=max_plate_nesting,
            beta=beta,
        )
        rows.append(report.to_dataframe())
    if not rows:
        raise ValueError("betas is empty: pass the β values to fit, e.g. betas=[0.5, 1.0, 4.0]")
    return pd.concat(rows)
