# SPDX-License-Identifier: Apache-2.0
"""
Bad input to the post-fit diagnostics: a ValueError that names the argument, says what was
found and what to do (a black-box user test found torch's and Python's internal errors here).
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo_lab import guide_moments, summarize, to_inference_data

X = torch.tensor([0.3, -1.2, 2.0, 1.1])


def model_without_latents(x):
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)


def empty_guide(x):
    pass


def test_guide_moments_of_a_model_without_latent_sites():
    # before: torch.cat(): expected a non-empty list of Tensors
    with pytest.raises(ValueError, match=r"needs a model with latent sites.*estimate_evidence"):
        guide_moments(model_without_latents, empty_guide, X, num_samples=100)


@pytest.mark.parametrize(
    "idata, shown",
    [(None, "idata=None of type NoneType"), ({"a": 1}, "idata={'a': 1} of type dict"), ([1, 2], "of type list")],
    ids=["None", "dict", "list"],
)
def test_summarize_of_something_else_than_inference_data(idata, shown):
    # before: AttributeError: 'NoneType' object has no attribute 'groups'
    with pytest.raises(ValueError, match=r"idata must be an ArviZ InferenceData") as error:
        summarize(idata)
    assert shown in str(error.value) and "to_inference_data" in str(error.value)


def test_summarize_of_a_model_without_latent_sites_names_the_group():
    data = to_inference_data(model_without_latents, empty_guide, X, num_samples=100)
    with pytest.raises(ValueError, match="posterior"):
        summarize(data)
