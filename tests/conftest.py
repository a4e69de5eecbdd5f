# SPDX-License-Identifier: Apache-2.0
import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pyro
import pytest
import torch

torch.set_default_dtype(torch.float64)


@pytest.fixture(autouse=True)
def pyro_setup():
    """float64, validation on, a fresh param store and a fixed seed for every test."""
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()
