# SPDX-License-Identifier: Apache-2.0
"""
Importance log weights :math:`\\log w_s = \\log p(x, z_s) - \\log q(z_s)` of a guide, for
:func:`~pyro_elbo_lab.estimate_evidence`: in vectorised batches over the sample plate of
:mod:`pyro_elbo_lab.diagnostics.traces` (jointly, or per element of a data plate), or one
trace per sample for models whose code does not broadcast under that plate; each checked
finite, naming the sites at fault.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceEnum_ELBO
from pyro.poutine.messenger import Messenger

from .local import batches, find_data_plate, sample_sites
from .traces import SAMPLE_PLATE, ImportanceTraces, log_joint_and_guide, vectorized_traces

__all__ = [
    "check_finite_log_weights",
    "draw_log_weights",
    "per_datapoint_log_weights",
    "sequential_log_weights",
]


def per_datapoint_log_weights(traces: ImportanceTraces, plate: str) -> torch.Tensor:
    """
    Unscaled (masked) ``log p(x_n, z_n) - log q(z_n)`` per sample and element: ``(S, N)``.
    ``plate`` is a vectorised plate of the model (checked by the caller).
    """
    S = traces.num_samples
    nd = traces.max_plate_nesting + 1
    out = None
    for sign, trace, role in ((1.0, traces.model_trace, "model"), (-1.0, traces.guide_trace, "guide")):
        for name, site in sample_sites(trace):
            frames = [f for f in site["cond_indep_stack"] if f.name == plate]
            if not frames:
                plates = [f.name for f in site["cond_indep_stack"] if f.vectorized and f.name != SAMPLE_PLATE]
                raise ValueError(
                    f"per_datapoint='{plate}' needs every sample site inside plate '{plate}' (latents local to "
                    f"the data), but {role} site '{name}' is outside it (its plates: {plates}). With global "
                    "latents p(x) does not factorise over the data; use per_datapoint=None."
                )
            frame = frames[0]
            if not frame.vectorized:
                raise ValueError(
                    f"per_datapoint='{plate}' needs a vectorised plate, but '{plate}' is used as a sequential "
                    f"plate (iterated) at site '{name}'; use `with pyro.plate('{plate}', N):` instead"
                )
            lp = scale_and_mask(site["unscaled_log_prob"], 1.0, site["mask"])
            if not torch.is_tensor(lp) or lp.dim() < nd:
                lp = torch.as_tensor(lp)
                lp = lp.reshape((1,) * (nd - lp.dim()) + lp.shape)
            keep = {0, nd + int(frame.dim or 0)}  # the sample plate and the data plate (vectorised: dim set)
            dims = tuple(d for d in range(nd) if d not in keep)
            if dims:
                lp = lp.sum(dims)
            lp = lp.expand(S, frame.size)
            out = sign * lp if out is None else out + sign * lp
    if out is None:  # the model has a sample site (find_data_plate found the plate at one)
        raise ValueError(f"per_datapoint='{plate}': the model and guide have no sample site")
    return out


#: Pyro's errors for a site that does not fit its plates (plate broadcasting, packing for contraction).
_SHAPE_ERRORS = ("Shape mismatch", "Error while packing tensors", "Invalid tensor shape")


class _SiteRecorder(Messenger):
    """Record the model's sample sites as they complete, and which were enumerated."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.enumerated: list[str] = []

    def _pyro_post_sample(self, msg: dict) -> None:
        self.names.append(msg["name"])
        if msg["infer"].get("_enumerate_dim") is not None:
            self.enumerated.append(msg["name"])


def _not_vectorisable(recorder: _SiteRecorder, error: Exception, max_plate_nesting: int) -> ValueError:
    """The error for a model with enumerated sites whose code does not broadcast under the sample plate."""
    sites = ", ".join(f"'{name}'" for name in dict.fromkeys(recorder.enumerated))
    last = f" after site '{recorder.names[-1]}'" if recorder.names else ""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(
        f"estimate_evidence could not vectorise the model over importance samples (a sample plate at dim "
        f"{-(max_plate_nesting + 1)}, the enumerated values left of it): site(s) {sites} are enumerated in the "
        f"model, and the model failed{last} with {type(error).__name__}: {first_line}. Model code that indexes a "
        "tensor with an enumerated value (topic_words[word_topics], as in Pyro's examples/lda.py) must broadcast "
        "over dims on the left: index with pyro.ops.indexing.Vindex and keep the indexed tensor's plate dims "
        "(e.g. Vindex(topic_words.unsqueeze(-3))[..., word_topics, :]); or pass vectorize=False (one trace per "
        "importance sample: exact, slower)"
    )


