# SPDX-License-Identifier: Apache-2.0
"""The ``pyro-elbo-lab`` command: arguments, outputs, and missing optional dependencies."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

from pyro_elbo_lab import cli, datasets
from pyro_elbo_lab.demos import wording

pytest.importorskip("matplotlib", reason="the demo needs matplotlib (the 'examples' extra)")


def test_module_entry_point_help():
    # the module entry point, as CI runs it (python -m pyro_elbo_lab)
    out = subprocess.run(
        [sys.executable, "-m", "pyro_elbo_lab", "demo", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for option in ("--quick", "--seed", "--steps", "--output", "eight_schools", "vae"):
        assert option in out.stdout


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 0
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "mnist"], "unknown demo 'mnist'; choose one of: eight_schools, vae"),
        (["demo", "--steps", "0"], "must be a positive integer, got '0'"),
        (["demo", "--steps", "many"], "must be a positive integer, got 'many'"),
        (["demo", "--seed", "-1"], "must be an integer in [0, 4294967294], got '-1'"),
        (["demo", "vae", "--seed", "4294967295"], "must be an integer in [0, 4294967294], got '4294967295'"),
    ],
    ids=["unknown-demo", "zero-steps", "non-integer-steps", "negative-seed", "seed-beyond-numpy"],
)
def test_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_output_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "report.txt"
    path.write_text("")
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--quick", "--output", str(path)])
    assert exc.value.code == 2  # argparse's status for bad arguments
    assert "is not a directory" in capsys.readouterr().err


def test_output_file_never_writes_through_a_link(tmp_path):
    from pyro_elbo_lab.demos.common import output_file

    target = tmp_path / "target.png"
    link = tmp_path / "plot.png"
    link.symlink_to(target)  # dangling: writing through it would create the target
    with pytest.raises(ValueError, match="is a symbolic link"):
        with output_file(str(link)) as tmp:
            raise AssertionError(f"the block ran: {tmp}")
    assert not target.exists() and link.is_symlink()
    # a plain path: written under a temporary name with the same extension, then renamed
    path = tmp_path / "data.nc"
    path.write_text("old")
    with output_file(str(path)) as tmp:
        assert tmp.endswith(".nc") and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "w") as f:
            f.write("new")
    assert path.read_text() == "new"
    umask = os.umask(0o022)
    try:
        with output_file(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("newer")
    finally:
        os.umask(umask)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)  # as a plain open() (mkstemp's file is 0600)
    # a failing writer leaves the old file and no temporary file
    with pytest.raises(RuntimeError):
        with output_file(str(path)) as tmp:
            with open(tmp, "w") as f:
                f.write("half")
            raise RuntimeError("writer failed")
    assert path.read_text() == "newer" and sorted(os.listdir(tmp_path)) == ["data.nc", "plot.png"]


def test_the_demo_does_not_write_its_figures_or_netcdf_through_links(tmp_path, capsys):
    # a black-box test found the figures and netCDF files written through planted links (only
    # report.md was checked): a link at any output is refused, its target left alone
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "target"
    (out / "eight_schools_posterior.png").symlink_to(target)
    with pytest.raises(ValueError, match="eight_schools_posterior.png' is a symbolic link"):
        cli.main(["demo", "--quick", "--steps", "10", "--no-progress", "--output", str(out)])
    assert not target.exists()


def test_eight_schools_demo_writes_outputs(tmp_path, capsys):
    from pyro_elbo_lab import arviz_compat

    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--steps", "60", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("Evidence, gap and Pareto k̂", "Exact log p(y) = -31.3113", "NUTS", "The guide's own error"):
        assert text in printed
    # 60 steps cannot pass the stationarity rule: every fit is labelled, and no conclusion is drawn
    assert printed.count("not converged (cap of 60 steps)") >= 4
    assert wording.SMOKE_RUN_NOTE in printed
    assert "limit of the" not in printed and "moments are accurate" not in printed
    files = set(os.listdir(out))
    assert {"report.md", "eight_schools_decomposition.png", "eight_schools_posterior.png"} <= files
    netcdf = sorted(f for f in files if f.endswith(".nc"))
    assert len(netcdf) == 4
    idata = arviz_compat.from_netcdf(out / netcdf[0])
    assert {"posterior", "log_likelihood", "observed_data", "optimization_history"} <= set(arviz_compat.groups(idata))
    assert idata.posterior["theta"].shape[-1] == 8
    assert idata.optimization_history.sizes["step"] == 60
    report = (out / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# pyro-elbo-lab demo: eight schools")
    assert "![" in report and "| fit |" in report


def test_vae_demo_writes_outputs(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "vae"
    assert cli.main(["demo", "vae", "--quick", "--steps", "5", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "IWAE log p(x)" in printed and "active units" in printed
    # a smoke run says so and draws no conclusion
    assert "SMOKE RUN" in printed and wording.SMOKE_RUN_NOTE in printed
    assert "Highest held-out" not in printed
    files = set(os.listdir(out))
    expected = {"report.md", "vae_decomposition.png", "vae_rate_distortion.png"}
    expected |= {
        f"vae_{name}{suffix}" for name in ("beta1", "warmup", "cyclical", "beta4") for suffix in (".nc", "_images.png")
    }
    assert expected <= files


def test_missing_matplotlib_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert cli.main(["demo", "--quick", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "pyro-elbo-lab demo eight_schools needs matplotlib, which is not installed" in err
    assert err.count(datasets.EXTRA_HINT) == 1


def test_missing_sklearn_names_the_extra(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert cli.main(["demo", "vae", "--quick", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "needs scikit-learn, which is not installed" in err
    assert err.count(datasets.EXTRA_HINT) == 1


def test_missing_extra_inside_a_demo_prints_the_hint_once(monkeypatch, tmp_path, capsys):
    # a dependency found missing only while the demo runs (datasets.require inside run):
    # its message already names the extra, and the command prints it once, with status 1
    from pyro_elbo_lab.demos import eight_schools

    def run(*args, **kwargs):
        datasets.require("pyro_elbo_lab_no_such_module", "the test data")

    monkeypatch.setattr(eight_schools, "run", run)
    assert cli.main(["demo", "--quick", "--no-progress", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "the test data needs pyro_elbo_lab_no_such_module, which is not installed" in err
    assert err.count(datasets.EXTRA_HINT) == 1


def test_import_error_inside_a_demo_is_not_reported_as_a_missing_extra(monkeypatch, tmp_path, capsys):
    # an ImportError that is not a missing optional dependency is a bug: it propagates
    from pyro_elbo_lab.demos import eight_schools

    def run(*args, **kwargs):
        raise ImportError("cannot import name 'nothing' from 'pyro_elbo_lab'")

    monkeypatch.setattr(eight_schools, "run", run)
    with pytest.raises(ImportError, match="cannot import name 'nothing'") as exc:
        cli.main(["demo", "--quick", "--no-progress", "--output", str(tmp_path)])
    assert not isinstance(exc.value, datasets.MissingExtraError)
    assert datasets.EXTRA_HINT not in capsys.readouterr().err


def test_require_broken_install_is_not_called_missing(monkeypatch):
    # installed but failing to import (here: a dependency of it missing): the message says
    # so instead of "not installed", and still names the extra
    import importlib

    def broken(name, package=None):
        raise ModuleNotFoundError("No module named 'scipy'", name="scipy")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(
        datasets.MissingExtraError, match=r"needs scikit-learn, which could not be imported \(No module named 'scipy'\)"
    ):
        datasets.require("sklearn.datasets", "the digits data")


@pytest.mark.parametrize("loader", ["load_digits", "load_diabetes", "load_iris"])
def test_dataset_loaders_without_sklearn(monkeypatch, loader):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(
        datasets.MissingExtraError,
        match=r'needs scikit-learn, which is not installed.*pip install "pyro-elbo-lab\[examples\]"',
    ):
        getattr(datasets, loader)()


def test_dataset_shapes():
    pytest.importorskip("sklearn")
    digits = datasets.load_digits()
    assert tuple(digits.data.shape) == (1797, 64)
    assert digits.data.min().item() == 0 and digits.data.max().item() == 16
    assert (digits.data == digits.data.round()).all()
    assert tuple(datasets.load_diabetes().data.shape) == (442, 10)
    assert tuple(datasets.load_iris().data.shape) == (150, 4)
    schools = datasets.eight_schools()
    assert schools.data.tolist() == [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
    assert schools.target.tolist() == [15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0]


# ----------------------------------------------------------------------------------------
# the demos' sentences, on made-up results whose truth is known
# ----------------------------------------------------------------------------------------


def _facts(**changes):
    base = dict(
        name="centred, full-rank",
        family="full-rank Gaussian (centred)",
        converged=True,
        steps=3000,
        cap=12000,
        pareto_k=0.4,
        k_threshold=0.67,
        est_mean_error=0.03,
        est_sd_ratio=0.98,
        gap=0.2,
        ref_mean_error={"mu": 0.02, "tau": -0.05},
        ref_sd_ratio={"mu": 1.01, "tau": 0.97},
    )
    base.update(changes)
    return wording.FitFacts(**base)


def test_conclusion_converged_small_error_blames_nothing():
    text = wording.fit_conclusion(_facts())
    assert "converged at step 3000" in text and "moments are accurate" in text
    assert "not converged" not in text and "limit of" not in text and "off" not in text


@pytest.mark.parametrize("k", [0.3, 1.2], ids=["k-good", "k-bad"])
def test_conclusion_unconverged_fit_is_labelled_and_draws_no_conclusion(k):
    # the case: mu 1.72 against the exact 4.40 (0.8 sd off) after 1 500 steps
    facts = _facts(
        converged=False,
        steps=1500,
        cap=1500,
        pareto_k=k,
        est_mean_error=0.8,
        ref_mean_error={"mu": (1.72 - 4.40) / 3.32},
        ref_sd_ratio={"mu": 3.39 / 3.32},
    )
    text = wording.fit_conclusion(facts)
    assert "not converged after 1500 steps" in text
    assert "no conclusion about the full-rank Gaussian (centred) guide" in text
    assert "limit of" not in text and "accurate" not in text and "PSIS-corrected" not in text
    assert wording.fit_status(False, 1500, 1500) == "not converged (cap of 1500 steps)"
    assert wording.fit_status(True, 2100, 12000) == "converged (step 2100)"


def test_conclusion_converged_but_far_off_with_bad_k_is_a_limit_of_the_family():
    # converged, k̂ > 0.7 and tau's sd a third of the exact one: the family cannot represent the funnel
    text = wording.fit_conclusion(
        _facts(pareto_k=0.95, est_mean_error=float("nan"), est_sd_ratio=float("nan"), ref_sd_ratio={"tau": 0.33})
    )
    assert "importance sampling is unreliable" in text
    assert "tau sd ×0.33" in text and "a limit of the full-rank Gaussian (centred) family" in text


def test_conclusion_reliable_k_but_inaccurate_moments_points_to_psis():
    # k̂ fine but the estimated mean error is 0.5 sd: "accurate" must not be said
    text = wording.fit_conclusion(_facts(est_mean_error=0.5, ref_mean_error={"mu": 0.48}))
    assert "moments are off" in text and "use the PSIS-corrected moments" in text
    assert "moments are accurate" not in text


def test_evidence_standard_error_marked_unreliable_from_05():
    # the numbers: -32.539 ± 0.106 read as accurate against the exact -31.311 at k̂ ~ 1
    assert wording.evidence_cell(-32.539, 0.106, 1.02) == "-32.539 (± 0.106: se unreliable, k̂ = 1.02 ≥ 0.5)"
    assert wording.evidence_cell(-31.361, 0.034, 0.39) == "-31.361 ± 0.034"
    # the usable band: the delta-method se needs finite-variance weights, k < 0.5 (as stderr_reliable)
    assert "se unreliable" in wording.evidence_cell(-31.5, 0.05, 0.62)
    assert wording.evidence_cell(-31.0, 0.1, float("nan")) == "-31.000 (± 0.100: se unreliable, k̂ not fitted)"
    # constant weights (an exact guide): k̂ = -inf, reliable, as EvidenceEstimate.stderr_reliable
    assert wording.evidence_cell(-3.2, 0.0, -math.inf) == "-3.200 ± 0.000"


def test_collapse_contradiction_is_explained():
    # the case, in numbers: dimensions active by their activity yet with KL below the cut
    kl = [0.5, 0.001, 0.002, 0.3]
    activity = [0.4, 0.02, 0.015, 0.2]
    text = wording.collapse_summary("β = 4", kl, activity, 0.01)
    assert text.startswith("β = 4: 4/4 active units, 2/4 collapsed dimensions")
    assert "Contradiction on 2 dimension(s) (z[1]: KL 0.0010 nats, activity 0.0200, z[2]" in text
    assert "KL >= activity / 2" in text and "trust neither count" in text


def test_collapse_criteria_cannot_contradict_for_gaussian_guides():
    # with N(0, 1) prior and Gaussian q(z|x), KL >= activity / 2 (computed here with torch's KL):
    # the stated criteria never flag a dimension as both active and collapsed
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    loc = torch.randn(500, 64, generator=g) * torch.logspace(-3, 0, 64)  # activities from 1e-6 to ~1
    scale = torch.exp(0.3 * torch.randn(500, 64, generator=g))
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0))
    kl_dim, activity = kl.mean(0), loc.var(0, unbiased=False)
    assert bool((kl_dim >= activity / 2).all())
    text = wording.collapse_summary("q", kl_dim.tolist(), activity.tolist(), 0.01)
    assert "Contradiction" not in text


def test_collapse_neither_active_nor_collapsed_is_explained():
    # a unit whose q ignores x (activity 0) but has sd 0.5: KL = 0.5 (0.25 - 1 - log 0.25) ~ 0.318 nats
    import math

    kl = 0.5 * (0.25 - 1 - math.log(0.25))
    text = wording.collapse_summary("warm-up", [kl], [0.0], 0.01)
    assert "0/1 active units, 0/1 collapsed dimensions; 1 neither active nor collapsed" in text
    assert "cost rate while carrying little information" in text


def test_vae_comparison_names_a_winner_only_beyond_two_paired_se():
    import numpy as np

    rng = np.random.default_rng(0)
    base = rng.normal(-200, 20, size=300)  # per-image log-likelihoods: large spread between images
    labels = {"a": "β = 1", "b": "warm-up", "c": "β = 4"}
    rate, recon = {"a": 20.0, "b": 18.0, "c": 5.0}, {"a": -180.0, "b": -182.0, "c": -200.0}
    clear = {"a": base + 1.0 + rng.normal(0, 0.5, 300), "b": base, "c": base - 5.0}
    text = wording.vae_comparison(labels, clear, {"a": True, "b": True, "c": True}, rate, recon)
    assert "Highest held-out IWAE log-likelihood: β = 1" in text and "more than 2 paired standard errors" in text
    tied = {"a": base + rng.normal(0, 0.5, 300), "b": base + rng.normal(0, 0.5, 300), "c": base - 5.0}
    text = wording.vae_comparison(labels, tied, {"a": True, "b": True, "c": True}, rate, recon)
    assert "not distinguishable" in text
    # an unconverged weighting is named and left out, even when its number is the highest
    text = wording.vae_comparison(labels, clear, {"a": False, "b": True, "c": True}, rate, recon)
    assert text.startswith("Not converged") and "β = 1." in text
    assert "Highest held-out IWAE log-likelihood: warm-up" in text
    # the paired se against numpy
    d, se = wording.paired_difference(clear["a"], clear["b"])
    diff = clear["a"] - clear["b"]
    assert d == pytest.approx(diff.mean()) and se == pytest.approx(diff.std(ddof=1) / np.sqrt(300))


def test_a_rising_objective_is_not_converged():
    # the runner's rule refuses a still-rising objective itself (two-sided slope test on the half-chain
    # means, tests/test_convergence.py); the demo reports its verdict and its reason as they are
    from types import SimpleNamespace

    from pyro_elbo_lab.demos.common import fit_converged

    record = {"slope_t": 8.07, "reason": "objective rising (slope t = 8.07)"}
    rising = SimpleNamespace(converged=[False], convergence=[record], stop_reasons=["interrupted"])
    ok, reason = fit_converged(rising)
    assert not ok and reason == "objective rising (slope t = 8.07)"
    assert wording.fit_status(ok, 2250, 6000, reason) == (
        "not converged (stopped at step 2250: objective rising (slope t = 8.07))"
    )
    flat = SimpleNamespace(
        converged=[True], convergence=[{"slope_t": 0.9, "reason": "stationary"}], stop_reasons=["converged"]
    )
    assert fit_converged(flat) == (True, "")
    capped = SimpleNamespace(
        converged=[False],
        convergence=[{"slope_t": 0.1, "reason": "objective R-hat 1.3 >= 1.1"}],
        stop_reasons=["num_steps"],
    )
    assert fit_converged(capped) == (False, "objective R-hat 1.3 >= 1.1")
    assert wording.fit_status(False, 6000, 6000, "objective R-hat 1.3 >= 1.1") == "not converged (cap of 6000 steps)"
