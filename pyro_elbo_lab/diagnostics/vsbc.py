# SPDX-License-Identifier: Apache-2.0
"""
Variational simulation-based calibration (VSBC; Yao et al. 2018, section 4): is a VI
procedure biased on average over data sets simulated from the prior?

For replications :math:`m = 1..M`: draw :math:`\\theta^*_m \\sim p(\\theta)` and
:math:`y_m \\sim p(y \\mid \\theta^*_m)`, fit the guide :math:`q_m` to :math:`y_m`, and record
:math:`p_{mk} = \\Pr_{q_m}(\\theta_k < \\theta^*_{mk})` for every parameter element :math:`k`.
If :math:`q` were the exact posterior, :math:`p_{\\cdot k}` would be uniform; Yao et al. show
that for any unbiased-on-average procedure its distribution is symmetric about 1/2, and test
that symmetry (the Kolmogorov–Smirnov distance between :math:`p_{\\cdot k}` and
:math:`1 - p_{\\cdot k}`, here with a sign-flip p-value: :func:`symmetry_test`). VSBC checks
the procedure (guide family + optimiser + stopping), not one fit, and is blind to errors in
spread that are symmetric.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro.poutine as poutine
import torch

from ..checks import check_int, check_model_kwargs
from .local import site_value

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["VSBCReport", "symmetry_test", "vsbc"]


@dataclass(frozen=True)
class VSBCReport:
    """
    VSBC quantiles and their symmetry test, per parameter element.

    :ivar list names: element names (``"beta[0]"`` is element 0 of site ``beta``).
    :ivar np.ndarray quantiles: :math:`p_{mk}`, shape ``(M, K)``.
    :ivar np.ndarray mean_quantile: mean over replications, shape ``(K,)`` (1/2 when
        symmetric; below 1/2: the guide tends to sit above the truth).
    :ivar np.ndarray ks_statistic: KS distance between :math:`p_{\\cdot k}` and
        :math:`1 - p_{\\cdot k}`, shape ``(K,)``.
    :ivar np.ndarray p_value: its sign-flip p-value (:func:`symmetry_test`), shape ``(K,)``.
    :ivar float level: the test level.
    :ivar int num_replications: M.
    :ivar int num_draws: guide draws per replication.
    """

    names: list[str]
    quantiles: np.ndarray
    mean_quantile: np.ndarray
    ks_statistic: np.ndarray
    p_value: np.ndarray
    level: float
    num_replications: int
    num_draws: int

    @property
    def asymmetric(self) -> np.ndarray:
        """``p_value < level`` per element, shape ``(K,)``."""
        return self.p_value < self.level

    def to_dataframe(self) -> pd.DataFrame:
        """
        :returns: one row per element (index ``name``): ``mean_quantile``,
            ``ks_statistic``, ``p_value``, ``asymmetric``.
        :rtype: pandas.DataFrame
        """
        import pandas as pd

        return pd.DataFrame(
            {
                "mean_quantile": self.mean_quantile,
                "ks_statistic": self.ks_statistic,
                "p_value": self.p_value,
                "asymmetric": self.asymmetric,
            },
            index=pd.Index(self.names, name="name"),
        )

    def verdict(self) -> str:
        """What the symmetry tests show, and what they cannot show."""
        bad = [i for i in range(len(self.names)) if self.asymmetric[i]]
        scope = (
            f" ({self.num_replications} replications, sign-flip KS test of p against 1 - p at level {self.level:g}; "
            "VSBC tests bias on average over the prior, not the spread of the guide nor any one fit)"
        )
        if not bad:
            return "No asymmetry detected in the VSBC quantiles of any parameter" + scope + "."
        parts = []
        for i in bad[:8]:
            direction = "above" if self.mean_quantile[i] < 0.5 else "below"
            parts.append(
                f"{self.names[i]} (mean quantile {self.mean_quantile[i]:.2f}, p = {self.p_value[i]:.2g}: "
                f"the guide tends to sit {direction} the true value)"
            )
        more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
        return "The VI procedure is biased on average at " + "; ".join(parts) + more + scope + "."

    def __str__(self) -> str:
        return self.verdict()


def _ks_distance(d: np.ndarray) -> np.ndarray:
    """
    KS distance between the empirical distributions of ``d`` and ``-d`` along the last axis:
    ``d`` of shape ``(..., M)`` gives ``(...)``. Ties are handled (right-continuous ECDFs
    evaluated at every pooled point).
    """
    M = d.shape[-1]
    pooled = np.concatenate([d, -d], -1)
    order = np.argsort(pooled, -1, kind="stable")
    values = np.take_along_axis(pooled, order, -1)
    gap = np.cumsum(np.where(order < M, 1, -1), -1)  # M * (F_d - F_-d) after each pooled point
    last_of_tie = np.ones(values.shape, dtype=bool)
    last_of_tie[..., :-1] = values[..., :-1] != values[..., 1:]
    return np.where(last_of_tie, np.abs(gap), 0).max(-1) / M


def symmetry_test(
    quantiles: np.ndarray, num_resamples: int = 2000, seed: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """
    Test that the distribution of each column of ``quantiles`` is symmetric about 1/2.

    Statistic (Yao et al. 2018): the Kolmogorov–Smirnov distance between the empirical
    distributions of :math:`p` and :math:`1 - p`. Its p-value comes from sign flips: under
    symmetry, :math:`p - 1/2` and :math:`-(p - 1/2)` are equally likely, so flipping the sign
    of each deviation at random gives the statistic's null distribution given the
    :math:`|p - 1/2|` (an exact randomisation test; the two-sample KS p-value is not valid
    here, as :math:`p` and :math:`1 - p` are not independent samples, and rejects about twice
    as often as its level under symmetry).

    :param np.ndarray quantiles: shape ``(M, K)``, values in [0, 1].
    :param int num_resamples: B sign flips.
    :param int seed: for the sign flips.
    :returns: ``(statistic, p_value)``, each of shape ``(K,)``; the p-value is
        :math:`(1 + \\#\\{D_b \\ge D\\}) / (1 + B)`.
    :rtype: tuple

    References

    - *Yes, but Did It Work?: Evaluating Variational Inference*, Y. Yao, A. Vehtari,
      D. Simpson, A. Gelman (2018)
    """
    d = np.asarray(quantiles, dtype=np.float64).T - 0.5  # (K, M)
    observed = _ks_distance(d)
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(num_resamples,) + d.shape)
    null = _ks_distance(signs * np.abs(d))  # (B, K)
    p_value = (1 + (null >= observed - 1e-12).sum(0)) / (1 + num_resamples)
    return observed, p_value


def _elements(name: str, x: torch.Tensor) -> list[str]:
    if x.dim() == 0:
        return [name]
    return [f"{name}[{','.join(map(str, i))}]" for i in np.ndindex(*x.shape)]


def vsbc(
    model: Callable[..., Any],
    fit: Callable[[dict[str, torch.Tensor]], Callable[[int], Mapping[str, Any]] | dict[str, Any]],
    *args: Any,
    model_kwargs: Mapping[str, Any] | None = None,
    data_sites: Sequence[str],
    num_replications: int = 100,
    num_draws: int = 1000,
    parameters: Sequence[str] | None = None,
    level: float = 0.05,
    num_resamples: int = 2000,
    parallel: bool = False,
) -> VSBCReport:
    """
    Variational simulation-based calibration of a VI procedure.

    Draws ``num_replications`` joint samples :math:`(\\theta^*, y)` from the prior predictive
    (:class:`pyro.infer.Predictive` on ``model`` with no guide; call the model so that its
    data sites are sampled, e.g. with ``obs=None``), calls ``fit(data)`` for each, and from
    the returned guide draws computes :math:`p_{mk} = \\Pr_q(\\theta_k < \\theta^*_k)` (ties
    count 1/2) and the per-element symmetry test of Yao et al. (2018).

    :param model: a Pyro model whose ``data_sites`` are sampled when called with ``*args``.
    :param callable fit: ``fit(data) -> sampler``: ``data`` is ``{site: tensor}`` for the
        ``data_sites`` of one replication; ``sampler(num_draws)`` returns the fitted guide's
        draws ``{site: tensor (num_draws, *site shape)}`` (a dict of draws is accepted too).
    :param args: the model's positional arguments for the prior predictive.
    :param dict model_kwargs: its keyword arguments.
    :param data_sites: names of the sites that are data.
    :param int num_replications: M (at least 10; Yao et al. use hundreds).
    :param int num_draws: guide draws per replication.
    :param parameters: the parameter sites to test (default: every site the sampler returns
        that the prior predictive has and that is not data).
    :param float level: the test level, in (0, 1).
    :param int num_resamples: sign flips for the p-value of :func:`symmetry_test`.
    :param bool parallel: draw the prior predictive in one vectorised pass (the model must
        support it: see :class:`pyro.infer.Predictive`).
    :rtype: VSBCReport
    :raises ValueError: on bad arguments, a data site the prior predictive did not sample, or
        draws of the wrong shape.

    References

    - *Yes, but Did It Work?: Evaluating Variational Inference*, Y. Yao, A. Vehtari,
      D. Simpson, A. Gelman (2018)
    """
    from pyro.infer import Predictive

    kwargs = check_model_kwargs(model_kwargs)
    check_int("num_replications", num_replications, 10, hint="VSBC needs many replications (Yao et al. use hundreds)")
    check_int("num_draws", num_draws, 1)
    check_int("num_resamples", num_resamples, 99)
    if not callable(fit):
        raise ValueError(f"fit must be a callable fit(data) -> sampler, got fit={fit!r}")
    if isinstance(data_sites, str) or not data_sites:
        raise ValueError(f"data_sites must be a non-empty list of site names, got data_sites={data_sites!r}")
    if not (0 < level < 1):
        raise ValueError(f"level must be in (0, 1), got level={level!r}; 0.05 is usual")
    with torch.no_grad():
        prior = Predictive(model, num_samples=num_replications, parallel=parallel)(*args, **kwargs)
        # Predictive pads global sites with singleton plate dims: back to each site's own shape
        with poutine.block():
            shapes = {
                name: site_value(site).shape
                for name, site in poutine.trace(model).get_trace(*args, **kwargs).nodes.items()
                if site["type"] == "sample"
            }
    prior = {
        name: v.reshape((num_replications,) + shapes[name])
        if name in shapes and v.shape[1:].numel() == shapes[name].numel()
        else v
        for name, v in prior.items()
    }
    for site in data_sites:
        if site not in prior:
            raise ValueError(
                f"data site '{site}' was not sampled by the prior predictive (sites: {sorted(prior)}); "
                "call the model so that its data sites are sampled (e.g. pass obs=None)"
            )
    names: list[str] = []
    rows: list[torch.Tensor] = []
    chosen: list[str] | None = None
    for m in range(num_replications):
        data = {site: prior[site][m] for site in data_sites}
        sampler = fit(data)
        draws = sampler if isinstance(sampler, dict) else sampler(num_draws)
        if chosen is None:
            candidates = [s for s in draws if s in prior and s not in data_sites]
            chosen = list(parameters) if parameters is not None else candidates
            for site in chosen:
                if site not in draws or site not in prior:
                    raise ValueError(
                        f"parameter '{site}' must be in both the guide draws ({sorted(draws)}) and the prior "
                        f"predictive ({sorted(prior)}); pass parameters= with sites in both"
                    )
            if not chosen:
                raise ValueError(
                    f"no parameter to test: the guide draws {sorted(draws)} share no latent site with the prior"
                )
        row = []
        for site in chosen:
            truth = prior[site][m]
            x = torch.as_tensor(draws[site])
            if x.shape[1:] != truth.shape:
                raise ValueError(
                    f"the draws of site '{site}' have shape {tuple(x.shape)}, expected (num_draws, "
                    f"{', '.join(map(str, truth.shape))}) as the prior's; the sampler must return one row per draw"
                )
            q = (x < truth).double().mean(0) + 0.5 * (x == truth).double().mean(0)
            row.append(q.reshape(-1))
            if m == 0:
                names += _elements(site, truth)
        rows.append(torch.cat(row))
    quantiles = torch.stack(rows).cpu().numpy()
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # follows pyro.set_rng_seed
    ks, pv = symmetry_test(quantiles, num_resamples=num_resamples, seed=seed)
    return VSBCReport(
        names=names,
        quantiles=quantiles,
        mean_quantile=quantiles.mean(0),
        ks_statistic=ks,
        p_value=pv,
        level=float(level),
        num_replications=num_replications,
        num_draws=num_draws,
    )
