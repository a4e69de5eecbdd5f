# SPDX-License-Identifier: Apache-2.0
"""
Helpers for diagnostics of local latents (a VAE's codes): find the data plate and the
latent sites inside it, and lay per-element quantities out as ``(S, N, D)`` tensors
(importance sample, element of the data plate, latent dimension).

Not public API: used by :mod:`~pyro_elbo_lab.diagnostics.collapse`,
:mod:`~pyro_elbo_lab.diagnostics.aggregate` and
:mod:`~pyro_elbo_lab.diagnostics.rate_distortion`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch
from pyro.poutine.indep_messenger import CondIndepStackFrame
from pyro.poutine.runtime import Message
from pyro.poutine.trace_struct import Trace

from .. import sites
from .traces import SAMPLE_PLATE, ImportanceTraces, probe_traces

__all__ = [
    "ELEMENT_BUDGET",
    "SAFETY_FACTOR",
    "LocalSite",
    "batches",
    "collect_local_sites",
    "dimension_names",
    "find_data_plate",
    "local_sites",
    "plan",
    "plate_dim",
    "sample_sites",
    "site_distribution",
    "site_value",
    "unwrap",
]

#: Elements (value and log_prob entries, times :data:`SAFETY_FACTOR`) one automatic batch may hold.
ELEMENT_BUDGET = 2**24
#: Headroom for the temporaries a vectorised trace creates besides its values and log_probs.
SAFETY_FACTOR = 4


def sample_sites(trace: Trace) -> list[tuple[str, Message]]:
    """``(name, site)`` for every sample site of ``trace``, in trace order."""
    return [(name, site) for name, site in trace.nodes.items() if site["type"] == "sample"]


def dimension_names(site: str, size: int) -> list[str]:
    """``["z"]`` for a one-dimensional site, else ``["z[0]", "z[1]", ...]``."""
    return [site] if size == 1 else [f"{site}[{i}]" for i in range(size)]


def plate_dim(frame: CondIndepStackFrame) -> int:
    """
    The (negative) batch dim of a vectorised plate.

    :raises ValueError: for a sequential plate (``for i in pyro.plate(...)``), which has no dim.
    """
    if frame.dim is None:
        raise ValueError(
            f"plate '{frame.name}' is sequential (it has no dim); use the vectorised form "
            f"`with pyro.plate('{frame.name}', N):` for the data plate"
        )
    return frame.dim


def site_distribution(site: Mapping[str, Any]) -> torch.distributions.Distribution:
    """
    The distribution of a sample site (``site["fn"]``).

    :raises ValueError: naming the site, if its ``fn`` is not a :class:`torch.distributions.Distribution`.
    """
    fn = site["fn"]
    if not isinstance(fn, torch.distributions.Distribution):
        raise ValueError(
            f"site '{site['name']}' samples from {type(fn).__name__}, not a torch.distributions.Distribution; "
            "the local-latent diagnostics need a Pyro distribution at each latent site"
        )
    return fn


def site_value(site: Mapping[str, Any]) -> torch.Tensor:
    """
    The value of a sample site (``site["value"]``).

    :raises ValueError: naming the site, if its value is not a tensor.
    """
    value = site["value"]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"site '{site['name']}' has value {value!r} in its trace; a tensor is needed")
    return value


def _frames(site: Message) -> list[CondIndepStackFrame]:
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name != SAMPLE_PLATE]


def unwrap(fn: torch.distributions.Distribution) -> torch.distributions.Distribution:
    """The element-level distribution of a site (:func:`pyro_elbo_lab.sites.factorise`)."""
    return sites.factorise(fn).element


@overload
def find_data_plate(
    model_trace: Trace, plate: str | None, need_latent: Literal[True] = True, argument: str = "plate"
) -> CondIndepStackFrame: ...


@overload
def find_data_plate(
    model_trace: Trace, plate: str | None, need_latent: bool, argument: str = "plate"
) -> CondIndepStackFrame | None: ...


def find_data_plate(
    model_trace: Trace, plate: str | None, need_latent: bool = True, argument: str = "plate"
) -> CondIndepStackFrame | None:
    """
    The data plate of a (vectorised) model trace: the named one, or the single outermost
    vectorised plate that holds an observed site and, when ``need_latent``, a latent site
    of the model. The sample plate of :mod:`~pyro_elbo_lab.diagnostics.traces` is never a
    candidate.

    :param model_trace: a model trace.
    :param str plate: the plate's name, or ``None`` to infer it.
    :param bool need_latent: whether the inferred plate must also hold a latent site.
    :param str argument: the caller's name for ``plate``, used in error messages.
    :returns: the plate's frame; ``None`` when ``plate`` is ``None``, ``need_latent`` is
        false and no vectorised plate holds an observed site.
    :raises ValueError: if ``plate`` is not a vectorised plate of the model (listing the
        model's plates), or it cannot be inferred.
    """
    observed = [(n, s) for n, s in sample_sites(model_trace) if s["is_observed"]]
    latent = [(n, s) for n, s in sample_sites(model_trace) if not s["is_observed"]]
    all_frames = {f.name: f for _, s in sample_sites(model_trace) for f in _frames(s)}
    if plate is not None:
        if not isinstance(plate, str):
            raise ValueError(f"{argument} must be the name of the data plate (str) or None, got {argument}={plate!r}")
        if plate not in all_frames:
            raise ValueError(
                f"{argument}='{plate}' is not a vectorised plate of the model; its plates are {sorted(all_frames)}. "
                "Name the data plate that holds the observations (with pyro.plate(name, N))."
            )
        return all_frames[plate]
    obs_frames = {f.name: f for _, s in observed for f in _frames(s)}
    if need_latent:
        lat_names = {f.name for _, s in latent for f in _frames(s)}
        candidates = [f for name, f in obs_frames.items() if name in lat_names]
    else:
        candidates = list(obs_frames.values())
    if not candidates:
        if not need_latent:
            return None
        raise ValueError(
            "could not find a data plate holding both observed sites and latent sites (local latents, as in a VAE); "
            f"the model's plates are {sorted(all_frames)}. Pass plate='<data plate name>' and sites=[...]."
        )
    outer = min(plate_dim(f) for f in candidates)
    chosen = [f for f in candidates if f.dim == outer]
    if len(chosen) > 1:
        raise ValueError(
            f"several plates could be the data plate: {sorted(f.name for f in chosen)}; pass plate='<name>'"
        )
    return chosen[0]


def local_sites(model_trace: Trace, frame: CondIndepStackFrame, sites: Iterable[str] | str | None) -> list[str]:
    """
    Latent sites of the model inside ``frame`` (all of them, or the named ones, checked).
    The traces come from :func:`~pyro_elbo_lab.diagnostics.traces.vectorized_traces`, which
    has already checked that every latent site of the model has a guide site.

    :raises ValueError: naming a site that is observed, missing from the model, or outside
        the data plate; or if ``frame`` holds no latent site.
    """
    latent = [n for n, s in sample_sites(model_trace) if not s["is_observed"]]
    inside = [n for n in latent if any(f.name == frame.name for f in _frames(model_trace.nodes[n]))]
    if sites is None:
        if not inside:
            raise ValueError(
                f"plate '{frame.name}' holds no latent site of the model (latent sites: {latent}); "
                "pass the data plate of the local latents, or sites=[...]"
            )
        return inside
    if isinstance(sites, str):
        sites = [sites]
    sites = list(sites)
    if not sites:
        raise ValueError("sites is empty: pass None for every latent site in the data plate, or name at least one")
    for name in sites:
        if name not in model_trace.nodes or model_trace.nodes[name]["type"] != "sample":
            raise ValueError(f"sites names '{name}', which is not a sample site of the model; latent sites: {latent}")
        if model_trace.nodes[name]["is_observed"]:
            raise ValueError(f"sites names '{name}', an observed site; name latent sites instead: {latent}")
        if name not in inside:
            raise ValueError(
                f"site '{name}' is not inside the data plate '{frame.name}', so it is not a local latent; "
                f"local latents: {inside}"
            )
    return sites


@dataclass
class LocalSite:
    """
    One local latent site of a vectorised model/guide trace, with per-element tensors laid
    out as ``(S, N, D)`` (importance sample, element of the data plate, latent dimension).
    Every quantity comes from :mod:`pyro_elbo_lab.sites`, unscaled (per-datapoint values)
    and masked: :meth:`mask` says which entries are kept.

    :ivar str name: site name.
    :ivar pyro.poutine.runtime.Message model_site: the model trace's site.
    :ivar pyro.poutine.runtime.Message guide_site: the guide trace's site.
    :ivar frame: the data plate.
    :ivar int max_plate_nesting: plate depth of the traces (the sample plate is one further left).
    """

    name: str
    model_site: Message
    guide_site: Message
    frame: CondIndepStackFrame
    max_plate_nesting: int

    @property
    def elementwise(self) -> bool:
        """Whether guide and prior factorise into univariate distributions over the same dimensions."""
        q, p = sites.factorise(site_distribution(self.guide_site)), sites.factorise(site_distribution(self.model_site))
        return q.element.event_shape == torch.Size() == p.element.event_shape and q.reinterpreted == p.reinterpreted

    @property
    def q(self) -> torch.distributions.Distribution:
        """The guide's element distribution (univariate), or its site distribution when not factorised."""
        fn = site_distribution(self.guide_site)
        return sites.factorise(fn).element if self.elementwise else fn

    def value(self) -> torch.Tensor:
        """The guide's draws at the site (``batch_shape + event_shape``)."""
        return site_value(self.guide_site)

    def canonical(self, x: torch.Tensor) -> torch.Tensor:
        """Lay a ``batch_shape + (J,)`` tensor (the layout of :mod:`pyro_elbo_lab.sites`) out as ``(S, N, D)``."""
        x = x.expand(tuple(site_distribution(self.guide_site).batch_shape) + (x.shape[-1],))
        pos = self.max_plate_nesting + 1 + plate_dim(self.frame)
        x = x.movedim(pos, 1)
        return x.reshape(x.shape[0], x.shape[1], -1)

    def mask(self) -> torch.Tensor:
        """Which entries are kept (bool, ``(S, N, D)``): :func:`pyro_elbo_lab.sites.element_mask`."""
        return self.canonical(sites.element_mask(self.model_site, self.guide_site, per_dim=True))

    def kl(self) -> tuple[torch.Tensor, bool]:
        """
        KL(q ‖ p) per element and dimension, ``(S, N, D)``, 0 where masked: analytic where
        registered (then ``True``), else the one-sample Monte Carlo ``log q(z) - log p(z)``
        (:func:`pyro_elbo_lab.sites.kl`, unscaled).
        """
        kl, analytic = sites.kl(self.model_site, self.guide_site, scaled=False, per_dim=True)
        return self.canonical(kl), analytic

    def log_q(self) -> torch.Tensor:
        """``log q(z_{s,n} | x_n)`` per element, ``(S, N, D)`` (``D`` groups for a non-factorised base)."""
        return self.canonical(sites.log_prob(self.guide_site, scaled=False, per_dim=True))

    def log_p(self) -> torch.Tensor:
        """``log p(z_{s,n})`` per element under the model's (prior) site distribution, ``(S, N, D)``."""
        return self.canonical(sites.log_prob(self.model_site, scaled=False, per_dim=True))

    def pairwise_log_q(self, rows: torch.Tensor) -> torch.Tensor:
        """
        ``log q(z_{s,i} | x_m)`` for the query elements ``i in rows`` against every element
        ``m`` of the plate, per dimension: shape ``(len(rows), S, N, D)``, masks not applied
        (the caller selects the kept elements).

        Evaluates the guide's element distribution (whose batch holds every ``x_m``) at
        values broadcast along the data plate, so it assumes the site's guide factor
        depends on ``x_m`` (and on the draws of the same sample ``s`` of other sites) only.
        """
        value = self.value()
        q = self.q
        pos = self.max_plate_nesting + 1 + plate_dim(self.frame)
        query = value.index_select(pos, rows).movedim(pos, 0).unsqueeze(pos + 1)
        lp = q.log_prob(query)  # (I, S, ..., N, ..., E_r)
        target = (len(rows),) + tuple(value.shape[: value.dim() - len(q.event_shape)])
        lp = lp.expand(target).movedim(pos + 1, 2)
        return lp.reshape(lp.shape[0], lp.shape[1], lp.shape[2], -1)

    def mean(self) -> tuple[torch.Tensor, bool]:
        """E_q[z] per element, ``(S, N, D)``: the guide's mean where defined (``True``), else the sample."""
        value = self.value()
        try:
            mean = self.q.mean
            ok = bool(torch.isfinite(mean).all())
        except NotImplementedError:
            ok = False
        x = mean.expand(value.shape) if ok else value
        r = sites.factorise(site_distribution(self.guide_site)).reinterpreted
        return self.canonical(x.reshape(x.shape[: x.dim() - r] + (-1,)) if r else x.unsqueeze(-1)), ok


def collect_local_sites(
    traces: ImportanceTraces, frame: CondIndepStackFrame, names: list[str], elementwise: bool
) -> list[LocalSite]:
    """:class:`LocalSite` views of ``names`` in ``traces``, checked."""
    out = []
    for name in names:
        site = LocalSite(
            name,
            traces.model_trace.nodes[name],
            traces.guide_trace.nodes[name],
            frame,
            traces.max_plate_nesting,
        )
        if elementwise and not site.elementwise:
            raise ValueError(
                f"per-dimension diagnostics need guide and prior distributions at site '{name}' that factorise over "
                f"its dimensions (e.g. Normal(loc, scale).to_event(1)); found guide "
                f"{type(site.guide_site['fn']).__name__} whose elements have event shape "
                f"{tuple(unwrap(site_distribution(site.guide_site)).event_shape)} and prior "
                f"{type(site.model_site['fn']).__name__} whose elements have event shape "
                f"{tuple(unwrap(site_distribution(site.model_site)).event_shape)}; univariate elements are needed"
            )
        out.append(site)
    return out


def batches(num_samples: int, batch_size: int) -> Iterator[int]:
    """Sizes of consecutive batches covering ``num_samples``."""
    done = 0
    while done < num_samples:
        n = min(batch_size, num_samples - done)
        yield n
        done += n


def plan(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
    max_plate_nesting: int | None,
    batch_size: int | None,
    *,
    marginalise: bool = False,
) -> tuple[int, int]:
    """
    ``(max_plate_nesting, batch_size)``, probing the model once when either is ``None``
    (``marginalise``: as :func:`~pyro_elbo_lab.diagnostics.traces.probe_traces`).
    """
    if max_plate_nesting is None or batch_size is None:
        nesting, elements = probe_traces(model, guide, args, kwargs, marginalise=marginalise)
        if max_plate_nesting is None:
            max_plate_nesting = nesting
        if batch_size is None:
            batch_size = max(1, ELEMENT_BUDGET // (SAFETY_FACTOR * elements))
    return max_plate_nesting, batch_size
