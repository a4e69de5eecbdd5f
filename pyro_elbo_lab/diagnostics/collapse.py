# SPDX-License-Identifier: Apache-2.0
"""
Posterior collapse of local latents: the KL per latent dimension and the active units.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyro.distributions as dist
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace
from torch.distributions import biject_to
from torch.distributions.transforms import ComposeTransform

from .. import sites as site_terms
from ..checks import check_int, check_model_kwargs, nonnegative_number
from ..losses.attribution import Attribution, attribute, sample_sites
from .local import (
    LocalSite,
    batches,
    collect_local_sites,
    dimension_names,
    find_data_plate,
    local_sites,
    plan,
    site_distribution,
    site_value,
)
from .traces import ImportanceTraces, vectorized_traces

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CollapseReport", "autoguide_site", "posterior_collapse", "use_autoguide_sites"]


@dataclass(frozen=True)
class CollapseReport:
    """
    Per-dimension collapse diagnostics of local latents (nats per datapoint).

    :ivar str plate: the data plate.
    :ivar tuple sites: the latent sites analysed, in model order.
    :ivar tuple dimensions: names of the latent dimensions, ``"z[0]"``, ``"z[1]"``, ...
        (flattened batch-within-the-plate and event dims of each site), length ``D``.
    :ivar torch.Tensor kl_per_dimension: :math:`\\frac1N \\sum_n
        \\mathrm{KL}(q(z_{n,u} \\mid x_n) \\| p(z_{n,u}))` per dimension ``u``, shape ``(D,)``.
    :ivar torch.Tensor kl_per_dimension_stderr: its Monte Carlo standard error over the
        importance samples, shape ``(D,)`` (0 for analytic KL with a guide whose parameters
        depend on ``x`` only; ``nan`` for one sample).
    :ivar torch.Tensor activity: :math:`A_u = \\mathrm{Cov}_n(\\mathbb{E}_q[z_{n,u}])`, the
        variance over the data of the posterior mean, shape ``(D,)``.
    :ivar float threshold: a unit is active when ``activity > threshold``.
    :ivar int num_datapoints: ``N``, elements of the data plate present and not masked.
    :ivar int num_samples: draws per datapoint.
    :ivar dict kl_method: ``{site: "analytic" | "monte carlo"}``.
    :ivar dict mean_method: ``{site: "guide mean" | "monte carlo"}``.
    """

    plate: str
    sites: tuple[str, ...]
    dimensions: tuple[str, ...]
    kl_per_dimension: torch.Tensor = field(repr=False)
    kl_per_dimension_stderr: torch.Tensor = field(repr=False)
    activity: torch.Tensor = field(repr=False)
    threshold: float
    num_datapoints: int
    num_samples: int
    kl_method: Mapping[str, str] = field(default_factory=dict)
    mean_method: Mapping[str, str] = field(default_factory=dict)

    @property
    def active(self) -> torch.Tensor:
        """Boolean mask of active units, shape ``(D,)``."""
        return self.activity > self.threshold

    @property
    def active_units(self) -> int:
        """How many units are active (Burda et al. 2016)."""
        return int(self.active.sum())

    @property
    def num_dimensions(self) -> int:
        """``D``, the number of latent dimensions."""
        return len(self.dimensions)

    @property
    def kl(self) -> float:
        """Average KL per datapoint, summed over dimensions, in nats."""
        return float(self.kl_per_dimension.sum())

    def as_dict(self) -> dict[str, float]:
        """
        Flat ``{name: number}``: ``active_units``, ``num_dimensions``, ``kl``, and per
        dimension ``"kl/z[0]"`` and ``"activity/z[0]"``.
        """
        out: dict[str, float] = {
            "active_units": self.active_units,
            "num_dimensions": self.num_dimensions,
            "kl": self.kl,
        }
        for name, kl, act in zip(self.dimensions, self.kl_per_dimension.tolist(), self.activity.tolist()):
            out[f"kl/{name}"] = kl
            out[f"activity/{name}"] = act
        return out

    def to_dataframe(self) -> pd.DataFrame:
        """One row per latent dimension: ``kl``, ``kl_stderr``, ``activity``, ``active``."""
        import pandas as pd

        frame = pd.DataFrame(
            {
                "kl": self.kl_per_dimension.tolist(),
                "kl_stderr": self.kl_per_dimension_stderr.tolist(),
                "activity": self.activity.tolist(),
                "active": self.active.tolist(),
            },
            index=pd.Index(list(self.dimensions), name="dimension"),
        )
        return frame

    def __str__(self) -> str:
        return (
            f"CollapseReport({self.active_units}/{self.num_dimensions} active units (threshold {self.threshold:g}), "
            f"kl={self.kl:.4g} nats per datapoint over plate '{self.plate}', sites {list(self.sites)})"
        )


def autoguide_site(
    name: str, attribution: Attribution, latent: list, model_trace: Trace, guide_trace: Trace
) -> Message | None:
    """
    The guide's distribution of the model site ``name`` for an autoguide that draws it as a
    ``Delta`` at :math:`z = T(u)` of an auxiliary Normal :math:`u` (``<name>_unconstrained``
    of :class:`~pyro.infer.autoguide.AutoNormal`, or ``name``'s slice of the latent of
    :class:`~pyro.infer.autoguide.AutoDiagonalNormal`, found by
    :func:`~pyro_elbo_lab.losses.attribution.attribute`): a copy of the guide site whose
    ``fn`` is the pushforward :math:`q(z) = \\mathcal{N}(T^{-1}(z); m, s)\\,|\\partial
    T^{-1}/\\partial z|`, elementwise (``Normal(m, s)`` itself for a real site, :math:`T` the
    identity; a ``TransformedDistribution`` else), reinterpreted like the model site
    (``.to_event(k)``). Its log density at the Delta's value is the auxiliary Normal's log q
    plus the Delta's log-Jacobian, per latent dimension, and it can be evaluated at other
    values (the aggregate posterior) and against the prior in closed form.

    :param str name: a latent site of the model.
    :param Attribution attribution: :func:`~pyro_elbo_lab.losses.attribution.attribute` of the guide.
    :param list latent: :func:`~pyro_elbo_lab.losses.attribution.sample_sites` of these traces.
    :param model_trace: the model trace.
    :param guide_trace: the guide trace.
    :returns: the stand-in guide site, or ``None`` when ``name`` has no auxiliary guide site
        or is not drawn this way (a joint latent that does not factorise, a transform that
        is not elementwise such as a simplex's, a hand-written auxiliary site).
    :rtype: dict or None
    """
    entry = attribution.entry_of(name)
    if entry is None or entry.kind != "site" or not entry.auxiliary:
        return None
    guide_site, model_site = guide_trace.nodes[name], model_trace.nodes[name]
    prior = site_terms.factorise(site_distribution(model_site))
    if (
        not isinstance(site_terms.factorise(site_distribution(guide_site)).element, dist.Delta)
        or prior.element.event_shape
    ):
        return None
    transform = biject_to(prior.element.support)
    if transform.domain.event_dim or transform.codomain.event_dim:  # not elementwise
        return None
    whole = [latent[r][0] for r in entry.rows if latent[r][1] is None]
    value = site_value(guide_site)
    if len(whole) == 1 and len(entry.auxiliary) == 1:  # AutoNormal: <name>_unconstrained
        aux = guide_trace.nodes[whole[0]]
        q = site_terms.factorise(site_distribution(aux)).element
        if not isinstance(q, dist.Normal):
            return None
        loc, scale, u = q.loc, q.scale, site_value(aux)
    elif not whole and len(entry.auxiliary) == 1:  # AutoDiagonalNormal: the slice of its latent
        if not isinstance(
            site_terms.factorise(site_distribution(guide_trace.nodes[entry.auxiliary[0]])).element, dist.Normal
        ):
            return None

        def element(s: Message) -> torch.distributions.Normal:
            return site_terms.factorise(site_distribution(s)).element  # type: ignore[return-value]

        parts = [
            attribution.unpack(latent, name, lambda s: element(s).loc.expand(s["value"].shape)),
            attribution.unpack(latent, name, lambda s: element(s).scale.expand(s["value"].shape)),
            attribution.unpack(latent, name, lambda s: s["value"]),
        ]
        if any(len(p) != 1 for p in parts):
            return None
        loc, scale, u = (p[0][0] for p in parts)
    else:
        return None
    try:
        shape = torch.broadcast_shapes(loc.shape, scale.shape, u.shape, value.shape)
    except RuntimeError:
        return None
    if shape != value.shape or not torch.allclose(transform(u.expand(shape)), value):
        return None  # not the Delta of this auxiliary draw
    base = dist.Normal(loc.expand(shape), scale.expand(shape))
    identity = isinstance(transform, ComposeTransform) and not transform.parts
    fn = base if identity else dist.TransformedDistribution(base, [transform])
    if prior.reinterpreted:
        fn = dist.Independent(fn, prior.reinterpreted)
    stand_in = guide_site.copy()
    stand_in["fn"] = fn
    stand_in["unscaled_log_prob"] = fn.log_prob(value)
    stand_in["log_prob"] = scale_and_mask(stand_in["unscaled_log_prob"], guide_site["scale"], guide_site["mask"])
    return stand_in


def use_autoguide_sites(
    guide: Callable[..., Any], traces: ImportanceTraces, names: Iterable[str], attribution: Attribution | None = None
) -> tuple[Attribution, list, set[str]]:
    """
    Replace, in ``traces.guide_trace``, the ``Delta`` sites of ``names`` that an autoguide
    draws through an auxiliary Normal by their :func:`autoguide_site` stand-ins.

    :param guide: the guide (an autoguide is read for its layout).
    :param ImportanceTraces traces: vectorised traces, changed in place.
    :param names: the local latent sites.
    :param attribution: the guide's attribution from an earlier batch, or ``None``.
    :returns: ``(attribution, latent, replaced)``: the attribution, the latent list (of the
        traces as drawn) and the names replaced.
    :rtype: tuple
    """
    latent = sample_sites(traces.model_trace, traces.guide_trace, missing="skip")[1]
    if attribution is None:
        attribution = attribute(guide, traces.model_trace, traces.guide_trace, latent)
    replaced: set[str] = set()
    for name in names:
        stand_in = autoguide_site(name, attribution, latent, traces.model_trace, traces.guide_trace)
        if stand_in is not None:
            traces.guide_trace.nodes[name] = stand_in
            replaced.add(name)
    return attribution, latent, replaced


def _check_not_joint_delta(name: str, attribution: Attribution, guide_trace: Trace) -> None:
    """
    :raises ValueError: when an autoguide draws site ``name`` as a ``Delta`` over several
        latent dimensions that :func:`autoguide_site` could not split (its transform to
        the prior's support is not elementwise), so no KL per dimension exists.
    """
    entry = attribution.entry_of(name)
    element = site_terms.factorise(site_distribution(guide_trace.nodes[name])).element
    if entry is None or entry.kind != "site" or not entry.auxiliary or not isinstance(element, dist.Delta):
        return
    if element.event_shape:
        raise ValueError(
            f"posterior_collapse needs the KL of each latent dimension of site '{name}', but the guide draws it as "
            f"a Delta of event shape {tuple(element.event_shape)} from its auxiliary site(s) "
            f"{list(entry.auxiliary)} through a transform that is not elementwise (e.g. to a simplex), so its "
            f"KL does not split per dimension; leave the site out with sites=[...]"
        )


def _auxiliary_log_q(
    view: LocalSite, plan: Attribution, latent: list, guide_trace: Trace, kl: torch.Tensor
) -> torch.Tensor | None:
    """
    The log q of the auxiliary guide sites that stand for ``view``'s site, laid out like its
    KL ``(S, N, D)``; ``None`` when there are none: AutoNormal's ``<site>_unconstrained``
    whole, and the site's slice of a factorised joint latent (AutoDiagonalNormal's, split
    per dimension by :meth:`~pyro_elbo_lab.losses.attribution.Attribution.split_log_q`).

    :raises ValueError: when the site's KL cannot be split per dimension (a joint guide that
        does not factorise, or a transform that is not elementwise).
    """
    entry = plan.entry_of(view.name)
    if entry is None or not entry.auxiliary:
        return None
    if entry.kind != "site":
        raise ValueError(
            f"posterior_collapse needs the KL of each latent dimension of site '{view.name}', but its guide draws it "
            f"through the joint auxiliary site(s) {list(entry.auxiliary)} (e.g. AutoMultivariateNormal, "
            f"AutoLowRankMultivariateNormal or a flow: one correlated latent for every site and datapoint), whose log "
            f"q does not split per datapoint and dimension; use AutoNormal, AutoDiagonalNormal or an amortised guide "
            f"with a site per latent"
        )
    whole = {latent[r][0] for r in entry.rows}
    parts: list[tuple[str, torch.Tensor]] = [
        (aux, site_terms.log_prob(guide_trace.nodes[aux], scaled=False, per_dim=True))
        for aux in entry.auxiliary
        if aux in whole
    ]
    split = plan.split_log_q(latent, view.name)
    if split is not None:
        parts.append((", ".join(a for a in entry.auxiliary if a not in whole), split))
    elif any(aux not in whole for aux in entry.auxiliary):
        raise ValueError(
            f"posterior_collapse needs the KL of each latent dimension of site '{view.name}', but the layout of its "
            f"joint auxiliary site(s) {[a for a in entry.auxiliary if a not in whole]} is not known (an autoguide "
            f"that has not run its prototype); run the guide once first"
        )
    total = torch.zeros_like(kl)
    for aux, log_q in parts:
        try:
            laid: torch.Tensor | None = view.canonical(log_q)
        except RuntimeError:  # a shape that does not expand to the site's
            laid = None
        if laid is None or laid.shape != kl.shape:
            raise ValueError(
                f"posterior_collapse needs the KL of each latent dimension of site '{view.name}', but its auxiliary "
                f"guide site '{aux}' has log q of shape {tuple(log_q.shape)} per dimension, which does not match the "
                f"site's dimensions (a transform that is not elementwise, e.g. to a simplex); leave the site out "
                f"with sites=[...]"
            )
        total = total + laid
    return total


def posterior_collapse(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    *args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    plate: str | None = None,
    sites: Iterable[str] | str | None = None,
    threshold: float = 0.01,
    num_samples: int = 1,
    batch_size: int | None = None,
    max_plate_nesting: int | None = None,
) -> CollapseReport:
    """
    Which latent dimensions of an amortised guide carry information about the data.

    For local latents :math:`z_n` in the data plate (a VAE's codes), with guide
    :math:`q(z_n \\mid x_n)` and prior :math:`p(z_n)` that factorise over dimensions
    :math:`u`:

    .. math::

        \\mathrm{KL}_u = \\frac1N \\sum_{n=1}^N \\mathrm{KL}(q(z_{n,u} \\mid x_n) \\| p(z_{n,u})),
        \\qquad
        A_u = \\frac1N \\sum_n \\big(\\mathbb{E}_q[z_{n,u}] - \\bar\\mu_u\\big)^2,

    the KL per dimension (nats per datapoint; a dimension with :math:`\\mathrm{KL}_u
    \\approx 0` has collapsed to the prior) and the activity of Burda et al. (2016): a unit
    is *active* when :math:`A_u > \\text{threshold}` (the empirical, 1/N, variance over the
    data of its posterior mean; :math:`\\bar\\mu_u` is the mean over the data).

    Estimators: :math:`\\mathrm{KL}_u` is analytic where
    :func:`torch.distributions.kl_divergence` knows the guide/prior pair (Normal–Normal and
    most exponential families), averaged over ``num_samples`` draws of the other latents,
    which is exact with one sample when the guide's parameters depend on ``x`` only; else
    it is the Monte Carlo average of :math:`\\log q(z) - \\log p(z)` over ``num_samples``
    draws per datapoint. With auxiliary guide sites (autoguides), the KL of a site includes
    the log q of the auxiliary site that stands for it, attributed as in the losses
    (:func:`pyro_elbo_lab.losses.attribution.attribute`): for
    :class:`~pyro.infer.autoguide.AutoNormal` (``<site>_unconstrained``) and
    :class:`~pyro.infer.autoguide.AutoDiagonalNormal` (the site's slice of its one latent,
    which factorises per dimension), the guide's ``Delta`` at :math:`z = T(u)` is read as the
    pushforward of the auxiliary Normal (:func:`autoguide_site`), whose log density
    :math:`\\log q(u) + \\log|\\partial u/\\partial z|` splits per dimension when :math:`T`
    is elementwise, also on ``.to_event(k)`` sites: for a real site it is the Normal itself and
    the KL per dimension is analytic, for a constrained one (``LogNormal``, ``Gamma``, ...)
    Monte Carlo :math:`\\log q(u) + \\log|\\partial u/\\partial z| - \\log p(z)`. A site whose
    transform is not elementwise (a simplex) is refused with a ``ValueError``. A joint latent that
    does not factorise (:class:`~pyro.infer.autoguide.AutoMultivariateNormal`, low-rank,
    flows) is refused with a ``ValueError``: it has no KL per datapoint and dimension.
    :math:`\\mathbb{E}_q[z]` is the guide's ``mean`` where defined,
    else the sample average. :attr:`CollapseReport.kl_method` says which was used. Draws
    come from one vectorised guide/model trace per batch of samples, under
    :func:`torch.no_grad`. Per-site values come from :mod:`pyro_elbo_lab.sites`: Pyro's
    site scale is not applied (per-datapoint values over the elements present), masks are
    (``poutine.mask`` or ``Distribution.mask`` in model or guide): a masked element of the
    data plate is left out of the averages, the activity and ``num_datapoints``.

    :param model: a Pyro model with local latents in a data plate.
    :param guide: an amortised guide for them.
    :param args: model/guide positional arguments (the data).
    :param dict model_kwargs: model/guide keyword arguments.
    :param str plate: the data plate; inferred as the vectorised plate holding both
        observed and latent sites when ``None``.
    :param sites: the local latent sites to analyse (default: all inside the plate).
    :param float threshold: activity above which a unit counts as active (0.01 in Burda et
        al. 2016).
    :param int num_samples: draws per datapoint (>= 1); raise it for Monte Carlo KL.
    :param int batch_size: draws per vectorised trace; automatic when ``None``.
    :param int max_plate_nesting: the model's plate depth; guessed when ``None``.
    :returns: the report.
    :rtype: CollapseReport
    :raises ValueError: if the plate or a site cannot be found, a site's guide or prior does
        not factorise over dimensions, a site is drawn through a joint auxiliary guide site
        that does not factorise (AutoMultivariateNormal, low-rank, flows), or an argument is
        out of range.

    References

    - *Importance Weighted Autoencoders*, Y. Burda, R. Grosse, R. Salakhutdinov (2016)
    - *Lagging Inference Networks and Posterior Collapse in Variational Autoencoders*,
      J. He, D. Spokoyny, G. Neubig, T. Berg-Kirkpatrick (2019)
    """
    threshold = nonnegative_number(
        threshold, "threshold", "a unit is active when its activity exceeds it (0.01 in Burda et al. 2016)"
    )
    kwargs = check_model_kwargs(model_kwargs)
    check_int("num_samples", num_samples, 1)
    check_int("batch_size", batch_size, 1, allow_none=True)

    with torch.no_grad():
        max_plate_nesting, batch_size = plan(model, guide, args, kwargs, max_plate_nesting, batch_size)
        frame: CondIndepStackFrame | None = None
        names: list[str] = []
        mean_sum: torch.Tensor | None = None
        kl_rows: list[torch.Tensor] = []  # (n, D) per batch: per sample, averaged over the kept data
        kl_method: dict[str, str] = {}
        mean_method: dict[str, str] = {}
        sizes: list[int] = []
        attribution: Attribution | None = None
        kept: torch.Tensor | None = None  # (N, D): which elements of the data plate count (masks), from the first draw
        for n in batches(num_samples, batch_size):
            traces = vectorized_traces(model, guide, args, kwargs, n, max_plate_nesting)
            if frame is None:
                frame = find_data_plate(traces.model_trace, plate)
                names = local_sites(traces.model_trace, frame, sites)
            # an autoguide's Delta at a site becomes the pushforward of its auxiliary Normal
            # (the attribution is the same for every batch: computed once)
            attribution, latent, replaced = use_autoguide_sites(guide, traces, names, attribution)
            for name in names:
                if name not in replaced:
                    _check_not_joint_delta(name, attribution, traces.guide_trace)
            views = collect_local_sites(traces, frame, names, elementwise=True)
            kls, means, masks = [], [], []
            for view in views:
                kl, analytic = view.kl()  # (n, N, D_site), 0 where masked
                aux = None
                if view.name not in replaced:
                    aux = _auxiliary_log_q(view, attribution, latent, traces.guide_trace, kl)
                if aux is not None:  # the auxiliary site's log q belongs to this site's KL (AutoNormal)
                    # Monte Carlo at the Delta: the analytic kl_divergence(Delta, p) leaves out its
                    # log density (the log-Jacobian)
                    kl = view.canonical(
                        site_terms.kl(view.model_site, view.guide_site, scaled=False, per_dim=True, analytic=False)[0]
                    )
                    kl = kl + torch.where(view.mask().expand(kl.shape), aux, torch.zeros_like(aux))
                    analytic = False
                mean, from_guide = view.mean()  # (n, N, D_site)
                kl_method.setdefault(view.name, "analytic" if analytic else "monte carlo")
                mean_method.setdefault(view.name, "guide mean" if from_guide else "monte carlo")
                kls.append(kl)
                means.append(mean)
                masks.append(view.mask().expand(kl.shape))
                if len(sizes) < len(views):
                    sizes.append(kl.shape[-1])
            mask = torch.cat(masks, -1)  # (n, N, D)
            if kept is None:
                kept = mask[0]
                if not kept.any():
                    raise ValueError(
                        f"every element of plate '{frame.name}' is masked at sites {names}: there is no datapoint "
                        "to average over; unmask some (poutine.mask / Distribution.mask)"
                    )
            # masked elements contribute 0 and are not counted
            kl_rows.append(torch.cat(kls, -1).sum(1) / mask.sum(1).clamp(min=1))
            mean = torch.cat(means, -1)  # (n, N, D)
            mean_sum = mean.sum(0) if mean_sum is None else mean_sum + mean.sum(0)

        # num_samples >= 1 was checked, so the loop ran
        assert frame is not None and kept is not None and mean_sum is not None
        S = num_samples
        rows = torch.cat(kl_rows, 0)  # (S, D): small, kept so the spread is computed from deviations
        kl_mean = rows.mean(0)
        # the sample sd from deviations about the mean, not the sum of squares minus S·mean²,
        # which cancels catastrophically in float32 when the KL is large against its spread
        kl_se = rows.std(0) / math.sqrt(S) if S > 1 else torch.full_like(kl_mean, math.nan)
        posterior_mean = mean_sum / S  # (N, D)
        # the empirical (1/N) variance over the kept elements of the plate, per dimension
        weight = kept.to(posterior_mean.dtype)
        count = weight.sum(0).clamp(min=1)
        centre = (posterior_mean * weight).sum(0) / count
        activity = (((posterior_mean - centre) ** 2) * weight).sum(0) / count
        num_datapoints = int(kept.any(-1).sum())

    dims = [d for name, size in zip(names, sizes) for d in dimension_names(name, size)]
    return CollapseReport(
        plate=frame.name,
        sites=tuple(names),
        dimensions=tuple(dims),
        kl_per_dimension=kl_mean,
        kl_per_dimension_stderr=kl_se,
        activity=activity,
        threshold=float(threshold),
        num_datapoints=num_datapoints,
        num_samples=S,
        kl_method=kl_method,
        mean_method=mean_method,
    )
