# SPDX-License-Identifier: Apache-2.0
"""
Vectorised importance sampling from a guide: one model/guide trace over a sample plate.

Shared by the evidence estimator, the collapse diagnostics and the ArviZ converter, so
that every post-fit quantity is computed from the same kind of draws, without a Python
loop over samples.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import pyro
import pyro.poutine as poutine
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape

from .. import sites

__all__ = [
    "SAMPLE_PLATE",
    "ImportanceTraces",
    "guess_max_plate_nesting",
    "vectorized_traces",
    "log_joint_and_guide",
    "probe_traces",
    "enumerated_site_error",
]

#: Name of the plate that vectorises importance samples.
SAMPLE_PLATE = "_elbo_lab_samples"


def enumerated_site_error(name: str) -> ValueError:
    """
    The error of every post-fit diagnostic for a latent site enumerated in the model
    (``infer={"enumerate": ...}``, ``config_enumerate``) that the guide does not sample.
    """
    return ValueError(
        f"site '{name}' is enumerated in the model: the post-fit diagnostics (estimate_evidence, "
        "posterior_collapse, aggregate_posterior, rate_distortion, to_inference_data, guide_moments) do not "
        "marginalise enumerated sites yet. Use a guide that samples it (e.g. pyro.sample(name, "
        "dist.Categorical(logits=...)) in the guide), or pyro.infer.infer_discrete for its posterior; "
        "BetaTraceEnumELBO's last_terms report the fit's marginal terms."
    )


class _RefuseEnumerated(Messenger):
    """Raise :func:`enumerated_site_error` at an enumerated model site the guide lacks, before the model goes on."""

    def __init__(self, guide_trace):
        super().__init__()
        self.guide_names = {n for n, site in guide_trace.nodes.items() if site["type"] == "sample"}

    def _pyro_sample(self, msg) -> None:
        # the model's own infer dict: this handler runs before poutine.replay substitutes the guide's
        enumerate = (msg.get("infer") or {}).get("enumerate")
        if enumerate in ("parallel", "sequential") and not msg["is_observed"] and msg["name"] not in self.guide_names:
            raise enumerated_site_error(msg["name"])


def _replayed_model_trace(model, guide_trace, args, kwargs):
    """The model replayed against ``guide_trace``, refusing sites enumerated in the model."""
    return poutine.trace(poutine.replay(_RefuseEnumerated(guide_trace)(model), trace=guide_trace)).get_trace(
        *args, **kwargs
    )


def guess_max_plate_nesting(model, guide, args, kwargs) -> int:
    """
    How many plate dimensions the model and guide use, found by running them once
    without recording parameters (like :meth:`pyro.infer.ELBO._guess_max_plate_nesting`).

    :returns: the number of batch dimensions to the right of the sample plate.
    :rtype: int
    """
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = _replayed_model_trace(model, guide_trace, args, kwargs)
    dims = [
        frame.dim
        for trace in (prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace))
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return -min(dims) if dims else 0


def probe_traces(model, guide, args, kwargs) -> tuple[int, int]:
    """
    Run the guide and the replayed model once (no sample plate, parameters not recorded,
    no gradients) to learn what a vectorised pass will need.

    :returns: ``(max_plate_nesting, elements_per_sample)``: the plate depth (as
        :func:`guess_max_plate_nesting`) and the number of value and log_prob entries
        one importance sample adds to the traces (for choosing batch sizes).
    :rtype: tuple
    """
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = _replayed_model_trace(model, guide_trace, args, kwargs)
    dims = [0]
    elements = 0
    for trace in (prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            dims += [-frame.dim for frame in site["cond_indep_stack"] if frame.vectorized]
            value = site["value"]
            elements += (value.numel() if torch.is_tensor(value) else 1) + site["fn"].batch_shape.numel()
    return max(dims), max(1, elements)


class ImportanceTraces(NamedTuple):
    """
    A model trace replayed against a guide trace, both vectorised over ``num_samples``
    draws in the plate :data:`SAMPLE_PLATE` at dim ``-(max_plate_nesting + 1)``, with
    ``log_prob`` computed at every sample site.
    """

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    num_samples: int
    max_plate_nesting: int


def vectorized_traces(
    model, guide, args, kwargs, num_samples: int, max_plate_nesting: int | None = None
) -> ImportanceTraces:
    """
    Draw ``num_samples`` joint samples from the guide in one vectorised pass and replay
    the model against them.

    :param model: a Pyro model.
    :param guide: a Pyro guide.
    :param tuple args: model/guide positional arguments.
    :param dict kwargs: model/guide keyword arguments.
    :param int num_samples: S >= 1.
    :param int max_plate_nesting: the model's plate depth; guessed when None.
    :rtype: ImportanceTraces
    :raises ValueError: if a latent site of the model has no guide site (for a site
        enumerated in the model: :func:`enumerated_site_error`, raised while the model
        runs, before shape errors of code written for enumeration); under validation
        (``pyro.enable_validation``), if model and guide shapes disagree at a site or a site
        does not fit its plates (Pyro's ``check_model_guide_match`` / ``check_site_shape``).
    """
    if max_plate_nesting is None:
        max_plate_nesting = guess_max_plate_nesting(model, guide, args, kwargs)
    # the plate goes inside the replay, as in Pyro's vectorised ELBO, so that it broadcasts the
    # model's distributions too (a replayed site is "done" and not broadcast from outside)
    plate = pyro.plate(SAMPLE_PLATE, num_samples, dim=-(max_plate_nesting + 1))
    with poutine.block():
        guide_trace = poutine.trace(plate(guide)).get_trace(*args, **kwargs)
        model_trace = _replayed_model_trace(plate(model), guide_trace, args, kwargs)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and name not in guide_trace.nodes:
            raise ValueError(
                f"The model's latent site '{name}' has no site in the guide, so the guide cannot propose it. "
                f"Guide sites: {[n for n, s in guide_trace.nodes.items() if s['type'] == 'sample']}"
            )
    if is_validation_enabled():
        # Pyro's own checks (as in get_importance_trace): shapes that disagree between model
        # and guide, or sites that do not fit their plates, would give silently wrong weights
        check_model_guide_match(model_trace, guide_trace, max_plate_nesting + 1)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    if is_validation_enabled():
        for trace in (model_trace, guide_trace):
            for site in trace.nodes.values():
                if site["type"] == "sample":
                    check_site_shape(site, max_plate_nesting + 1)
    return ImportanceTraces(model_trace, guide_trace, num_samples, max_plate_nesting)


def log_joint_and_guide(traces: ImportanceTraces) -> tuple[torch.Tensor, torch.Tensor]:
    """
    :returns: ``(log p(x, z_s), log q(z_s))``, each of shape ``(S,)``, in nats, with
        Pyro's data scaling (subsampled plates scaled to the full data) and masks
        (:func:`pyro_elbo_lab.sites.log_prob`, summed by
        :func:`pyro_elbo_lab.sites.sum_per_particle`).
    """
    S, mpn = traces.num_samples, traces.max_plate_nesting

    def total(trace):
        terms = [
            sites.sum_per_particle(sites.log_prob(site), S, mpn)
            for site in trace.nodes.values()
            if site["type"] == "sample"
        ]
        return sum(terms) if terms else torch.zeros(S)

    return total(traces.model_trace), total(traces.guide_trace)
