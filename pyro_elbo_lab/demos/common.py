# SPDX-License-Identifier: Apache-2.0
"""Helpers shared by the demos and the example scripts: arguments, seeding, reports."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyro
import torch

from ..cli import MAX_SEED, positive_int, seed_int  # the one check of --steps and --seed, shared with the command line
from ..datasets import require

if TYPE_CHECKING:
    import pandas as pd

    from ..runner import SVIResult

__all__ = ["example_parser", "fit_converged", "fmt", "pyplot", "seed_everything", "Report"]


def example_parser(description: str, default_steps: int | None = None) -> argparse.ArgumentParser:
    """
    The command line every example shares: ``--quick``, ``--seed``, ``--steps``.

    :param str description: the script's one-line purpose.
    :param int default_steps: shown in ``--help``; the script picks its own when None.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (fewer steps, samples)")
    parser.add_argument("--seed", type=seed_int, default=0, help=f"random seed in [0, {MAX_SEED}] (default 0)")
    hint = f" (default {default_steps}" + ", fewer with --quick)" if default_steps else ""
    parser.add_argument("--steps", type=positive_int, default=None, help=f"optimisation steps{hint}")
    return parser


def fit_converged(result: SVIResult, chain: int = 0) -> tuple[bool, str]:
    """
    Whether ``chain`` of an :class:`~pyro_elbo_lab.SVIResult` converged, and why not: the
    runner's own verdict (:attr:`~pyro_elbo_lab.SVIResult.converged`) and the reason its
    :class:`~pyro_elbo_lab.Convergence` rule recorded. The rule refuses a rising and a
    falling objective alike (a two-sided slope test on the half-chain means), so a fit it
    calls converged is not still improving.

    :param SVIResult result: the run.
    :param int chain: the chain.
    :returns: ``(converged, reason)``; ``reason`` is ``""`` when converged.
    :rtype: tuple
    """
    if result.converged[chain]:
        return True, ""
    record = result.convergence[chain] or {}
    return False, str(record.get("reason") or "the stationarity rule was not met")


def seed_everything(seed: int) -> None:
    """float64, a fresh param store, validation on and a fixed seed (torch, numpy, random)."""
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(seed)


def fmt(value: float | None, digits: int = 4) -> str:
    """A number for a report: ``nan`` and ``None`` as ``-``, otherwise ``digits`` significant."""
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "-"
    return f"{value:.{digits}g}"


def pyplot() -> Any:
    """matplotlib.pyplot with the Agg backend unless one is set, or an error naming the extra."""
    os.environ.setdefault("MPLBACKEND", "Agg")
    return require("matplotlib.pyplot", "Plotting")


class Report:
    """
    Text printed as it is made and kept as Markdown for ``report.md``; its clock (wall and
    CPU time) starts when it is made.

    :param bool verbose: print to stdout as well.
    """

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.lines: list[str] = []
        self.started = (time.perf_counter(), time.process_time())

    def heading(self, text: str, level: int = 2) -> None:
        self._emit("", "")
        self._emit(text, "#" * level + " " + text)
        if self.verbose:
            print("=" * len(text) if level <= 2 else "-" * len(text))

    def text(self, text: str = "") -> None:
        # one Markdown paragraph per call; list items ("- ...") stay together
        self._emit(text, text if text.startswith("- ") else text + "\n")

    def table(self, frame: pd.DataFrame, float_format: str = "{:.4g}") -> None:
        """A :class:`pandas.DataFrame`, printed as text and kept as a Markdown table."""

        def cell(v: object) -> str:
            if isinstance(v, float):
                return "" if math.isnan(v) else float_format.format(v)
            return str(v)

        elementwise = getattr(frame, "map", None) or frame.applymap  # DataFrame.map is pandas >= 2.1
        formatted = elementwise(cell)
        if self.verbose:
            print(formatted.to_string())
        index_name = frame.index.name or ""
        header = [_cell(index_name)] + [_cell(c) for c in formatted.columns]
        rows = [[_cell(i)] + [_cell(v) for v in r] for i, r in zip(formatted.index, formatted.values.tolist())]
        self.lines.append("")
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("|" + "---|" * len(header))
        for row in rows:
            self.lines.append("| " + " | ".join(row) + " |")
        self.lines.append("")

    def image(self, path: str, caption: str) -> None:
        self.lines.append(f"\n![{caption}]({os.path.basename(path)})\n")

    def finish(self, output: str, paths: list[str], extra: dict[str, Any], note: str = "") -> str:
        """
        The report's end: a "Files" list of ``paths``, the wall and CPU time since the report
        was made (also stored in ``extra`` as ``wall_seconds`` and ``cpu_seconds``), and
        ``report.md`` written in ``output``.

        :param str output: the folder of the files.
        :param list paths: the files written.
        :param dict extra: where the times are stored (a study's ``extra``).
        :param str note: printed before the times, e.g. ``"trained in 12 s; "``.
        :returns: the path of ``report.md``.
        :rtype: str
        """
        self.heading("Files")
        for path in paths:
            self.text(f"- {path}")
        wall, cpu = time.perf_counter() - self.started[0], time.process_time() - self.started[1]
        extra["wall_seconds"], extra["cpu_seconds"] = wall, cpu
        self.text(
            f"({note}wall time {wall:.0f} s, CPU time {cpu:.0f} s, torch threads {torch.get_num_threads()}, "
            f"{os.cpu_count()} CPUs visible)"
        )
        path = os.path.join(output, "report.md")
        self.write(path)
        if self.verbose:
            print(f"report: {path}")
        return path

    def markdown(self) -> str:
        return "\n".join(self.lines).strip() + "\n"

    def write(self, path: str) -> None:
        """Write the Markdown atomically (temporary file, then rename); never through a symbolic link."""
        if os.path.islink(path):
            raise ValueError(f"{path!r} is a symbolic link; the report is never written through links: remove it")
        tmp = f"{path}.{os.getpid()}.tmp"
        # O_EXCL | O_NOFOLLOW: a file or link planted at the temporary name is refused, not followed
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.markdown())
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            raise

    def _emit(self, plain: str, markdown: str) -> None:
        if self.verbose:
            print(plain)
            sys.stdout.flush()
        self.lines.append(markdown)


@contextlib.contextmanager
def output_file(path: str) -> Iterator[str]:
    """
    Write a demo's output file safely: yields a new temporary path beside ``path`` (created
    with ``O_EXCL`` by :func:`tempfile.mkstemp`, with ``path``'s extension, so that
    matplotlib and xarray pick the format from it) for the block to write, and renames it
    onto ``path`` when the block succeeds (removes it when it fails). ``path`` itself is
    never opened, so a symbolic link planted there is never written through.

    :param str path: the output file.
    :raises ValueError: if ``path`` is a symbolic link.
    """
    if os.path.islink(path):
        raise ValueError(f"{path!r} is a symbolic link; the demo's outputs are never written through links: remove it")
    directory, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=os.path.splitext(name)[1], dir=directory or ".")
    os.close(fd)
    try:
        yield tmp
        # mkstemp's file is owner-only: give it the permissions a plain open() would (0666 & ~umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _cell(value: object) -> str:
    """A Markdown table cell: pipes escaped (``KL(q||p)``)."""
    return str(value).replace("|", "\\|")