def draw_log_weights(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    num_samples: int,
    batch_size: int,
    max_plate_nesting: int,
    plate: str | None,
) -> torch.Tensor:
    """Log weights, shape ``(S,)`` (or ``(S, N)`` per datapoint), drawn in vectorised batches."""
    chunks = []
    for i, n in enumerate(batches(num_samples, batch_size)):
        # sites enumerated in the model are summed out exactly for the joint evidence
        recorder = _SiteRecorder()
        try:
            traces = vectorized_traces(
                recorder(model), guide, args, kwargs, n, max_plate_nesting, marginalise=plate is None
            )
            if plate is None:
                log_p, log_q = log_joint_and_guide(traces)
        except (RuntimeError, IndexError, ValueError) as error:
            # torch's and Pyro's shape errors, not our own ValueErrors (which name the site and the fix)
            shape_error = not isinstance(error, ValueError) or any(m in str(error) for m in _SHAPE_ERRORS)
            if plate is None and recorder.enumerated and shape_error:
                raise _not_vectorisable(recorder, error, max_plate_nesting) from error
            raise
        if plate is None:
            lw = log_p - log_q
        else:
            if i == 0:  # a plate the model does not have is the argument's fault, not a site's
                find_data_plate(traces.model_trace, plate, need_latent=False, argument="per_datapoint")
            lw = per_datapoint_log_weights(traces, plate)
        check_finite_log_weights(lw, traces, num_samples)
        chunks.append(lw)
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks, 0)


def _not_enumerated(msg: Any) -> Any:
    return {"enumerate": None}


def sequential_log_weights(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    num_samples: int,
    max_plate_nesting: int,
) -> torch.Tensor:
    """
    Log weights, shape ``(S,)``, one model/guide trace per importance sample: each is
    ``-TraceEnum_ELBO.loss`` of one particle, :math:`\\log \\sum_y p(x, y, z_s) - \\log q(z_s)`
    with the sites enumerated in the model summed out exactly (Pyro's own contraction) and the
    guide's sites drawn, never enumerated.
    """
    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting, num_particles=1)
    # a guide site configured for enumeration is drawn: its weight is a sample's, not an expectation
    drawn_guide = poutine.infer_config(guide, _not_enumerated)
    lw = torch.empty(num_samples)
    with poutine.block(), warnings.catch_warnings():
        # a model without enumerated sites is fine here: TraceEnum_ELBO then is Trace_ELBO
        warnings.filterwarnings("ignore", message="TraceEnum_ELBO found no sample sites configured for enumeration")
        for s in range(num_samples):
            lw[s] = -elbo.loss(model, drawn_guide, *args, **kwargs)
    bad = ~torch.isfinite(lw)
    if bool(bad.any()):
        raise ValueError(
            f"{int(bad.sum())} of {num_samples} importance samples have a non-finite log weight log p(x,z) - log q(z) "
            "(vectorize=False: the sites are not named; run with vectorize=True on a model that vectorises to name "
            "them). The guide proposes values where the model's density is zero or undefined (check supports and "
            "constraints), or the model produces nan."
        )
    return lw


def check_finite_log_weights(lw: torch.Tensor, traces: ImportanceTraces, num_samples: int) -> None:
    """
    :raises ValueError: if a log weight of this batch is not finite, naming the sites with
        non-finite log_probs.
    """
    finite = torch.isfinite(lw)
    if bool(finite.all()):
        return
    bad_samples = int((~finite.reshape(finite.shape[0], -1).all(-1)).sum())
    n = traces.num_samples
    which = (
        f"of {n} importance samples" if n == num_samples else f"in a batch of {n} importance samples (of {num_samples})"
    )
    culprits = []
    for role, trace in (("model", traces.model_trace), ("guide", traces.guide_trace)):
        for name, site in sample_sites(trace):
            lp = site["log_prob"]
            if torch.is_tensor(lp) and not bool(torch.isfinite(lp).all()):
                kind = "nan" if bool(torch.isnan(lp).any()) else "infinite"
                culprits.append(f"{role} site '{name}' ({kind} log_prob)")
    where = ", ".join(culprits) if culprits else "the sum of finite site log_probs (overflow)"
    raise ValueError(
        f"{bad_samples} {which} have a non-finite log weight log p(x,z) - log q(z), from {where}. "
        "The guide proposes values where the model's density is zero or undefined (check supports and "
        "constraints), or the model produces nan; importance sampling needs q(z) > 0 only where p(x, z) > 0."
    )
