# SPDX-License-Identifier: Apache-2.0
"""The installed project's requirements hold in this environment (ArviZ 0.2x in the main one, 1.x in
.ci/arviz1's): pip kept the ArviZ that was there, and the netCDF backend that 1.x leaves out is in."""

import importlib.metadata as md

import pytest

requirements = pytest.importorskip("packaging.requirements")


def _requirements() -> dict[str, "requirements.Requirement"]:
    found = {}
    for line in md.requires("pyro-elbo-lab") or []:
        req = requirements.Requirement(line)
        if req.marker is None:  # the core dependencies, not the extras
            found[req.name.lower()] = req
    return found


@pytest.mark.parametrize("name", ["arviz", "h5netcdf", "h5py"])
def test_installed_version_satisfies_the_requirement(name):
    req = _requirements()[name]
    installed = md.version(name)
    assert req.specifier.contains(installed, prereleases=True), f"{name} {installed} outside {req}"


def test_arviz_requirement_admits_both_generations():
    # the versions of the two ArviZ generations this project is tested with (.ci/run, .ci/arviz1)
    spec = _requirements()["arviz"].specifier
    assert spec.contains("0.23.4") and spec.contains("1.3.0")
    assert not spec.contains("2.0.0")


def test_netcdf_round_trip_needs_no_extra(tmp_path):
    xr = pytest.importorskip("xarray")
    ds = xr.Dataset({"x": ("draw", [1.5, -2.0, 3.25])})
    path = tmp_path / "x.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    with xr.open_dataset(path, engine="h5netcdf") as back:
        assert back["x"].values.tolist() == [1.5, -2.0, 3.25]
