# SPDX-License-Identifier: Apache-2.0
"""
Small real data sets for the demo and the examples.

The eight schools data are constants (Rubin 1981). The others are scikit-learn's bundled
copies (no download): handwritten digits, diabetes and iris. scikit-learn is an optional
dependency of pyro-elbo-lab, installed with the ``examples`` extra; without it, the
loaders raise a :class:`MissingExtraError` (an :class:`ImportError`) that says so.

Every loader returns ``torch`` tensors in the current default dtype.
"""

from __future__ import annotations

import importlib
import types
from typing import NamedTuple

import torch

__all__ = [
    "EIGHT_SCHOOLS_NAMES",
    "EIGHT_SCHOOLS_SIGMA",
    "EIGHT_SCHOOLS_Y",
    "EXTRA_HINT",
    "Dataset",
    "MissingExtraError",
    "eight_schools",
    "load_diabetes",
    "load_digits",
    "load_iris",
    "require",
]

#: How to install the optional dependencies of the demo and the examples.
EXTRA_HINT = 'pip install "pyro-elbo-lab[examples]"'

#: Estimated coaching effects (points on the SAT-V scale), Rubin (1981), Table 2.
EIGHT_SCHOOLS_Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
#: Their standard errors.
EIGHT_SCHOOLS_SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)
#: School names, in the order of ArviZ's ``centered_eight`` example data.
EIGHT_SCHOOLS_NAMES = (
    "Choate",
    "Deerfield",
    "Phillips Andover",
    "Phillips Exeter",
    "Hotchkiss",
    "Lawrenceville",
    "St. Paul's",
    "Mt. Hermon",
)


class Dataset(NamedTuple):
    """
    A data set as tensors.

    :ivar torch.Tensor data: shape ``(N, D)`` (or ``(N,)``).
    :ivar torch.Tensor target: shape ``(N,)``, or None.
    :ivar tuple feature_names: names of the D columns.
    :ivar str description: where the data come from.
    """

    data: torch.Tensor
    target: torch.Tensor | None
    feature_names: tuple
    description: str


class MissingExtraError(ImportError):
    """
    An optional dependency (the ``examples`` extra) is missing or cannot be imported.

    Raised by :func:`require`; its message names the package and the install command, so
    a caller can print it as it is. A subclass of :class:`ImportError`, so code that
    catches ``ImportError`` keeps working, while the command line catches only this and
    lets any other ``ImportError`` (a bug) through.
    """


def require(module: str, purpose: str) -> types.ModuleType:
    """
    Import an optional dependency, or fail with a message that names the extra to install.

    :param str module: the module to import, e.g. ``"sklearn.datasets"``.
    :param str purpose: what it is needed for, e.g. ``"the digits data"``.
    :returns: the imported module.
    :raises MissingExtraError: (an :class:`ImportError`) if it is not installed, or its
        import fails, naming the package and ``pip install "pyro-elbo-lab[examples]"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        package = {"sklearn": "scikit-learn"}.get(top, top)
        missing = isinstance(e, ModuleNotFoundError) and (
            e.name is None or module == e.name or module.startswith(e.name + ".")
        )
        problem = "which is not installed" if missing else f"which could not be imported ({e})"
        raise MissingExtraError(
            f"{purpose} needs {package}, {problem}. "
            f"Install the optional dependencies of the demo and the examples with: {EXTRA_HINT}"
        ) from e


def eight_schools() -> Dataset:
    """
    The eight schools data (Rubin 1981): estimated coaching effects and their standard
    errors, in points on the SAT-V scale, schools in the order of
    :data:`EIGHT_SCHOOLS_NAMES`.

    :returns: a :class:`Dataset` with ``data`` the effects ``y`` (shape ``(8,)``),
        ``target`` their standard errors ``sigma`` (shape ``(8,)``), ``feature_names`` the
        school names.

    References

    [1] `Estimation in Parallel Randomized Experiments`, Donald B. Rubin (1981)
    """
    return Dataset(
        torch.tensor(EIGHT_SCHOOLS_Y),
        torch.tensor(EIGHT_SCHOOLS_SIGMA),
        EIGHT_SCHOOLS_NAMES,
        "Eight schools, SAT coaching effects and their standard errors (Rubin 1981)",
    )


def load_digits() -> Dataset:
    """
    scikit-learn's bundled handwritten digits: 1797 images of 8×8 pixels, each pixel a
    count in 0..16 (the number of set pixels in a 4×4 block of the 32×32 bitmap).

    :returns: ``data`` of shape ``(1797, 64)`` with integer-valued counts in [0, 16],
        ``target`` the digit (0..9).
    :raises MissingExtraError: without scikit-learn (install ``pyro-elbo-lab[examples]``).

    References

    [1] `Optical Recognition of Handwritten Digits` (UCI), E. Alpaydin, C. Kaynak (1998)
    """
    sk = require("sklearn.datasets", "the digits data")
    raw = sk.load_digits()
    dtype = torch.get_default_dtype()
    return Dataset(
        torch.as_tensor(raw.data, dtype=dtype),
        torch.as_tensor(raw.target),
        tuple(f"pixel_{i}_{j}" for i in range(8) for j in range(8)),
        "Handwritten digits, 8x8 pixel counts in 0..16 (UCI, via scikit-learn)",
    )


def load_diabetes() -> Dataset:
    """
    scikit-learn's bundled diabetes data: 442 patients, 10 baseline variables (age, sex,
    BMI, blood pressure, six serum measurements), each centred and scaled to unit norm by
    scikit-learn; the target is disease progression one year later.

    :returns: ``data`` of shape ``(442, 10)``, ``target`` of shape ``(442,)``.
    :raises MissingExtraError: without scikit-learn (install ``pyro-elbo-lab[examples]``).

    References

    [1] `Least Angle Regression`, Bradley Efron, Trevor Hastie, Iain Johnstone, Robert
        Tibshirani (2004)
    """
    sk = require("sklearn.datasets", "the diabetes data")
    raw = sk.load_diabetes()
    dtype = torch.get_default_dtype()
    return Dataset(
        torch.as_tensor(raw.data, dtype=dtype),
        torch.as_tensor(raw.target, dtype=dtype),
        tuple(raw.feature_names),
        "Diabetes progression (Efron et al. 2004, via scikit-learn)",
    )


def load_iris() -> Dataset:
    """
    scikit-learn's bundled iris data: 150 flowers of three species, four measurements in cm.

    :returns: ``data`` of shape ``(150, 4)`` (sepal length, sepal width, petal length,
        petal width), ``target`` the species (0..2).
    :raises MissingExtraError: without scikit-learn (install ``pyro-elbo-lab[examples]``).

    References

    [1] `The Use of Multiple Measurements in Taxonomic Problems`, Ronald A. Fisher (1936)
    """
    sk = require("sklearn.datasets", "the iris data")
    raw = sk.load_iris()
    dtype = torch.get_default_dtype()
    return Dataset(
        torch.as_tensor(raw.data, dtype=dtype),
        torch.as_tensor(raw.target),
        tuple(raw.feature_names),
        "Iris flowers, four measurements in cm (Fisher 1936, via scikit-learn)",
    )
