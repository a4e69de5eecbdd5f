# SPDX-License-Identifier: Apache-2.0
"""
The one per-site estimator: every loss and diagnostic of the package computes the terms of
a sample site here.

A *site* is a node of a :class:`pyro.poutine.Trace` whose ``log_prob`` has been computed
(``trace.compute_log_prob()`` or Pyro's ``compute_score_parts``). For a latent site the
*pair* is ``(model_site, guide_site)``: the model's site replayed at the guide's value.

Quantities, elementwise over the site's batch shape (or ``batch_shape + (J,)`` per latent
dimension), in nats:

- :func:`log_prob`: :math:`\\log p(z)` of a model site or :math:`\\log q(z)` of a guide site;
- :func:`kl`: :math:`\\mathrm{KL}(q \\| p)`, analytic where
  :func:`torch.distributions.kl_divergence` is registered for the pair, else the one-sample
  Monte Carlo :math:`\\log q(z) - \\log p(z)`; per latent dimension with ``per_dim=True``;
- :func:`entropy`: :math:`\\mathbb{H}[q]`, analytic where the guide distribution has one,
  else :math:`-\\log q(z)`;
- :func:`cross_entropy`: :math:`-\\log p(z)` at the guide's draw (Monte Carlo);
- :func:`count`: how many elements a site has (its data size);
- :func:`element_mask`, :func:`pair_mask`, :func:`site_mask`, :func:`factorise`: which
  elements are kept, and a distribution taken apart into its latent dimensions;
- :func:`sum_per_particle`, :func:`log_prob_per_particle`: a batch-shaped tensor summed
  down to one value per particle (or importance sample).

**The rule for scale and mask.** Every quantity is masked: where a site is masked
(``poutine.mask``, or ``Distribution.mask`` anywhere inside its distribution) an element
contributes 0 and is not counted. A quantity of the pair (KL, entropy, cross-entropy) is
masked where either site masks the element (:func:`element_mask`); in the usual case (the
same masks in model and guide, as with ``pyro.plate`` and ``poutine.mask`` around both)
that is each site's own mask. The site's ``scale`` (``poutine.scale``, subsampling) is
applied with ``scaled=True`` (the objective: Pyro's data scaling, the guide site's scale
for pair quantities, as :class:`pyro.infer.TraceMeanField_ELBO`) and not with
``scaled=False`` (per-datapoint diagnostics, which report unweighted values). One
exception, for speed and for parity with :class:`pyro.infer.Trace_ELBO`:
:func:`log_prob_per_particle` returns Pyro's own memoised ``log_prob_sum``, in which each
site carries only its own mask (the losses' Monte Carlo KL is
``log_prob_sum(guide) - log_prob_sum(model)``; it equals the rule whenever model and
guide mask alike).

Imports nothing from the rest of the package.

References

[1] `Pyro: Deep Universal Probabilistic Programming`, Eli Bingham, Jonathan P. Chen,
    Martin Jankowiak, Fritz Obermeyer, Neeraj Pradhan, Theofanis Karaletsos, Rohit Singh,
    Paul Szerlip, Paul Horsfall, Noah D. Goodman (2019): trace sites, scale and mask.

[2] `Auto-Encoding Variational Bayes`, Diederik P. Kingma, Max Welling (2014): the
    analytic KL estimator.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from pyro.distributions import ExpandedDistribution, MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.runtime import Message
from torch.distributions import Independent, kl_divergence

__all__ = [
    "Factorised",
    "count",
    "cross_entropy",
    "element_mask",
    "entropy",
    "factorise",
    "kl",
    "log_prob",
    "log_prob_per_particle",
    "pair_mask",
    "scale_and_mask_event",
    "site_mask",
    "stack_per_particle",
    "sum_per_particle",
]


# -- per-particle sums --------------------------------------------------------------------


def sum_per_particle(
    x: torch.Tensor | float, num_particles: int | None = None, max_plate_nesting: int = 0, event_dims: int = 0
) -> torch.Tensor:
    """
    Sum a batch-shaped tensor down to one value per particle.

    Particles (a loss's vectorised particles, a diagnostic's importance samples) sit in a
    plate at batch dim ``-(max_plate_nesting + 1)``, counted from the right of the batch
    dims (``x.dim() - event_dims``); a tensor with fewer batch dims does not depend on the
    particle and is broadcast.

    :param x: a tensor of shape ``batch_shape + trailing`` (``trailing`` has
        ``event_dims`` dims, kept), or a number.
    :param int num_particles: the size ``P`` of the particle plate; ``None`` for no
        particle plate (sequential particles): every batch dim is summed.
    :param int max_plate_nesting: plate dims to the right of the particle plate.
    :param int event_dims: trailing dims of ``x`` to keep.
    :returns: shape ``trailing`` when ``num_particles`` is None, else ``(P,) + trailing``.
    :rtype: torch.Tensor
    """
    if not torch.is_tensor(x):
        x = torch.tensor(float(x))
    batch_dim = x.dim() - event_dims
    if num_particles is None:
        return x.sum(tuple(range(batch_dim))) if batch_dim > 0 else x
    k = batch_dim - (max_plate_nesting + 1)
    if k < 0:
        x = x.sum(tuple(range(batch_dim))) if batch_dim > 0 else x
        return x.unsqueeze(0).expand((num_particles,) + x.shape)
    dims = tuple(d for d in range(batch_dim) if d != k)
    traced = torch._C._get_tracing_state()  # TorchScript: shapes are tensors, keep the plain ops
    if dims:
        if not traced and all(x.shape[d] == 1 for d in dims):  # (P, 1, ...) of a global site: a view
            x = x.reshape(x.shape[k : k + 1] + x.shape[batch_dim:])
        else:
            x = x.sum(dims)
    if not traced and x.shape[0] == num_particles:  # no broadcast: no expand op
        return x
    return x.expand((num_particles,) + x.shape[1:])


def stack_per_particle(
    xs: list[torch.Tensor], num_particles: int | None = None, max_plate_nesting: int = 0
) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """
    :func:`sum_per_particle` of several tensors, stacked: the tensors of one shape and dtype
    are stacked first and summed by one reduction (a loss step's per-site sums cost a few
    tensor operations, not one per site). Same values as stacking the sums of each tensor,
    to float rounding.

    :param list xs: batch-shaped tensors (e.g. the sites' ``log_prob``).
    :param int num_particles: the size ``P`` of the particle plate, ``None`` for none.
    :param int max_plate_nesting: plate dims to the right of the particle plate.
    :returns: ``(stacked, order)``: ``stacked`` of shape ``(len(xs),)`` or
        ``(len(xs), P)``, its row ``i`` the sum of ``xs[order[i]]``; ``order`` is ``None``
        when the rows are in the order of ``xs``.
    :rtype: tuple
    """
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((x.shape, x.dtype), []).append(i)
    parts = []
    order: list[int] = []
    traced = torch._C._get_tracing_state()  # TorchScript: shapes are tensors, keep the plain ops
    for rows in groups.values():
        stacked = torch.stack([xs[i] for i in rows])
        shape = stacked.shape
        if not traced and len(shape) == max_plate_nesting + 2 and shape[1] == num_particles:
            # the common case, the particle dim leading each tensor: (rows, P, plates...) summed
            # over the plates (as sum_per_particle, without moving the stacking dim)
            if all(n == 1 for n in shape[2:]):
                parts.append(stacked.reshape(shape[:2]))
            else:
                parts.append(stacked.sum(tuple(range(2, len(shape)))))
        else:  # the stacking dim moved last (an event dim of sum_per_particle) and back
            summed = sum_per_particle(stacked.movedim(0, -1), num_particles, max_plate_nesting, event_dims=1)
            parts.append(summed.movedim(-1, 0))
        order += rows
    if len(parts) == 1:
        return parts[0], None
    # (while TorchScript traces, shapes hold tensors and every tensor is a group of its own)
    return torch.cat(parts), None if order == sorted(order) else tuple(order)


def log_prob_per_particle(site: Message, num_particles: int | None = None, max_plate_nesting: int = 0) -> torch.Tensor:
    """
    A site's scaled, masked ``log_prob`` summed per particle: Pyro's memoised
    ``log_prob_sum`` without a particle plate (no new computation), else
    :func:`sum_per_particle` of ``site["log_prob"]``.

    The per-particle sum is memoised in the site (as Pyro memoises ``log_prob_sum``), keyed
    by the ``log_prob`` tensor and the arguments: a loss asks for a guide site's sum twice
    (its ``log q`` and its entropy term) and pays for one.

    :returns: shape ``()`` or ``(P,)``, nats.
    :rtype: torch.Tensor
    """
    if num_particles is None:
        return site["log_prob_sum"]
    log_prob = site["log_prob"]
    # Pyro's Message TypedDict lists a closed set of keys, but a site is a plain dict that Pyro itself
    # extends (pyro.contrib.funsor's msg["funsor"]); the memo key is ours, hence the two ignores
    memo: tuple[torch.Tensor, int, int, torch.Tensor] | None = site.get("log_prob_per_particle")  # type: ignore[assignment]
    if memo is not None and memo[0] is log_prob and memo[1] == num_particles and memo[2] == max_plate_nesting:
        return memo[3]
    total = sum_per_particle(log_prob, num_particles, max_plate_nesting)
    site["log_prob_per_particle"] = (log_prob, num_particles, max_plate_nesting, total)  # type: ignore[typeddict-unknown-key]
    return total


# -- masks and scale ------------------------------------------------------------------------


class Factorised(NamedTuple):
    """
    A site distribution taken apart by :func:`factorise`.

    :ivar element: the distribution under the ``Independent``, expanded and masked
        wrappers (its own ``event_shape`` is kept, e.g. a ``MultivariateNormal``).
    :ivar int reinterpreted: how many of the site's event dims ``Independent`` wrappers
        reinterpreted (the latent dimensions of a ``.to_event(k)`` site).
    :ivar mask: the product of the wrappers' masks (``Distribution.mask``), shaped to
        broadcast against ``batch_shape + event_shape[:reinterpreted]``; ``None`` when
        unmasked.
    """

    element: torch.distributions.Distribution
    reinterpreted: int
    mask: torch.Tensor | None


def factorise(fn: torch.distributions.Distribution) -> Factorised:
    """
    Strip ``Independent``, Pyro's ``ExpandedDistribution`` and ``MaskedDistribution`` off
    a site distribution, keeping count of the reinterpreted dims and the masks.

    :rtype: Factorised
    """
    reinterpreted = 0
    masks = []
    while isinstance(fn, (Independent, ExpandedDistribution, MaskedDistribution)):
        if isinstance(fn, MaskedDistribution) and fn._mask is not None:
            m = fn._mask.expand(fn.batch_shape) if torch.is_tensor(fn._mask) else torch.tensor(bool(fn._mask))
            masks.append((m, reinterpreted))
        if isinstance(fn, Independent):
            reinterpreted += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    mask = None
    for m, above in masks:
        # a level's batch shape lacks the dims reinterpreted below it: pad those on the right
        m = m.reshape(m.shape + (1,) * (reinterpreted - above))
        mask = m if mask is None else mask & m
    return Factorised(fn, reinterpreted, mask)


def site_mask(site: Mapping[str, Any]) -> torch.Tensor | None:
    """
    The site's ``mask`` (``poutine.mask``) as a bool tensor broadcastable to the site's
    batch shape, or ``None`` when the site is not masked. (Masks set with
    ``Distribution.mask`` are inside the distribution and already in its ``log_prob``.)
    """
    mask = site.get("mask")
    if mask is None:
        return None
    if not torch.is_tensor(mask):
        return None if mask else torch.tensor(False)
    return mask.bool()


def pair_mask(model_site: Mapping[str, Any], guide_site: Mapping[str, Any]) -> torch.Tensor | None:
    """The mask of a pair: an element is kept where neither site masks it (``None``: all kept)."""
    masks = [m for m in (site_mask(model_site), site_mask(guide_site)) if m is not None]
    if not masks:
        return None
    return masks[0] if len(masks) == 1 else masks[0] & masks[1]


def scale_and_mask_event(
    x: torch.Tensor, scale: torch.Tensor | float, mask: torch.Tensor | bool | None, event_dims: int = 0
) -> torch.Tensor:
    """
    :func:`pyro.distributions.util.scale_and_mask` for a tensor with ``event_dims``
    trailing dims beyond the site's batch shape (masked elements are 0, not NaN).
    """
    if torch.is_tensor(scale) and event_dims:
        scale = scale.reshape(scale.shape + (1,) * event_dims)
    if torch.is_tensor(mask) and event_dims:
        mask = mask.reshape(mask.shape + (1,) * event_dims)
    return scale_and_mask(x, scale, mask)


def _apply(
    x: torch.Tensor, site: Mapping[str, Any], mask: torch.Tensor | None, scaled: bool, event_dims: int = 0
) -> torch.Tensor:
    """Scale (when ``scaled``) and mask ``x``; a ``batch_shape + (J,)`` tensor takes
    ``event_dims=1`` for the scale while its mask already has the full shape."""
    scale = site["scale"] if scaled else 1.0
    if torch.is_tensor(scale) and event_dims:
        scale = scale.reshape(scale.shape + (1,) * event_dims)
    return scale_and_mask(x, scale, mask)


# -- per-site quantities ------------------------------------------------------------------------


def log_prob(
    site: Mapping[str, Any], *, scaled: bool = True, per_dim: bool = False, value: torch.Tensor | None = None
) -> torch.Tensor:
    """
    :math:`\\log p(z)` of a model site (or :math:`\\log q(z)` of a guide site) per element,
    masked; scaled with ``scaled=True`` (then Pyro's own ``site["log_prob"]``, reused).

    :param bool per_dim: split over the latent dimensions of an ``Independent``
        (``.to_event``) site (see :func:`factorise`): ``batch_shape + (J,)``.
    :param value: evaluate at this value instead of the site's (``per_dim`` only; it must
        broadcast against the site's value shape).
    :returns: batch-shaped tensor (or ``batch_shape + (J,)``), nats.
    :rtype: torch.Tensor
    """
    if not per_dim:
        if scaled:
            return site["log_prob"]
        return _apply(site["unscaled_log_prob"], site, site_mask(site), scaled=False)
    f = factorise(site["fn"])
    z = site["value"] if value is None else value
    target = z.shape[: z.dim() - len(f.element.event_shape)]
    lp = f.element.log_prob(z).expand(target)
    mask = site_mask(site)
    if f.mask is not None:
        mask = f.mask if mask is None else mask.reshape(mask.shape + (1,) * f.reinterpreted) & f.mask
    elif mask is not None:
        mask = mask.reshape(mask.shape + (1,) * f.reinterpreted)
    lp = _flatten_dims(_apply(lp, site, None, scaled, f.reinterpreted), f.reinterpreted)
    if mask is not None:
        lp = lp.masked_fill(~_flatten_dims(mask.expand(target), f.reinterpreted), 0.0)
    return lp


def count(site: Mapping[str, Any], *, scaled: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """
    The site's element count: ones over its batch shape, masked (by ``mask``, default the
    site's) and, with ``scaled=True``, scaled (``N`` for a data plate, also under
    subsampling).

    :returns: batch-shaped tensor of element weights.
    :rtype: torch.Tensor
    """
    ones = torch.ones_like(site["unscaled_log_prob"])
    return _apply(ones, site, site_mask(site) if mask is None else mask, scaled)


def cross_entropy(model_site: Mapping[str, Any], guide_site: Mapping[str, Any], *, scaled: bool = True) -> torch.Tensor:
    """
    :math:`-\\log p(z)` at the guide's draw, per element (a one-sample estimate of the
    cross-entropy :math:`-\\mathbb{E}_q \\log p(z)`), masked by :func:`element_mask`.

    :rtype: torch.Tensor
    """
    return _apply(-model_site["unscaled_log_prob"], guide_site, _mask_or_none(model_site, guide_site, False), scaled)


def entropy(
    guide_site: Mapping[str, Any], model_site: Mapping[str, Any] | None = None, *, scaled: bool = True
) -> tuple[torch.Tensor, bool]:
    """
    :math:`\\mathbb{H}[q]` per element: the guide distribution's analytic ``entropy()``
    where it has one, else the one-sample :math:`-\\log q(z)`.

    :param guide_site: the guide's site.
    :param model_site: the model's site, for :func:`element_mask` (else the guide's masks).
    :returns: ``(entropy, analytic)``: batch-shaped tensor (nats) and whether it is analytic.
    :rtype: tuple
    """
    mask = _mask_or_none(guide_site if model_site is None else model_site, guide_site, False)
    fn = guide_site["fn"]
    try:
        value = fn.entropy()
        analytic = True
    except NotImplementedError:
        value = -guide_site["unscaled_log_prob"]
        analytic = False
    if not torch.is_tensor(value):
        value = torch.full_like(guide_site["unscaled_log_prob"], float(value))
    value = value.expand(fn.batch_shape)
    return _apply(value, guide_site, mask, scaled), analytic


def _dims_layout(
    model_site: Mapping[str, Any], guide_site: Mapping[str, Any]
) -> tuple[Factorised, Factorised, torch.Size] | None:
    """``(q, p, target)`` when guide and prior split into the same latent dimensions, else None."""
    q, p = factorise(guide_site["fn"]), factorise(model_site["fn"])
    if q.reinterpreted != p.reinterpreted or q.element.event_shape != p.element.event_shape:
        return None
    fn = guide_site["fn"]
    return q, p, torch.Size(tuple(fn.batch_shape) + tuple(fn.event_shape)[: q.reinterpreted])


def _flatten_dims(x: torch.Tensor, event_dims: int) -> torch.Tensor:
    return x.reshape(x.shape[: x.dim() - event_dims] + (-1,)) if event_dims else x.unsqueeze(-1)


def element_mask(
    model_site: Mapping[str, Any], guide_site: Mapping[str, Any] | None = None, *, per_dim: bool = False
) -> torch.Tensor:
    """
    Which elements of a latent site are kept: :func:`pair_mask` together with the masks
    of ``Distribution.mask`` wrappers, as a bool tensor. With ``guide_site=None``, the
    elements of the one site ``model_site`` (e.g. an observed site).

    :returns: shape ``batch_shape`` (an element is kept where any of its latent dimensions
        is), or ``batch_shape + (J,)`` with ``per_dim=True`` (the layout of :func:`kl`).
    :rtype: torch.Tensor
    """
    guide_site = model_site if guide_site is None else guide_site
    mask = _mask_or_none(model_site, guide_site, per_dim)
    if mask is not None:
        return mask
    shape = guide_site["fn"].batch_shape
    if per_dim:
        layout = _dims_layout(model_site, guide_site)
        if layout is None:
            shape = shape + (1,)
        else:
            target, r = layout[2], layout[0].reinterpreted
            shape = target[: len(target) - r] + (math.prod(target[len(target) - r :]),)
    return torch.ones((), dtype=torch.bool, device=guide_site["value"].device).expand(shape)


def _wraps_mask(fn: object) -> bool:
    while isinstance(fn, (Independent, ExpandedDistribution, MaskedDistribution)):
        if isinstance(fn, MaskedDistribution):
            return True
        fn = fn.base_dist
    return False


def _mask_or_none(model_site: Mapping[str, Any], guide_site: Mapping[str, Any], per_dim: bool) -> torch.Tensor | None:
    """:func:`element_mask`, or ``None`` when nothing is masked (the fast path of the losses)."""
    if (
        model_site.get("mask") is None
        and guide_site.get("mask") is None
        and not _wraps_mask(guide_site["fn"])
        and not _wraps_mask(model_site["fn"])
    ):
        return None
    mask = pair_mask(model_site, guide_site)
    fq, fp = factorise(guide_site["fn"]), factorise(model_site["fn"])
    batch_shape = guide_site["fn"].batch_shape
    mask = torch.ones((), dtype=torch.bool, device=guide_site["value"].device) if mask is None else mask
    layout = _dims_layout(model_site, guide_site)
    if layout is None:
        full = mask.expand(batch_shape)
        for f, fn in ((fq, guide_site["fn"]), (fp, model_site["fn"])):
            if f.mask is not None:
                m = f.mask.expand(tuple(fn.batch_shape) + tuple(fn.event_shape)[: f.reinterpreted])
                if f.reinterpreted:
                    m = m.reshape(m.shape[: m.dim() - f.reinterpreted] + (-1,)).any(-1)
                full = full & m
        return full.unsqueeze(-1) if per_dim else full
    q, p, target = layout
    event_dims = q.reinterpreted
    full = mask.reshape(mask.shape + (1,) * event_dims).expand(target)
    for wrapper_mask in (q.mask, p.mask):
        if wrapper_mask is not None:
            full = full & wrapper_mask.expand(target)
    full = _flatten_dims(full, event_dims)
    return full if per_dim else full.any(-1)


def kl(
    model_site: Mapping[str, Any],
    guide_site: Mapping[str, Any],
    *,
    scaled: bool = True,
    per_dim: bool = False,
    analytic: bool = True,
) -> tuple[torch.Tensor, bool]:
    """
    :math:`\\mathrm{KL}(q(z) \\| p(z))` at one latent site, per element, masked by
    :func:`element_mask` and scaled (guide site's scale) with ``scaled=True``.

    Analytic where :func:`torch.distributions.kl_divergence` is registered for the
    (guide, model) distributions (with ``analytic=True``), else the one-sample Monte Carlo
    :math:`\\log q(z) - \\log p(z)` at the guide's draw (unbiased; exact in expectation).

    With ``per_dim=True`` the KL is split over latent dimensions: when guide and prior
    are ``Independent`` over the same number of event dims (``.to_event(k)``), their
    element distributions give one KL per element of those dims, flattened to ``J``; a
    site of another kind is one dimension (``J = 1``).

    :param dict model_site: the model's site (replayed at the guide's value).
    :param dict guide_site: the guide's site.
    :param bool scaled: apply the site's scale (objective) or not (diagnostics).
    :param bool per_dim: split over latent dimensions.
    :param bool analytic: use the analytic KL where registered.
    :returns: ``(kl, is_analytic)``: shape ``batch_shape`` (or ``batch_shape + (J,)``),
        nats; and whether the analytic KL was used.
    :rtype: tuple
    :raises ValueError: if the guide and model values differ in shape (not a pair).
    """
    fq, fp = guide_site["fn"], model_site["fn"]
    value = None
    layout = _dims_layout(model_site, guide_site) if per_dim else None
    if layout is not None:
        q, p, target = layout
        if analytic:
            try:
                value = kl_divergence(q.element, p.element)
            except NotImplementedError:
                pass
        is_analytic = value is not None
        if value is None:
            z = guide_site["value"]
            value = q.element.log_prob(z) - p.element.log_prob(z)
        value = _flatten_dims(value.expand(target), q.reinterpreted)
        return _apply(value, guide_site, _mask_or_none(model_site, guide_site, True), scaled, 1), is_analytic
    mask = _mask_or_none(model_site, guide_site, False)
    if analytic:
        try:
            value = kl_divergence(fq, fp)
        except NotImplementedError:
            pass
    is_analytic = value is not None
    if value is None:
        value = guide_site["unscaled_log_prob"] - model_site["unscaled_log_prob"]
    else:  # a view, and no shape comparison (which TorchScript tracing would warn about)
        value = value.expand(fq.batch_shape)
    value = _apply(value, guide_site, mask, scaled)
    return (value.unsqueeze(-1) if per_dim else value), is_analytic
