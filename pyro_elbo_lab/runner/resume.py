# SPDX-License-Identifier: Apache-2.0
"""
Resuming :class:`~pyro_elbo_lab.runner.SVIRunner` from a checkpoint, and the state a
checkpoint holds: the checks that a checkpoint matches the run (:func:`check_resume`), the
chains it records as done (:func:`chains_done`), restoring a chain's parameters, optimiser,
loss, stopping rule and RNG (:func:`resume_chain`, :func:`fix_constraints`), and the function
that writes a chain's checkpoints (:func:`make_saver`). The file format itself is
:mod:`pyro_elbo_lab.runner.checkpoint`.

Imports its :mod:`pyro_elbo_lab.runner` siblings ``checkpoint``, ``params``, ``batches`` and
``loop``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import pyro
import pyro.util

from .batches import BatchSource
from .checkpoint import Checkpoint, CheckpointWriter, UnknownConstraint, decode_terms, encode, encode_terms
from .loop import ChainLoop
from .params import load_store

if TYPE_CHECKING:
    from .stopping import RhatRule

__all__ = ["type_name", "optim_type", "check_resume", "chains_done", "resume_chain", "fix_constraints", "make_saver"]


def type_name(x: object) -> str:
    """The qualified class name of ``x`` (``module.Class``), as checkpoints record the loss."""
    return f"{type(x).__module__}.{type(x).__qualname__}"


def optim_type(optim: object) -> str:
    """A description of a Pyro optimiser: its torch optimiser (and scheduler) classes."""
    torch_optim = getattr(optim, "pt_optim_constructor", None)
    scheduler = getattr(optim, "pt_scheduler_constructor", None)
    if scheduler is not None:
        torch_optim = getattr(optim, "kwargs", {}).get("optimizer", torch_optim)
    name = getattr(torch_optim, "__name__", type(optim).__name__)
    return f"{getattr(scheduler, '__name__', '')}({name})" if scheduler is not None else name


def make_saver(
    writer: CheckpointWriter,
    num_chains: int,
    done: list[dict],
    seed: int | None,
    initial: dict | None,
    initial_modules: dict | None,
    rule: RhatRule | None,
    fingerprint: list,
) -> Callable[..., None]:
    """
    The function that writes the run's checkpoints: ``save(loop, steps_done, finished=False)``.

    :param CheckpointWriter writer: where the checkpoints go.
    :param int num_chains: the run's number of chains.
    :param list done: the outcomes of the chains that have ended (read at each save).
    :param seed: the run's base seed.
    :param initial: the parameter-store state every chain starts from (None: one chain).
    :param initial_modules: the initial module parameters (None: one chain).
    :param rule: the stopping rule (None: none).
    :param list fingerprint: the data's shapes and dtypes.
    :returns: ``save``; ``finished=True`` when the chain has ended and is the last entry of ``done``.
    :rtype: callable
    """

    def save(loop: ChainLoop, steps_done: int, finished: bool = False) -> None:
        # finished: the chain has ended and is the last entry of `done`
        tensors: dict = {}
        # a plain dict: the averaged iterates below replace Pyro's StateDict
        store = cast("dict[str, Any]", pyro.get_param_store().get_state())
        stopping = rule.state_dict() if rule is not None else None
        if finished and loop.last_iterate is not None:
            # averaged iterates were loaded at the end: a continuation goes on from the last iterate
            store = loop.last_iterate
            stopping = dict(stopping, applied=False) if stopping is not None else None
        meta = {
            "step": steps_done,
            "chain": loop.chain,
            "num_chains": num_chains,
            "seed": seed,
            "params": {n: {"shape": list(t.shape), "dtype": str(t.dtype)} for n, t in store["params"].items()},
            "param_store": encode(store, tensors, "the parameter store"),
            "optim": {
                "type": optim_type(loop.optim),
                "state": encode(loop.optim.get_state(), tensors, "the optimiser state"),
            },
            "loss": {
                "type": type_name(loop.loss),
                "state": encode(loop.loss.state_dict() if loop.has_state else None, tensors, "the loss state"),
            },
            "stopping": stopping,
            "rng": encode(pyro.util.get_rng_state(), tensors, "the RNG state"),
            "wall_time": loop.wall_time(),
            "data": fingerprint,
            "chains_done": [
                {
                    "state": encode(o["state"], tensors, f"chain {i}'s parameters"),
                    "terms": encode_terms(o["terms"]),
                    "stop_reason": o["stop_reason"],
                    "convergence": o.get("convergence"),
                }
                for i, o in enumerate(done)
            ],
            "initial_state": encode(initial, tensors, "the initial parameters"),
            "initial_modules": encode(initial_modules, tensors, "the initial module parameters"),
        }
        writer.write(meta, tensors, [o["rows"] for o in done] + ([] if finished else [loop.rows]))

    return save


def check_resume(
    ckpt: Checkpoint, num_steps: int, fingerprint: list, *, num_chains: int, optim: object, loss: object
) -> None:
    """
    Check that a checkpoint can resume this run.

    :param Checkpoint ckpt: the checkpoint read.
    :param int num_steps: the run's total steps per chain.
    :param list fingerprint: this run's data shapes and dtypes (a different one warns).
    :param int num_chains: the runner's number of chains.
    :param optim: the runner's Pyro optimiser.
    :param loss: the runner's loss.
    :raises ValueError: for another number of chains, a ``num_steps`` below the checkpoint's
        step, another optimiser or another loss class.
    """
    meta, path = ckpt.meta, ckpt.path

    def refuse(what: str) -> ValueError:
        return ValueError(f"resume_from={path!r} does not match this run: {what}")

    if meta["num_chains"] != num_chains:
        raise refuse(
            f"the checkpoint has num_chains={meta['num_chains']}, this runner num_chains="
            f"{num_chains}; resume with the same number of chains"
        )
    if num_steps < meta["step"]:
        raise refuse(
            f"the checkpoint is at step {meta['step']} (chain {meta['chain']}), beyond num_steps="
            f"{num_steps}; pass num_steps >= {meta['step']}"
        )
    if meta["optim"]["type"] != optim_type(optim):
        raise refuse(
            f"the checkpoint was written with the optimiser {meta['optim']['type']}, this runner has "
            f"{optim_type(optim)}; resume with the same optimiser"
        )
    if meta["loss"]["type"] != type_name(loss):
        raise refuse(
            f"the checkpoint was written with the loss {meta['loss']['type']}, this runner has "
            f"{type_name(loss)}; resume with the same loss class"
        )
    if meta["data"] != fingerprint:
        # stacklevel 3: the caller of SVIRunner.run
        warnings.warn(
            f"resume_from={path!r}: the data arguments differ in shape or dtype from those the checkpoint was "
            f"written with ({meta['data']} then, {fingerprint} now); continuing on the new data",
            UserWarning,
            stacklevel=3,
        )


def chains_done(ckpt: Checkpoint, num_steps: int) -> list[dict]:
    """
    The outcomes of the chains a checkpoint records as done, less a last one cut short.

    A checkpoint written when its chain ended records the chain as done; one that was cut
    short (Ctrl-C, the time limit, fewer ``num_steps`` than now) continues, so it is left out.

    :param Checkpoint ckpt: the checkpoint read.
    :param int num_steps: the run's total steps per chain.
    :returns: one dict per chain (``rows``, ``state``, ``terms``, ``stop_reason``, ``convergence``).
    :rtype: list
    """
    done: list[dict] = []
    for i, entry in enumerate(ckpt.meta["chains_done"]):
        done.append(
            {
                "rows": ckpt.rows[i],
                "state": entry["state"],
                "terms": decode_terms(entry["terms"]),
                "stop_reason": entry["stop_reason"],
                "convergence": entry.get("convergence"),
            }
        )
    if len(done) > ckpt.meta["chain"] and (
        done[-1]["stop_reason"] in ("interrupted", "max_time")
        or done[-1]["stop_reason"] == "num_steps"
        and num_steps > ckpt.meta["step"]
    ):
        done.pop()
    return done


def resume_chain(loop: ChainLoop, source: BatchSource, ckpt: Checkpoint, done: list, rule: RhatRule | None) -> int:
    """
    Restore a chain from a checkpoint: parameters, optimiser and loss state, history,
    stopping rule, wall time and RNG.

    :param ChainLoop loop: the chain's loop (its rows, optimiser and loss are set).
    :param BatchSource source: the run's data (the checkpoint step's batch warms the model up).
    :param Checkpoint ckpt: the checkpoint read.
    :param list done: the outcomes of the chains done (their constraints are restored).
    :param rule: the stopping rule (None: none).
    :returns: the step to continue from.
    :rtype: int
    :raises ValueError: when the model and guide's parameters differ from the checkpoint's
        (names or shapes), or a constraint cannot be restored.
    """
    # Lazy set-up that consumes random numbers in the uninterrupted run (autoguide
    # prototypes, the loss's plate-nesting guess, pyro.module parameters) happens here,
    # before the RNG state is restored, and before the checkpoint's parameters are
    # loaded, so that those are copied into the tensors the model and guide use.
    meta, path = ckpt.meta, ckpt.path
    step = meta["step"]
    registered = loop.warm_up(*source.peek(step))
    live = pyro.get_param_store().get_state()
    saved = meta["params"]
    missing = sorted(set(registered) - set(saved))
    extra = sorted(n for n in saved if n not in live["params"])
    shapes = sorted(
        f"'{n}' {tuple(saved[n]['shape'])} then, {tuple(live['params'][n].shape)} now"
        for n in saved
        if n in live["params"] and list(live["params"][n].shape) != saved[n]["shape"]
    )
    if missing or extra or shapes:
        parts = (
            ([f"parameters not in the checkpoint: {missing}"] if missing else [])
            + ([f"checkpoint parameters this model and guide do not have: {extra}"] if extra else [])
            + ([f"other shapes: {'; '.join(shapes)}"] if shapes else [])
        )
        raise ValueError(
            f"resume_from={path!r} does not match this run's parameters: {'; '.join(parts)}; "
            "resume with the model and guide that wrote the checkpoint"
        )
    for state in [meta["param_store"], meta["initial_state"]] + [o["state"] for o in done]:
        fix_constraints(state, path)
    load_store(meta["param_store"])
    # the checkpoint's optimiser state, also for parameters the optimiser already has
    # (the same runner resumed in the same process): PyroOptim.set_state only queues
    # state for parameters it has not seen, so its per-parameter optimisers are dropped
    # and made again, from the checkpoint's state, at the next step
    for name in ("optim_objs", "grad_clip", "_state_waiting_to_be_consumed"):
        if isinstance(getattr(loop.optim, name, None), dict):
            getattr(loop.optim, name).clear()
    loop.optim.set_state(meta["optim"]["state"])
    if loop.has_state and meta["loss"]["state"] is not None:
        loop.loss.load_state_dict(meta["loss"]["state"])
    loop.rows = ckpt.rows[meta["chain"]]
    if rule is not None and meta["stopping"] is not None:
        rule.load_state_dict(meta["stopping"])
    loop.elapsed0 = meta["wall_time"]
    pyro.util.set_rng_state(meta["rng"])
    return step


def fix_constraints(state: dict | None, path: str) -> None:
    """
    Replace the constraints a checkpoint could not name by the live store's, in place.

    :param dict state: a parameter-store state read from a checkpoint (None: nothing to do).
    :param str path: the checkpoint's path, for the error message.
    :raises ValueError: for a constraint the checkpoint could not name whose parameter the
        live store does not have.
    """
    if state is None:
        return
    live = pyro.get_param_store().get_state()["constraints"]
    for name, c in list(state["constraints"].items()):
        if isinstance(c, UnknownConstraint):
            if name not in live:
                raise ValueError(
                    f"resume_from={path!r}: the constraint of parameter '{name}' "
                    f"({c.description}) cannot be restored; register it before resuming"
                )
            state["constraints"][name] = live[name]
