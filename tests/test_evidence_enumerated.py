# SPDX-License-Identifier: Apache-2.0
"""Diagnostics on models with enumerated discrete sites (issue 13 §2): an LDA-like model written as
Pyro's examples/lda.py (indexing with the enumerated value, no Vindex). estimate_evidence refuses the
vectorised pass naming the site and the fix, and with vectorize=False matches the exact evidence by
Gauss–Legendre quadrature (exact for this polynomial integrand) and, for a point-mass guide, the hand
computed log weight; the other diagnostics refuse naming the site; a discrete guide site works through
to_inference_data and summarize."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from _models import bernoulli_guide, bernoulli_mixture_log_joint, bernoulli_mixture_model

from pyro_elbo_lab import estimate_evidence, posterior_collapse, summarize, to_inference_data

T, W = 2, 2  # topics, words in the vocabulary
DATA = torch.tensor([[0, 1], [0, 0], [1, 0]])  # (words per document, documents), as examples/lda.py


def lda(data):
    with pyro.plate("topics", T):
        topic_words = pyro.sample("topic_words", dist.Dirichlet(torch.ones(W)))
    with pyro.plate("documents", data.shape[1]):
        doc_topics = pyro.sample("doc_topics", dist.Dirichlet(torch.ones(T)))
        with pyro.plate("words", data.shape[0]):
            word_topics = pyro.sample("word_topics", dist.Categorical(doc_topics), infer={"enumerate": "parallel"})
            pyro.sample("doc_words", dist.Categorical(topic_words[word_topics]), obs=data)  # no Vindex


def prior_guide(data):
    with pyro.plate("topics", T):
        pyro.sample("topic_words", dist.Dirichlet(torch.ones(W)))
    with pyro.plate("documents", data.shape[1]):
        pyro.sample("doc_topics", dist.Dirichlet(torch.ones(T)))


TOPIC_WORDS = torch.tensor([[0.8, 0.2], [0.3, 0.7]])
DOC_TOPICS = torch.tensor([[0.6, 0.4], [0.1, 0.9]])


def point_guide(data):
    with pyro.plate("topics", T):
        pyro.sample("topic_words", dist.Delta(TOPIC_WORDS, event_dim=1))
    with pyro.plate("documents", data.shape[1]):
        pyro.sample("doc_topics", dist.Delta(DOC_TOPICS, event_dim=1))


def exact_log_evidence(data):
    """
    log p(data) = log ∫ prod_{w,d} sum_t theta_{d,t} phi_{t,x_wd} dphi dtheta with Dirichlet(1, 1) (uniform)
    priors: with two words and two topics, phi_t = (a_t, 1 - a_t) and theta_d = (b_d, 1 - b_d) on [0, 1]^4;
    the integrand has degree <= 3 in each variable, so 4-point Gauss–Legendre per dimension is exact.
    """
    nodes, weights = np.polynomial.legendre.leggauss(4)
    nodes, weights = (nodes + 1) / 2, weights / 2  # on [0, 1]
    x = data.numpy()
    total = 0.0
    for idx in itertools.product(range(4), repeat=4):
        a = nodes[list(idx[:2])]
        b = nodes[list(idx[2:])]
        phi = np.stack([a, 1 - a], -1)  # (T, W)
        theta = np.stack([b, 1 - b], -1)  # (D, T)
        like = np.prod([theta[d] @ phi[:, x[w, d]] for w in range(x.shape[0]) for d in range(x.shape[1])])
        total += np.prod(weights[list(idx)]) * like
    return math.log(total)


def test_vectorised_pass_refused_naming_the_site_and_the_fix():
    with pytest.raises(ValueError) as info:
        estimate_evidence(lda, prior_guide, DATA, num_samples=50)
    message = str(info.value)
    assert "site(s) 'word_topics' are enumerated in the model" in message
    assert "pyro.ops.indexing.Vindex" in message and "vectorize=False" in message
    assert "Error while packing tensors at site 'doc_words'" in message  # Pyro's error, for the user who wants it


def test_sequential_pass_point_guide_matches_the_hand_computed_weight():
    # a point-mass guide: every weight is log p(data, phi*, theta*) with word_topics summed out, by hand
    lp = (
        dist.Dirichlet(torch.ones(W)).log_prob(TOPIC_WORDS).sum()
        + dist.Dirichlet(torch.ones(T)).log_prob(DOC_TOPICS).sum()
    )
    for w, d in itertools.product(range(DATA.shape[0]), range(DATA.shape[1])):
        lp = lp + torch.log((DOC_TOPICS[d] * TOPIC_WORDS[:, DATA[w, d]]).sum())
    result = estimate_evidence(lda, point_guide, DATA, num_samples=30, vectorize=False)
    assert torch.allclose(result.log_weights, lp.expand(30), rtol=0, atol=1e-12)
    assert result.log_evidence == pytest.approx(float(lp), abs=1e-12) and result.pareto_k == -math.inf


def test_sequential_pass_matches_the_exact_evidence():
    exact = exact_log_evidence(DATA)
    result = estimate_evidence(lda, prior_guide, DATA, num_samples=500, vectorize=False)
    assert len(torch.unique(result.log_weights)) == 500  # one fresh guide draw per sample
    assert result.pareto_k < 0.5  # the prior as proposal: bounded likelihood weights
    assert result.log_evidence == pytest.approx(exact, abs=5 * result.log_evidence_stderr)
    assert result.elbo < exact < result.log_evidence + 5 * result.log_evidence_stderr


def test_vectorize_argument_checked():
    with pytest.raises(ValueError, match=r"vectorize must be True or False, got vectorize='no'"):
        estimate_evidence(lda, prior_guide, DATA, num_samples=30, vectorize="no")
    with pytest.raises(ValueError, match=r"per_datapoint='documents' needs vectorize=True"):
        estimate_evidence(lda, prior_guide, DATA, num_samples=30, vectorize=False, per_datapoint="documents")


@pytest.mark.parametrize(
    "run",
    [
        lambda: to_inference_data(lda, prior_guide, DATA, num_samples=30),
        lambda: posterior_collapse(lda, prior_guide, DATA, num_samples=30),
        lambda: estimate_evidence(lda, prior_guide, DATA, num_samples=30, per_datapoint="documents"),
    ],
    ids=["to_inference_data", "posterior_collapse", "per_datapoint"],
)
def test_other_diagnostics_refuse_naming_the_site(run):
    with pytest.raises(ValueError, match=r"site 'word_topics' is enumerated in the model.*sample.* in the guide"):
        run()


def test_discrete_guide_site_through_to_inference_data_and_summarize():
    # a discrete site drawn by the guide (not enumerated): z ~ Bernoulli(0.3), x ~ N(3 z, 1); guide
    # Bernoulli(0.6). Exact: p(x) = 0.7 N(x; 0, 1) + 0.3 N(x; 3, 1), p(z = 1 | x) = 0.3 N(x; 3, 1) / p(x)
    x = torch.tensor(2.0)
    joint = bernoulli_mixture_log_joint(x)
    exact_evidence = float(torch.logsumexp(joint, 0))
    posterior_one = float(torch.exp(joint[1] - torch.logsumexp(joint, 0)))
    S = 4000
    idata = to_inference_data(bernoulli_mixture_model, bernoulli_guide(), x, num_samples=S)
    z = idata.posterior["z"].values.reshape(-1)
    assert set(np.unique(z)) == {0.0, 1.0}
    assert abs(z.mean() - 0.6) < 4 * math.sqrt(0.24 / S)  # the guide's draws
    summary = summarize(idata)  # warnings are errors here
    row = summary.vi.iloc[0]
    assert row["verdict"] == "IS reliable"  # a flat tail: bounded weights
    assert row["log_evidence"] == pytest.approx(exact_evidence, abs=4 * row["log_evidence_stderr"])
    # the PSIS-corrected mean of z is the posterior probability of z = 1 (self-normalised IS)
    psis_mean = float(summary.posterior.loc["z", "psis_mean"])
    assert psis_mean == pytest.approx(posterior_one, abs=0.03)


def test_sequential_pass_draws_a_guide_site_configured_for_enumeration():
    # vectorize=False runs Pyro's TraceEnum_ELBO per sample, which would enumerate a guide site marked
    # for enumeration and return the ELBO (an expectation), not an importance weight: the site is drawn.
    # Exact: p(x) = 0.7 N(x; 0, 1) + 0.3 N(x; 3, 1); ELBO = E_q[log p(x, z) - log q(z)] by summing over z
    x = torch.tensor(2.0)
    guide = bernoulli_guide(enumerated=True)  # z ~ Bernoulli(0.6), infer={"enumerate": "parallel"}
    joint = bernoulli_mixture_log_joint(x)
    q = torch.tensor([0.4, 0.6])
    exact_evidence = float(torch.logsumexp(joint, 0))
    exact_elbo = float((q * (joint - q.log())).sum())
    result = estimate_evidence(bernoulli_mixture_model, guide, x, num_samples=400, vectorize=False)
    assert len(torch.unique(result.log_weights)) == 2  # two weights, one per value of z: drawn
    assert result.log_evidence == pytest.approx(exact_evidence, abs=4 * result.log_evidence_stderr)
    assert result.elbo == pytest.approx(exact_elbo, abs=4 * result.elbo_stderr)
