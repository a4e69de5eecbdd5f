# SPDX-License-Identifier: Apache-2.0
"""The ``pyro-elbo-lab`` command: arguments, outputs, and missing optional dependencies."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyro_elbo_lab import cli, datasets

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
    ],
    ids=["unknown-demo", "zero-steps", "non-integer-steps"],
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


def test_eight_schools_demo_writes_outputs(tmp_path, capsys):
    from pyro_elbo_lab import arviz_compat

    out = tmp_path / "out"
    assert cli.main(["demo", "--quick", "--steps", "60", "--no-progress", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("Evidence, gap and Pareto k̂", "Exact log p(y) = -31.3113", "NUTS", "verdict"):
        assert text in printed
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
    files = set(os.listdir(out))
    expected = {"report.md", "vae_decomposition.png", "vae_rate_distortion.png"}
    expected |= {f"vae_{name}{suffix}" for name in ("beta1", "warmup", "cyclical", "beta4") for suffix in (".nc", "_images.png")}
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
    with pytest.raises(datasets.MissingExtraError, match=r"needs scikit-learn, which could not be imported \(No module named 'scipy'\)"):
        datasets.require("sklearn.datasets", "the digits data")


@pytest.mark.parametrize("loader", ["load_digits", "load_diabetes", "load_iris"])
def test_dataset_loaders_without_sklearn(monkeypatch, loader):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(datasets.MissingExtraError, match=r'needs scikit-learn, which is not installed.*pip install "pyro-elbo-lab\[examples\]"'):
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
