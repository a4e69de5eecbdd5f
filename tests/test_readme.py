# SPDX-License-Identifier: Apache-2.0
"""README code marked ``<!-- readme-test -->`` must run as printed."""

import pathlib
import re

import pyro
import pyro.poutine as poutine
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"<!-- readme-test -->\s*```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 1


def _hand_beta_objective(model, guide, args, beta, seed):
    """(objective, reconstruction, kl) by hand from poutine.trace log-probabilities at ``seed``."""
    pyro.set_rng_seed(seed)
    with poutine.block():
        guide_trace = poutine.trace(guide).get_trace(*args)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    recon = kl = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
            continue
        if site["is_observed"]:
            recon += site["log_prob_sum"].item()
        else:
            kl += (guide_trace.nodes[name]["log_prob_sum"] - site["log_prob_sum"]).item()
    return recon - beta * kl, recon, kl


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code, capsys):
    namespace = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)
    loss = namespace["loss"]
    assert loss.last_terms.beta == 4.0
    assert "ELBOTerms(objective=" in capsys.readouterr().out
    # the β-VAE snippet's loss at its fitted parameters: the β = 4 objective computed by hand
    args = (namespace["data"],)
    objective, recon, kl = _hand_beta_objective(namespace["model"], namespace["guide"], args, beta=4.0, seed=0)
    pyro.set_rng_seed(0)
    value = loss.loss(namespace["model"], namespace["guide"], *args)
    terms = loss.last_terms
    tol = 1e-9 * (1 + abs(recon) + abs(kl))
    assert value == pytest.approx(-objective, abs=tol)
    assert terms.objective == pytest.approx(objective, abs=tol)
    assert terms.reconstruction == pytest.approx(recon, abs=tol)
    assert terms.kl == pytest.approx(kl, abs=tol)
