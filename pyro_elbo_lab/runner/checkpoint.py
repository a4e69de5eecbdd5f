# SPDX-License-Identifier: Apache-2.0
"""
Checkpoints that cannot run code: tensors go through ``torch.save`` and are read back with
``torch.load(weights_only=True)`` (no pickled objects), everything else (step, loss and
optimiser state, RNG states, stopping state, the format tag) is JSON inside the same file.
History rows go to a side file ``<path>.history.jsonl`` to which each checkpoint only
appends its new rows; the checkpoint records how many bytes of it are committed.

Writes are atomic (a temporary file next to the target, then :func:`os.replace`), remove
their temporary file on failure and never write through a symbolic link.

Imports nothing from the rest of the package but :mod:`pyro_elbo_lab.terms`.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro.distributions.constraints as constraints
import torch

if TYPE_CHECKING:
    from ..terms import ELBOTerms

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "Checkpoint",
    "CheckpointWriter",
    "encode",
    "decode",
    "read_checkpoint",
    "data_fingerprint",
    "UnknownConstraint",
]

#: Format tag and version, checked on resume.
CHECKPOINT_FORMAT = "pyro_elbo_lab.checkpoint"
CHECKPOINT_VERSION = 2

# -- plain data <-> JSON + tensors ----------------------------------------------------------


class UnknownConstraint:
    """A constraint the checkpoint could only describe; resolved from the live store on resume."""

    def __init__(self, description: str):
        self.description = description


_PARAMETRIZED = {  # constraint class name -> public factory
    "_Interval": "interval",
    "_HalfOpenInterval": "half_open_interval",
    "_GreaterThan": "greater_than",
    "_GreaterThanEq": "greater_than_eq",
    "_LessThan": "less_than",
    "_IntegerInterval": "integer_interval",
}


def _constraint_singletons() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in dir(constraints):
        value = getattr(constraints, name)
        if isinstance(value, constraints.Constraint):
            out.setdefault(name, value)
    return out


def _encode_constraint(c: constraints.Constraint, tensors: dict) -> dict:
    for name, value in _constraint_singletons().items():
        if value is c or (type(c) is type(constraints.real) and type(value) is type(c)):
            return {"__constraint__": name}
    cls = type(c).__name__
    if cls in _PARAMETRIZED:
        bounds = [getattr(c, b) for b in ("lower_bound", "upper_bound") if hasattr(c, b)]
        return {"__constraint__": _PARAMETRIZED[cls], "args": [encode(b, tensors) for b in bounds]}
    if isinstance(c, constraints.independent):
        return {
            "__constraint__": "independent",
            "args": [_encode_constraint(c.base_constraint, tensors), c.reinterpreted_batch_ndims],
        }
    return {"__constraint__": None, "repr": repr(c)}


def _decode_constraint(obj, tensors):
    name = obj["__constraint__"]
    if name is None:
        return UnknownConstraint(str(obj.get("repr")))
    if name == "independent":
        base, ndims = obj["args"]
        base = _decode_constraint(base, tensors)
        return base if isinstance(base, UnknownConstraint) else constraints.independent(base, int(ndims))
    if name in _PARAMETRIZED.values():
        return getattr(constraints, name)(*[decode(a, tensors) for a in obj["args"]])
    value = _constraint_singletons().get(name)
    if value is None:
        raise ValueError(f"unknown constraint {name!r}")
    return value


def encode(obj: Any, tensors: dict, where: str = "state") -> Any:
    """
    ``obj`` as JSON-able data; its tensors are moved into ``tensors`` (``{key: tensor}``)
    and replaced by ``{"__tensor__": key}``. Tuples, dicts with non-string keys, NumPy
    arrays and constraints are tagged so that :func:`decode` restores them.

    :raises ValueError: for a value of another type (naming where it is).
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode(v, tensors, f"{where}[{k!r}]") for k, v in obj.items()}
        return {
            "__items__": [[encode(k, tensors, where), encode(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]
        }
    if isinstance(obj, constraints.Constraint):
        return _encode_constraint(obj, tensors)
    raise ValueError(
        f"cannot write {where} to a checkpoint: a {type(obj).__name__} ({obj!r}) is not plain data "
        "(numbers, strings, lists, dicts, tensors)"
    )


def decode(obj: Any, tensors: Mapping) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(decode(v, tensors) for v in obj["__tuple__"])
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__items__" in obj:
        return {decode(k, tensors): decode(v, tensors) for k, v in obj["__items__"]}
    if "__constraint__" in obj:
        return _decode_constraint(obj, tensors)
    return {k: decode(v, tensors) for k, v in obj.items()}


def encode_terms(terms: object) -> dict | None:
    """An :class:`~pyro_elbo_lab.ELBOTerms` as JSON data (None for anything else)."""
    from ..terms import ELBOTerms

    if not isinstance(terms, ELBOTerms):
        return None
    out = {}
    for f in dataclasses.fields(terms):
        value = getattr(terms, f.name)
        if isinstance(value, Mapping):
            value = {k: dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
        out[f.name] = value
    return out


def decode_terms(data: dict | None) -> ELBOTerms | None:
    from ..terms import ELBOTerms

    if data is None:
        return None
    try:
        return ELBOTerms(**data)
    except TypeError:  # written by another version of ELBOTerms
        return None


def data_fingerprint(args: tuple, model_kwargs: dict) -> list:
    """Shapes and dtypes (types for non-tensors) of the data arguments: cheap, no values."""

    def one(x):
        if isinstance(x, torch.Tensor):
            return ["tensor", list(x.shape), str(x.dtype)]
        if isinstance(x, np.ndarray):
            return ["ndarray", list(x.shape), str(x.dtype)]
        return [type(x).__name__]

    return [one(a) for a in args] + [[k] + one(v) for k, v in sorted(model_kwargs.items())]


# -- files ------------------------------------------------------------------------------------


def _refuse_link(path: str, what: str) -> None:
    if os.path.islink(path):
        raise ValueError(
            f"the {what} {path!r} is a symbolic link; checkpoints are never written through links: "
            "remove it or choose another checkpoint path"
        )


def _disk_error(e: OSError, path: str) -> OSError:
    return OSError(
        e.errno,
        f"writing the checkpoint {path!r} failed ({e.strerror or e}); the previous checkpoint, if any, is "
        "kept and loadable",
    )


def atomic_save(obj: Any, path: str) -> None:
    """
    ``torch.save(obj)`` to ``path`` atomically: written to ``path + ".tmp"`` (created
    exclusively, never through a link), flushed to disk, then renamed over ``path``.

    :raises ValueError: if ``path`` or its temporary file is a symbolic link.
    :raises OSError: if the write fails (the temporary file is removed).
    """
    tmp = path + ".tmp"
    _refuse_link(path, "checkpoint")
    _refuse_link(tmp, "checkpoint's temporary file")
    if os.path.lexists(tmp):
        os.unlink(tmp)  # a regular file left by a crash
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except FileExistsError:
        raise ValueError(
            f"the checkpoint's temporary file {tmp!r} appeared while writing; refusing to follow it"
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise _disk_error(e, path) from e
        raise


def history_path(path: str) -> str:
    return path + ".history.jsonl"


class CheckpointWriter:
    """
    Writes checkpoints of one run to ``path``: the history side file gets only the rows
    that are new since the last checkpoint, so a checkpoint costs about the same at any step.

    :param str path: the checkpoint file (checked by :class:`~pyro_elbo_lab.runner.Checkpointing`).
    """

    def __init__(self, path: str):
        self.path = path
        self.history_path = history_path(path)
        self.history_bytes = 0  # committed bytes of the history file
        self.rows_written: list[int] = []  # per chain, rows in the committed history

    def continue_from(self, ckpt: Checkpoint) -> None:
        """Append after the history committed by ``ckpt`` (a resumed run)."""
        if os.path.abspath(ckpt.path) == os.path.abspath(self.path):
            self.history_bytes = ckpt.history_bytes
            self.rows_written = [len(rows) for rows in ckpt.rows]

    def _append(self, data: bytes) -> None:
        _refuse_link(self.history_path, "checkpoint's history file")
        try:
            fd = os.open(self.history_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                _refuse_link(self.history_path, "checkpoint's history file")
            raise _disk_error(e, self.history_path) from e
        try:
            size = os.fstat(fd).st_size
            if size < self.history_bytes:
                raise ValueError(
                    f"the checkpoint's history file {self.history_path!r} has {size} bytes, fewer than the "
                    f"{self.history_bytes} already committed: it was truncated or replaced by something else"
                )
            os.ftruncate(fd, self.history_bytes)  # drop rows of a write that never committed
            os.lseek(fd, self.history_bytes, os.SEEK_SET)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            except OSError as e:
                os.ftruncate(fd, self.history_bytes)
                raise _disk_error(e, self.history_path) from e
        finally:
            os.close(fd)

    def write(self, meta: dict, tensors: dict, chain_rows: list[list[dict]]) -> None:
        """
        Append the new history rows, then replace the checkpoint file.

        :param dict meta: JSON-able state (from :func:`encode`).
        :param dict tensors: the tensors ``meta`` refers to.
        :param list chain_rows: per chain so far, its history rows (dicts of numbers).
        """
        lines: list[str] = []
        for chain, rows in enumerate(chain_rows):
            done = self.rows_written[chain] if chain < len(self.rows_written) else 0
            lines.extend(json.dumps(row, allow_nan=True, default=_row_value) + "\n" for row in rows[done:])
        data = "".join(lines).encode()
        self._append(data)
        new_bytes = self.history_bytes + len(data)
        meta = dict(meta)
        meta["format"], meta["version"] = CHECKPOINT_FORMAT, CHECKPOINT_VERSION
        meta["history"] = {
            "file": os.path.basename(self.history_path),
            "bytes": new_bytes,
            "rows": [len(rows) for rows in chain_rows],
        }
        atomic_save(
            {"format": CHECKPOINT_FORMAT, "meta": json.dumps(meta, allow_nan=True), "tensors": tensors}, self.path
        )
        self.history_bytes = new_bytes
        self.rows_written = [len(rows) for rows in chain_rows]


def _row_value(value):
    """A history value that JSON does not know (a callback may add NumPy or tensor numbers)."""
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()
    raise ValueError(
        f"cannot write a history value of type {type(value).__name__} ({value!r}) to a checkpoint: history rows "
        "(and what callbacks add to them) must hold numbers, strings or booleans"
    )


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read back: ``meta`` (decoded plain data, tensors in place) and the
    history rows per chain."""

    path: str
    meta: dict
    rows: list[list[dict]]
    history_bytes: int


def _refuse(path: str, what: str) -> ValueError:
    return ValueError(
        f"resume_from={path!r} is not a usable checkpoint of SVIRunner: {what}. Resume from a file written by "
        "SVIRunner(..., checkpoint=Checkpointing(path, every=N))"
    )


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """
    Read a checkpoint without executing anything it contains.

    :raises ValueError: naming ``resume_from`` and the path, for a missing, empty,
        truncated, foreign or corrupt file or history.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"resume_from={path!r}: no such checkpoint file")
    if os.path.isdir(path):
        raise _refuse(path, "it is a directory")
    if os.path.getsize(path) == 0:
        raise _refuse(path, "the file is empty")
    try:
        raw = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - any failure to parse is the same answer
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _refuse(
            path,
            f"it cannot be read as one (truncated, corrupt or not written by SVIRunner: "
            f"{type(e).__name__}: {reason[:200]})",
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        raise _refuse(path, f"it has no format tag {CHECKPOINT_FORMAT!r} (a file written by something else)")
    tensors, meta = raw.get("tensors"), raw.get("meta")
    if (
        not isinstance(meta, str)
        or not isinstance(tensors, dict)
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items())
    ):
        raise _refuse(path, "its contents are malformed")
    try:
        meta = json.loads(meta)
        if meta.get("version") != CHECKPOINT_VERSION:
            raise _refuse(path, f"format version {meta.get('version')!r}, this version reads {CHECKPOINT_VERSION}")
        meta = decode(meta, tensors)
        history = meta["history"]
        # the history file is found from resume_from, not from the name it was written under, so a
        # checkpoint renamed or copied together with its history file (renamed alike) resumes
        rows = _read_history(path, history_path(path), int(history["bytes"]), [int(n) for n in history["rows"]])
        for key in (
            "step",
            "chain",
            "num_chains",
            "seed",
            "param_store",
            "optim",
            "loss",
            "rng",
            "stopping",
            "wall_time",
            "chains_done",
            "params",
            "data",
        ):
            meta[key]
    except ValueError as e:
        if str(e).startswith("resume_from="):
            raise
        raise _refuse(path, f"its contents are malformed ({e})") from None
    except (KeyError, TypeError, IndexError, AttributeError) as e:
        raise _refuse(path, f"its contents are malformed ({type(e).__name__}: {e})") from None
    return Checkpoint(path=path, meta=meta, rows=rows, history_bytes=int(history["bytes"]))


def _read_history(path: str, hpath: str, nbytes: int, counts: list[int]) -> list[list[dict]]:
    if not os.path.isfile(hpath):
        raise _refuse(
            path,
            f"its history file {hpath!r} is missing (a renamed or copied checkpoint needs its "
            "history file next to it, renamed alike: <checkpoint>.history.jsonl)",
        )
    if os.path.getsize(hpath) < nbytes:
        raise _refuse(path, f"its history file {hpath!r} is shorter than the {nbytes} bytes the checkpoint committed")
    with open(hpath, "rb") as f:
        data = f.read(nbytes)
    try:
        rows = [json.loads(line) for line in data.decode().splitlines()]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _refuse(path, f"its history file {hpath!r} is corrupt ({e})") from None
    if len(rows) != sum(counts) or not all(isinstance(r, dict) for r in rows):
        raise _refuse(path, f"its history file {hpath!r} has {len(rows)} rows, the checkpoint {sum(counts)}")
    out, i = [], 0
    for n in counts:
        out.append(rows[i : i + n])
        i += n
    return out
