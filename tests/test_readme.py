# SPDX-License-Identifier: Apache-2.0
"""README code marked ``<!-- readme-test -->`` must run as printed."""
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"<!-- readme-test -->\s*```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_runnable_blocks():
    assert len(BLOCKS) >= 1


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code, capsys):
    namespace = {"__name__": "readme"}
    exec(compile(code, str(README), "exec"), namespace)
    terms = namespace["loss"].last_terms
    # the β-VAE snippet: objective = reconstruction - β KL with β = 4, and the identities
    assert terms.beta == 4.0
    assert terms.objective == pytest.approx(terms.reconstruction - 4.0 * terms.kl, abs=1e-8)
    assert terms.elbo == pytest.approx(terms.expected_log_joint + terms.entropy, abs=1e-8)
    assert "ELBOTerms(objective=" in capsys.readouterr().out
