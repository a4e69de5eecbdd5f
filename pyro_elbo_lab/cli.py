# SPDX-License-Identifier: Apache-2.0
"""
The ``pyro-elbo-lab`` command (also ``python -m pyro_elbo_lab``).

``pyro-elbo-lab demo [eight_schools|vae] [--quick] [--seed N] [--steps N] [--output DIR]``
runs a demo on real data, prints its report and writes InferenceData (netCDF), PNG plots
and ``report.md`` to ``DIR`` (default ``./elbo-lab-output``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence

from .datasets import MissingExtraError, require

__all__ = ["DEMOS", "main", "positive_int"]

#: demo name -> (module under pyro_elbo_lab.demos, one-line description)
DEMOS = {
    "eight_schools": ("eight_schools", "eight schools: four guides against the exact evidence and NUTS (default)"),
    "vae": ("vae", "a β-VAE on handwritten digits: β = 1, warm-up, cyclical, β = 4"),
}
_ALIASES = {"eight-schools": "eight_schools", "8schools": "eight_schools", "digits": "vae"}
DEFAULT_OUTPUT = "elbo-lab-output"


#: the largest ``--seed``: the demos seed NumPy (below 2**32) with ``seed + 1``
MAX_SEED = 2**32 - 2


def seed_int(text: str) -> int:
    """
    The argparse ``type=`` of ``--seed``.

    :param str text: the command-line word.
    :returns: it as an integer in ``[0, MAX_SEED]``.
    :rtype: int
    :raises argparse.ArgumentTypeError: (exit status 2) if it is not one.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, {MAX_SEED}], got {text!r}")
    return value


def positive_int(text: str) -> int:
    """
    The argparse ``type=`` of ``--steps`` (here and in the demo scripts).

    :param str text: the command-line word.
    :returns: it as a positive integer.
    :rtype: int
    :raises argparse.ArgumentTypeError: (exit status 2) if it is not a positive integer.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _demo_name(text: str) -> str:
    name = _ALIASES.get(text, text)
    if name not in DEMOS:
        raise argparse.ArgumentTypeError(f"unknown demo {text!r}; choose one of: {', '.join(DEMOS)}")
    return name


def build_parser() -> argparse.ArgumentParser:
    """
    The argument parser of the ``pyro-elbo-lab`` command: ``--version`` and the ``demo``
    sub-command with ``NAME`` (one of :data:`DEMOS` or an alias), ``--quick``, ``--seed``,
    ``--steps`` (a positive integer), ``--output`` and ``--no-progress``.

    :returns: the parser; ``parse_args`` exits with status 2 on bad arguments (argparse).
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="pyro-elbo-lab",
        description="β-weighted ELBOs for Pyro that record the ELBO's decompositions, and VI diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="run a demo on real data (eight schools by default)",
        description="Run a demo on real data; prints a report and writes netCDF, PNG plots and report.md.",
        epilog="demos: " + "; ".join(f"{name}: {text}" for name, (_, text) in DEMOS.items()),
    )
    demo.add_argument(
        "name",
        nargs="?",
        default="eight_schools",
        type=_demo_name,
        metavar="NAME",
        help=f"which demo: {', '.join(DEMOS)} (default eight_schools)",
    )
    demo.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (fewer steps and samples)")
    demo.add_argument("--seed", type=seed_int, default=0, help=f"random seed in [0, {MAX_SEED}] (default 0)")
    demo.add_argument("--steps", type=positive_int, default=None, help="optimisation steps per fit")
    demo.add_argument(
        "--output", default=DEFAULT_OUTPUT, help=f"directory for netCDF, PNG and report.md (default ./{DEFAULT_OUTPUT})"
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check_output(parser: argparse.ArgumentParser, given: str, output: str) -> None:
    """
    Before any fitting: create ``--output`` and prove it writable with a real file (not
    ``os.access``, which root and read-only mounts defeat); refuse a ``report.md`` that is a
    symbolic link. Exits through ``parser.error`` (status 2).
    """
    import tempfile

    try:
        os.makedirs(output, exist_ok=True)
        with tempfile.TemporaryFile(dir=output):
            pass
    except OSError as e:
        parser.error(f"--output {given!r} is not a writable directory ({e.strerror or e}); pass a writable one")
    if os.path.islink(os.path.join(output, "report.md")):
        parser.error(
            f"--output {given!r}: report.md there is a symbolic link; remove it (outputs are never written "
            "through links) or pass another directory"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """
    Entry point of the ``pyro-elbo-lab`` console script.

    :param argv: arguments (default ``sys.argv[1:]``).
    :returns: the exit status: 0 on success, 1 when an optional dependency is missing,
        2 for bad arguments (from argparse).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    output = os.path.abspath(args.output)
    if os.path.exists(output) and not os.path.isdir(output):
        parser.error(f"--output {args.output!r} exists and is not a directory; pass a directory")
    module_name, _ = DEMOS[args.name]
    purpose = f"pyro-elbo-lab demo {args.name}"
    try:
        # fail before any fitting if an optional dependency is missing; a MissingExtraError
        # names the package and the install command. Any other ImportError is a bug and is
        # not caught.
        for needed in ("matplotlib", "sklearn") if args.name == "vae" else ("matplotlib",):
            require(needed, purpose)
        module = importlib.import_module(f"pyro_elbo_lab.demos.{module_name}")
        _check_output(parser, args.output, output)
        start = time.perf_counter()
        module.run(output, quick=args.quick, seed=args.seed, steps=args.steps, progress_bar=not args.no_progress)
    except MissingExtraError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - start:.0f} s; outputs in {output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
