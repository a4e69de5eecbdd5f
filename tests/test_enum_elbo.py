# SPDX-License-Identifier: Apache-2.0
"""BetaTraceEnumELBO against Pyro's TraceEnum_ELBO, hand enumeration and closed forms."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.ops.indexing import Vindex

from pyro_elbo_lab.losses import BetaELBO, BetaTraceEnumELBO

DATA = torch.tensor([-1.2, -0.4, 0.3, 1.9, 2.4, 3.1])
WEIGHTS = torch.tensor([0.3, 0.7])
LOCS = torch.tensor([-1.0, 2.0])


# -- models: Pyro's enumeration patterns ---------------------------------------------------


def mixture_model(data, scale=1.0):
    w = pyro.param("w", torch.tensor([0.4, 0.6]), constraint=dist.constraints.simplex)
    with poutine.scale(scale=scale):
        loc = pyro.sample("loc", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with pyro.plate("data", len(data)):
        c = pyro.sample("c", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(Vindex(loc)[..., c], 1.0), obs=data)


def mixture_guide(data, scale=1.0):
    m = pyro.param("m", torch.tensor([-0.5, 2.0]))
    s = pyro.param("s", torch.tensor([0.5, 0.7]), constraint=dist.constraints.positive)
    with poutine.scale(scale=scale):
        pyro.sample("loc", dist.Normal(m, s).to_event(1))


def subsample_model(data):
    w = pyro.param("w", torch.tensor([0.4, 0.6]), constraint=dist.constraints.simplex)
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with pyro.plate("data", len(data), subsample_size=3) as idx:
        c = pyro.sample("c", dist.Categorical(w), infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(Vindex(loc)[..., c], 1.0), obs=data[idx])


def subsample_guide(data):
    mixture_guide(data)
    with pyro.plate("data", len(data), subsample_size=3):
        pass


def nested_model(data):
    # data: (3 groups, 2 points); a group-level offset, points enumerated inside
    w = pyro.param("w", torch.tensor([0.4, 0.6]), constraint=dist.constraints.simplex)
    with pyro.plate("groups", data.shape[0], dim=-2):
        offset = pyro.sample("offset", dist.Normal(0.0, 1.0))
        with pyro.plate("points", data.shape[1], dim=-1):
            c = pyro.sample("c", dist.Categorical(w), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(LOCS[c] + offset, 1.0), obs=data)


def nested_guide(data):
    m = pyro.param("om", torch.zeros(data.shape[0], 1))
    with pyro.plate("groups", data.shape[0], dim=-2):
        pyro.sample("offset", dist.Normal(m, 0.5))


def guide_enum_model(data):
    w = pyro.param("w", torch.tensor([0.4, 0.6]), constraint=dist.constraints.simplex)
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
    with pyro.plate("data", len(data)):
        c = pyro.sample("c", dist.Categorical(w))
        pyro.sample("obs", dist.Normal(Vindex(loc)[..., c], 1.0), obs=data)


def guide_enum_guide(data):
    mixture_guide(data)
    logits = pyro.param("logits", torch.zeros(len(data), 2))
    with pyro.plate("data", len(data)):
        pyro.sample("c", dist.Categorical(logits=logits))


CASES = {
    "model_enum": (mixture_model, mixture_guide, DATA, 1),
    "model_enum_subsample": (subsample_model, subsample_guide, DATA, 1),
    "model_enum_nested_plates": (nested_model, nested_guide, DATA.reshape(3, 2), 2),
    "guide_enum_parallel": (guide_enum_model, config_enumerate(guide_enum_guide, "parallel"), DATA, 1),
    "guide_enum_sequential": (guide_enum_model, config_enumerate(guide_enum_guide, "sequential"), DATA, 1),
}


def _params():
    return {name: pyro.param(name).unconstrained() for name in sorted(pyro.get_param_store().keys())}


def _loss_and_grads(elbo, model, guide, data):
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    elbo.loss_and_grads(model, guide, data)  # creates the parameters
    for p in _params().values():
        p.grad = None
    pyro.set_rng_seed(3)
    loss = elbo.loss_and_grads(model, guide, data)
    grads = {name: p.grad.clone() for name, p in _params().items()}
    pyro.set_rng_seed(3)
    value = elbo.loss(model, guide, data)
    pyro.set_rng_seed(3)
    diff = elbo.differentiable_loss(model, guide, data)
    diff_grads = torch.autograd.grad(diff, list(_params().values()), allow_unused=True)
    return loss, value, diff.item(), grads, dict(zip(_params(), diff_grads))


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential_particles", "vectorized_particles"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_beta_one_matches_trace_enum_elbo(case, vectorize):
    model, guide, data, nesting = CASES[case]
    if vectorize and case == "guide_enum_sequential":
        pytest.skip("Pyro cannot vectorise particles over sequentially enumerated sites")
    kwargs = dict(num_particles=3, vectorize_particles=vectorize, max_plate_nesting=nesting + vectorize)
    expected = _loss_and_grads(TraceEnum_ELBO(**kwargs), model, guide, data)
    actual = _loss_and_grads(BetaTraceEnumELBO(1.0, **kwargs), model, guide, data)
    for e, a in zip(expected[:3], actual[:3]):
        assert a == pytest.approx(e, rel=1e-10, abs=1e-10)
    for e, a in zip(expected[3:], actual[3:]):
        assert e.keys() == a.keys()
        for name in e:
            if e[name] is None:
                assert a[name] is None
            else:
                torch.testing.assert_close(a[name], e[name], rtol=1e-9, atol=1e-10)


# -- the pattern of Pyro's examples/lda.py (word_topics enumerated inside nested plates) -------

NUM_TOPICS, NUM_WORDS, NUM_DOCS, WORDS_PER_DOC = 3, 12, 10, 6
LDA_DATA = torch.randint(0, NUM_WORDS, (WORDS_PER_DOC, NUM_DOCS), generator=torch.Generator().manual_seed(0))


def lda_model(data, batch_size=None):
    with pyro.plate("topics", NUM_TOPICS):
        topic_weights = pyro.sample("topic_weights", dist.Gamma(1.0 / NUM_TOPICS, 1.0))
        topic_words = pyro.sample("topic_words", dist.Dirichlet(torch.ones(NUM_WORDS) / NUM_WORDS))
    with pyro.plate("documents", NUM_DOCS) as ind:
        data = data[:, ind]
        doc_topics = pyro.sample("doc_topics", dist.Dirichlet(topic_weights))
        with pyro.plate("words", WORDS_PER_DOC):
            word_topics = pyro.sample("word_topics", dist.Categorical(doc_topics), infer={"enumerate": "parallel"})
            pyro.sample("doc_words", dist.Categorical(topic_words[word_topics]), obs=data)


def lda_guide(data, batch_size=None):
    weights = pyro.param("topic_weights_q", torch.ones(NUM_TOPICS), constraint=dist.constraints.positive)
    words = pyro.param(
        "topic_words_q", torch.ones(NUM_TOPICS, NUM_WORDS), constraint=dist.constraints.greater_than(0.5)
    )
    doc = pyro.param("doc_topics_q", torch.ones(NUM_DOCS, NUM_TOPICS) / NUM_TOPICS, constraint=dist.constraints.simplex)
    with pyro.plate("topics", NUM_TOPICS):
        pyro.sample("topic_weights", dist.Gamma(weights, 1.0))
        pyro.sample("topic_words", dist.Dirichlet(words))
    with pyro.plate("documents", NUM_DOCS, batch_size) as ind:
        pyro.sample("doc_topics", dist.Delta(doc[ind], event_dim=1))


@pytest.mark.parametrize("batch_size", [None, 4], ids=["full", "subsampled"])
def test_lda_pattern_matches_trace_enum_elbo(batch_size):
    model = lambda d: lda_model(d, batch_size)  # noqa: E731
    guide = lambda d: lda_guide(d, batch_size)  # noqa: E731
    expected = _loss_and_grads(TraceEnum_ELBO(max_plate_nesting=2), model, guide, LDA_DATA)
    actual = _loss_and_grads(BetaTraceEnumELBO(max_plate_nesting=2), model, guide, LDA_DATA)
    for e, a in zip(expected[:3], actual[:3]):
        assert a == pytest.approx(e, rel=1e-10)
    for name in expected[3]:
        torch.testing.assert_close(actual[3][name], expected[3][name], rtol=1e-9, atol=1e-10)


def test_lda_pattern_beta_on_doc_topics_equals_site_scale():
    beta = 0.2

    def scaled(fn):
        def wrapped(d):
            with _scale_site("doc_topics", beta):
                fn(d)

        return wrapped

    expected = _loss_and_grads(TraceEnum_ELBO(max_plate_nesting=2), scaled(lda_model), scaled(lda_guide), LDA_DATA)
    elbo = BetaTraceEnumELBO(beta, sites=["doc_topics"], max_plate_nesting=2)
    actual = _loss_and_grads(elbo, lda_model, lda_guide, LDA_DATA)
    for e, a in zip(expected[:3], actual[:3]):
        assert a == pytest.approx(e, rel=1e-10)
    for name in expected[3]:
        torch.testing.assert_close(actual[3][name], expected[3][name], rtol=1e-9, atol=1e-10)
    assert set(elbo.last_terms.per_site) == {"doc_words", "topic_weights", "topic_words", "doc_topics"}


class _scale_site(pyro.poutine.messenger.Messenger):
    """Test helper: multiply one named site's scale (Pyro's own scale semantics, applied by name)."""

    def __init__(self, name, factor):
        super().__init__()
        self.name, self.factor = name, factor

    def _pyro_sample(self, msg):
        if msg["name"] == self.name:
            msg["scale"] = self.factor * msg["scale"]


# -- closed forms: a two-component Gaussian mixture with known parameters ------------------


def _log_joint():
    """log p(x_n, c_n = k) of the known mixture, shape (N, 2)."""
    return WEIGHTS.log() + dist.Normal(LOCS, 1.0).log_prob(DATA.unsqueeze(-1))


def known_model(data):
    with pyro.plate("data", len(data)):
        c = pyro.sample("c", dist.Categorical(WEIGHTS))
        pyro.sample("obs", dist.Normal(LOCS[c], 1.0), obs=data)


def exact_posterior_guide(data):
    posterior = _log_joint().softmax(-1)
    with pyro.plate("data", len(data)):
        pyro.sample("c", dist.Categorical(posterior), infer={"enumerate": "parallel"})


def test_model_enumeration_loss_is_exact_negative_log_likelihood():
    nll = -torch.logsumexp(_log_joint(), -1).sum().item()
    elbo = BetaTraceEnumELBO(beta=3.0, max_plate_nesting=1)
    loss = elbo.loss(config_enumerate(known_model), lambda data: None, DATA)
    assert loss == pytest.approx(nll, rel=1e-12)
    terms = elbo.last_terms
    assert terms.per_site["obs"]["reconstruction"] == pytest.approx(-nll, rel=1e-12)
    assert "c" not in terms.per_site  # summed out, no KL


@pytest.mark.parametrize("beta", [1.0, 0.3, 2.5])
def test_exact_posterior_guide_enumerated(beta):
    log_joint = _log_joint()
    q = log_joint.softmax(-1)
    log_lik = dist.Normal(LOCS, 1.0).log_prob(DATA.unsqueeze(-1))
    recon = (q * log_lik).sum().item()
    kl = (q * (q.log() - WEIGHTS.log())).sum().item()
    entropy = -(q * q.log()).sum().item()
    elbo = BetaTraceEnumELBO(beta=beta, max_plate_nesting=1)
    loss = elbo.loss(known_model, exact_posterior_guide, DATA)
    assert loss == pytest.approx(-(recon - beta * kl), rel=1e-12)
    if beta == 1.0:  # the exact posterior: the ELBO is log p(x)
        assert loss == pytest.approx(-torch.logsumexp(log_joint, -1).sum().item(), rel=1e-12)
    terms = elbo.last_terms
    assert terms.per_site["obs"]["reconstruction"] == pytest.approx(recon, rel=1e-12)
    assert terms.per_site["c"]["kl"] == pytest.approx(kl, rel=1e-12)
    assert terms.per_site["c"]["entropy"] == pytest.approx(entropy, rel=1e-12)


def test_beta_weighted_gradient_equals_hand_enumeration():
    beta = 0.4
    logits0 = torch.tensor([[0.3, -0.2], [1.0, 0.1], [-0.5, 0.5], [0.2, 0.0], [0.0, 1.5], [-1.0, 2.0]])

    def guide(data):
        logits = pyro.param("logits", logits0.clone())
        with pyro.plate("data", len(data)):
            pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})

    elbo = BetaTraceEnumELBO(beta=beta, max_plate_nesting=1)
    loss = elbo.differentiable_loss(known_model, guide, DATA)
    (grad,) = torch.autograd.grad(loss, [pyro.param("logits").unconstrained()])

    logits = logits0.clone().requires_grad_()
    q = logits.softmax(-1)
    log_lik = dist.Normal(LOCS, 1.0).log_prob(DATA.unsqueeze(-1))
    hand = -(q * (log_lik + beta * (WEIGHTS.log() - q.log()))).sum()
    (hand_grad,) = torch.autograd.grad(hand, [logits])
    assert loss.item() == pytest.approx(hand.item(), rel=1e-12)
    torch.testing.assert_close(grad, hand_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vectorize", [False, True], ids=["sequential_particles", "vectorized_particles"])
def test_beta_equals_pyro_with_site_scale(vectorize):
    """β on 'loc' equals TraceEnum_ELBO with poutine.scale(β) on 'loc' in model and guide (the DMM pattern)."""
    beta = 0.25
    kwargs = dict(num_particles=4, vectorize_particles=vectorize, max_plate_nesting=1 + vectorize)
    expected = _loss_and_grads(
        TraceEnum_ELBO(**kwargs),
        lambda d: mixture_model(d, scale=beta),
        lambda d: mixture_guide(d, scale=beta),
        DATA,
    )
    actual = _loss_and_grads(BetaTraceEnumELBO(beta, sites=["loc"], **kwargs), mixture_model, mixture_guide, DATA)
    for e, a in zip(expected[:3], actual[:3]):
        assert a == pytest.approx(e, rel=1e-10)
    for name in expected[3]:
        torch.testing.assert_close(actual[3][name], expected[3][name], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(actual[4][name], expected[4][name], rtol=1e-9, atol=1e-10)


def test_decomposition_of_model_enumerated_mixture_by_hand():
    elbo = BetaTraceEnumELBO(beta=2.0, max_plate_nesting=1)
    pyro.set_rng_seed(11)
    loss = elbo.loss(mixture_model, mixture_guide, DATA)
    pyro.set_rng_seed(11)
    guide_trace = poutine.trace(mixture_guide).get_trace(DATA)
    loc = guide_trace.nodes["loc"]["value"]
    log_q = guide_trace.nodes["loc"]["fn"].log_prob(loc).item()
    log_p = dist.Normal(0.0, 3.0).expand([2]).to_event(1).log_prob(loc).item()
    w = pyro.param("w").detach()
    recon = torch.logsumexp(w.log() + dist.Normal(loc, 1.0).log_prob(DATA.unsqueeze(-1)), -1).sum().item()
    terms = elbo.last_terms
    assert terms.per_site["obs"]["reconstruction"] == pytest.approx(recon, rel=1e-12)
    assert terms.per_site["loc"]["kl"] == pytest.approx(log_q - log_p, rel=1e-12)
    assert terms.per_site["loc"]["entropy"] == pytest.approx(-log_q, rel=1e-12)
    assert loss == pytest.approx(-(recon - 2.0 * (log_q - log_p)), rel=1e-12)
    assert terms.elbo == pytest.approx(recon - (log_q - log_p), rel=1e-12)


# -- state and errors ------------------------------------------------------------------------


def test_step_counting_and_schedule():
    elbo = BetaTraceEnumELBO(beta=lambda step: 1.0 + step, max_plate_nesting=1)
    elbo.loss(mixture_model, mixture_guide, DATA)
    assert elbo.step == 0 and elbo.last_terms.beta == 1.0
    elbo.loss_and_grads(mixture_model, mixture_guide, DATA)
    elbo.differentiable_loss(mixture_model, mixture_guide, DATA)
    assert elbo.step == 2 and elbo.current_beta() == 3.0
    state = elbo.state_dict()
    fresh = BetaTraceEnumELBO(beta=lambda step: 1.0 + step, max_plate_nesting=1)
    fresh.load_state_dict(state)
    assert fresh.current_beta() == 3.0


def test_error_naming_a_model_enumerated_site():
    elbo = BetaTraceEnumELBO(0.5, sites=["c"], max_plate_nesting=1)
    with pytest.raises(ValueError, match="'c', a site enumerated in the model"):
        elbo.loss(mixture_model, mixture_guide, DATA)


def test_error_unknown_site():
    elbo = BetaTraceEnumELBO(0.5, sites=["lok"], max_plate_nesting=1)
    with pytest.raises(ValueError, match="'lok', which is not a site of the guide"):
        elbo.loss(mixture_model, mixture_guide, DATA)


def test_error_site_whose_prior_depends_on_enumerated_site():
    def model(data):
        with pyro.plate("data", len(data)):
            c = pyro.sample("c", dist.Categorical(WEIGHTS), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(LOCS[c], 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data)

    def guide(data):
        with pyro.plate("data", len(data)):
            pyro.sample("z", dist.Normal(data, 1.0))

    with pytest.raises(NotImplementedError, match="'z', whose model log_prob depends on the model-enumerated"):
        BetaTraceEnumELBO(0.5, sites=["z"], max_plate_nesting=1).loss(model, guide, DATA)
    # β = 1: no weighting needed, and the value is TraceEnum_ELBO's
    pyro.set_rng_seed(0)
    expected = TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, DATA)
    pyro.set_rng_seed(0)
    assert BetaTraceEnumELBO(max_plate_nesting=1).loss(model, guide, DATA) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("option", ["free_bits", "capacity"])
def test_free_bits_and_capacity_refused(option):
    with pytest.raises(NotImplementedError, match="free bits and capacity"):
        BetaTraceEnumELBO(**{option: 1.0})


def test_negative_beta_refused():
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        BetaTraceEnumELBO(-1.0)


def test_beta_elbo_names_enumerated_site_and_class():
    with pytest.raises(ValueError, match="site 'c' is enumerated in the model; use BetaTraceEnumELBO"):
        BetaELBO().loss(mixture_model, mixture_guide, DATA)


@pytest.mark.parametrize("validation", [True, False], ids=["validation", "no-validation"])
@pytest.mark.parametrize(
    "particles",
    [dict(), dict(num_particles=2, vectorize_particles=True, max_plate_nesting=1)],
    ids=["1", "2-vectorized"],
)
@pytest.mark.parametrize("Loss", ["BetaELBO", "BetaMeanFieldELBO", "BetaTraceGraphELBO", "IWAE"])
def test_losses_that_cannot_sum_out_name_the_class_that_can(Loss, particles, validation):
    """
    A site enumerated in the model (config_enumerate) that the guide does not sample: every
    loss that cannot sum it out raises on every entry point, naming the site and
    BetaTraceEnumELBO (the Monte Carlo losses also without validation).
    """
    import pyro_elbo_lab

    @config_enumerate
    def model(data):  # the mixture with no infer annotation of its own
        w = pyro.param("w", torch.tensor([0.4, 0.6]), constraint=dist.constraints.simplex)
        loc = pyro.sample("loc", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
        with pyro.plate("data", len(data)):
            c = pyro.sample("c", dist.Categorical(w))
            pyro.sample("obs", dist.Normal(Vindex(loc)[..., c], 1.0), obs=data)

    if not validation and Loss in ("BetaTraceGraphELBO", "IWAE"):
        pytest.skip("checked under validation only (Pyro's own model/guide check runs only then)")
    loss_fn = getattr(pyro_elbo_lab, Loss)(**particles)
    pyro.enable_validation(validation)
    try:
        for call in (loss_fn.loss, loss_fn.loss_and_grads, loss_fn.differentiable_loss):
            with pytest.raises(ValueError, match="site 'c' is enumerated in the model; use BetaTraceEnumELBO"):
                call(model, mixture_guide, DATA)
    finally:
        pyro.enable_validation(True)


def test_gmm_log_likelihood_sanity():
    # the hand-written log joint itself, against scalar arithmetic for one point
    x, lj = DATA[0].item(), _log_joint()[0]
    for k in range(2):
        direct = math.log(WEIGHTS[k]) - 0.5 * math.log(2 * math.pi) - 0.5 * (x - LOCS[k].item()) ** 2
        assert lj[k].item() == pytest.approx(direct, rel=1e-12)


# -- examples/gmm_enumeration.py ---------------------------------------------------------------


def test_gmm_enumeration_example_quick():
    import importlib.util
    import pathlib

    pytest.importorskip("sklearn", reason="the example needs scikit-learn (the 'examples' extra)")
    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "gmm_enumeration.py"
    spec = importlib.util.spec_from_file_location("gmm_enumeration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(quick=True, verbose=False)
    # setosa is linearly separable from the other species: one component holds exactly the 50 setosa
    crosstab = out["crosstab"]
    setosa_component = crosstab.loc["setosa"].idxmax()
    assert crosstab.loc["setosa", setosa_component] == 50
    assert crosstab[setosa_component].sum() == 50
    # the ELBO (c summed out exactly) is below the importance-sampled evidence, up to Monte Carlo error
    terms, (log_evidence, stderr) = out["terms"], out["evidence"]
    assert terms.elbo <= log_evidence + 3 * (stderr + terms.stderr["elbo"])


def test_zero_probability_guide_category_matches_trace_enum_elbo():
    """A guide-enumerated category of probability 0 (torch clamps its log q to log(eps)): TraceEnum_ELBO's numbers."""
    locs3 = torch.tensor([-1.0, 2.0, 5.0])

    def model(data):
        w = pyro.param("w3", torch.tensor([0.3, 0.5, 0.2]), constraint=dist.constraints.simplex)
        with pyro.plate("data", len(data)):
            c = pyro.sample("c", dist.Categorical(w))
            pyro.sample("obs", dist.Normal(locs3[c], 1.0), obs=data)

    def guide(data):
        logits = pyro.param("glogits", torch.tensor([0.2, -0.1]).expand(len(data), 2).clone())
        probs = torch.cat([logits.softmax(-1), torch.zeros(len(data), 1)], -1)
        with pyro.plate("data", len(data)):
            pyro.sample("c", dist.Categorical(probs), infer={"enumerate": "parallel"})

    expected = _loss_and_grads(TraceEnum_ELBO(max_plate_nesting=1), model, guide, DATA)
    elbo = BetaTraceEnumELBO(max_plate_nesting=1)
    actual = _loss_and_grads(elbo, model, guide, DATA)
    for e, a in zip(expected[:3], actual[:3]):
        assert math.isfinite(e) and a == pytest.approx(e, rel=1e-10)
    for name in expected[3]:
        torch.testing.assert_close(actual[3][name], expected[3][name], rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(actual[4][name], expected[4][name], rtol=1e-9, atol=1e-10)
    assert math.isfinite(elbo.last_terms.per_site["c"]["entropy"])


# -- post-fit diagnostics on models with enumerated sites (issue 13 §2): refused, naming the site --


def _diagnostics():
    import pyro_elbo_lab

    names = ["to_inference_data", "posterior_collapse", "aggregate_posterior", "rate_distortion", "guide_moments"]
    return [pytest.param(getattr(pyro_elbo_lab, n), id=n) for n in names]


@pytest.mark.parametrize("diagnostic", _diagnostics())
@pytest.mark.parametrize(
    "case",
    [
        pytest.param((mixture_model, mixture_guide, DATA, "c"), id="mixture"),
        pytest.param((lda_model, lda_guide, LDA_DATA, "word_topics"), id="lda"),
    ],
)
def test_diagnostics_refuse_sites_enumerated_in_the_model(diagnostic, case):
    """
    A site enumerated in the model that the guide does not sample: every post-fit
    diagnostic but estimate_evidence (which sums it out) raises a ValueError naming the site
    and what works (was: "Shape mismatch inside plate('documents')", "expand(...)" from
    inside the model).
    """
    model, guide, data, site = case
    with pytest.raises(ValueError, match=f"site '{site}' is enumerated in the model: .*infer_discrete"):
        diagnostic(model, guide, data)


def test_estimate_evidence_sums_out_enumerated_sites_exactly():
    """
    A conjugate part (μ ~ N(0, 1), x_i ~ N(μ, 1)) and a mixture part with known weights and
    locations (c_j enumerated in the model, y_j ~ N(loc_c, 1)). With the exact posterior of μ as
    guide every importance weight is p(x, y): estimate_evidence equals log N(x; 0, I + 11ᵀ)
    plus the brute-force log Σ over all 2^4 assignments of c (no Monte Carlo error).
    """
    import itertools

    from pyro_elbo_lab import estimate_evidence

    x = torch.tensor([0.3, -0.5, 1.2])
    y = torch.tensor([-1.0, 0.2, 2.5, 3.1])
    weights, locs = torch.tensor([0.3, 0.7]), torch.tensor([-1.0, 2.5])

    @config_enumerate
    def model(x, y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("xs", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)
        with pyro.plate("ys", len(y)):
            c = pyro.sample("c", dist.Categorical(weights))
            pyro.sample("y", dist.Normal(Vindex(locs)[c] + 0.0 * mu, 1.0), obs=y)

    n = len(x)
    post_var = 1.0 / (1 + n)

    def guide(x, y):
        pyro.sample("mu", dist.Normal(post_var * x.sum(), post_var**0.5))

    log_px = dist.MultivariateNormal(torch.zeros(n), torch.eye(n) + torch.ones(n, n)).log_prob(x)
    joint = []
    for assignment in itertools.product(range(2), repeat=len(y)):
        c = torch.tensor(assignment)
        joint.append((weights[c].log() + dist.Normal(locs[c], 1.0).log_prob(y)).sum())
    expected = (log_px + torch.logsumexp(torch.stack(joint), 0)).item()

    result = estimate_evidence(model, guide, x, y, num_samples=50)
    assert result.log_evidence == pytest.approx(expected, abs=1e-10)
    assert result.elbo == pytest.approx(expected, abs=1e-10)


def test_estimate_evidence_refuses_scaled_factors_of_enumerated_sites():
    """A subsampled plate around an enumerated site: refused, naming the site, instead of a wrong scale."""
    from pyro_elbo_lab import estimate_evidence

    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 3.0).expand([2]).to_event(1))
        with pyro.plate("data", len(data), subsample_size=2):
            c = pyro.sample("c", dist.Categorical(torch.tensor([0.4, 0.6])), infer={"enumerate": "parallel"})
            pyro.sample("obs", dist.Normal(Vindex(loc)[..., c], 1.0), obs=data[:2])

    with pytest.raises(ValueError, match="site 'c' depends on a site enumerated in the model and has scale"):
        estimate_evidence(model, mixture_guide, DATA, num_samples=10)


# -- Pyro's own example scripts, sized down, with the loss class swapped ------------------------


def _example_run(make_elbo, make_problem, num_steps=4):
    """SVI losses and final parameters of ``num_steps`` steps from a fixed seed."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide, args, kwargs, optim = make_problem()
    svi = pyro.infer.SVI(model, guide, optim, make_elbo())
    losses = [svi.step(*args, **kwargs) for _ in range(num_steps)]
    return losses, {name: value.detach().clone() for name, value in pyro.get_param_store().items()}


def _assert_same_run(actual, expected):
    assert actual[0] == pytest.approx(expected[0], rel=1e-10)
    assert actual[1].keys() == expected[1].keys()
    for name, value in expected[1].items():
        torch.testing.assert_close(actual[1][name], value, rtol=1e-9, atol=1e-12)


def lda_example():
    """Pyro's examples/lda.py as written (amortised MLP guide, subsampled documents), 3 topics, 12 docs."""
    import argparse
    import functools

    from torch import nn

    args = argparse.Namespace(num_topics=3, num_words=10, num_docs=12, num_words_per_doc=5, layer_sizes="6")

    def model(data=None, args=None, batch_size=None):
        with pyro.plate("topics", args.num_topics):
            topic_weights = pyro.sample("topic_weights", dist.Gamma(1.0 / args.num_topics, 1.0))
            topic_words = pyro.sample("topic_words", dist.Dirichlet(torch.ones(args.num_words) / args.num_words))
        with pyro.plate("documents", args.num_docs) as ind:
            if data is not None:
                data = data[:, ind]
            doc_topics = pyro.sample("doc_topics", dist.Dirichlet(topic_weights))
            with pyro.plate("words", args.num_words_per_doc):
                word_topics = pyro.sample("word_topics", dist.Categorical(doc_topics), infer={"enumerate": "parallel"})
                data = pyro.sample("doc_words", dist.Categorical(topic_words[word_topics]), obs=data)
        return topic_weights, topic_words, data

    def parametrized_guide(predictor, data, args, batch_size=None):
        topic_weights_posterior = pyro.param(
            "topic_weights_posterior", lambda: torch.ones(args.num_topics), constraint=dist.constraints.positive
        )
        topic_words_posterior = pyro.param(
            "topic_words_posterior",
            lambda: torch.ones(args.num_topics, args.num_words),
            constraint=dist.constraints.greater_than(0.5),
        )
        with pyro.plate("topics", args.num_topics):
            pyro.sample("topic_weights", dist.Gamma(topic_weights_posterior, 1.0))
            pyro.sample("topic_words", dist.Dirichlet(topic_words_posterior))
        pyro.module("predictor", predictor)
        with pyro.plate("documents", args.num_docs, batch_size) as ind:
            data = data[:, ind]
            counts = torch.zeros(args.num_words, ind.size(0)).scatter_add(0, data, torch.ones(data.shape))
            doc_topics = predictor(counts.transpose(0, 1))
            pyro.sample("doc_topics", dist.Delta(doc_topics, event_dim=1))

    _, _, data = model(args=args)
    sizes = [args.num_words] + [int(s) for s in args.layer_sizes.split("-")] + [args.num_topics]
    layers: list = []
    for in_size, out_size in zip(sizes, sizes[1:]):
        layers += [nn.Linear(in_size, out_size), nn.Sigmoid()]
    predictor = nn.Sequential(*layers, nn.Softmax(dim=-1))
    guide = functools.partial(parametrized_guide, predictor)
    optim = pyro.optim.ClippedAdam({"lr": 0.01})
    return model, guide, (data,), {"args": args, "batch_size": 5}, optim


def toy_mixture_example():
    """Pyro's examples/toy_mixture_model_discrete_enumeration.py as written (config_enumerate, Vindex), 40 points."""
    from torch.distributions.bernoulli import Bernoulli

    num_obs = 40
    prior = {
        "A": torch.tensor([1.0, 10.0]),
        "B": torch.tensor([[10.0, 1.0], [1.0, 10.0]]),
        "C": torch.tensor([[10.0, 1.0], [1.0, 10.0]]),
    }
    p_b, p_c = torch.tensor([0.9, 0.1]), torch.tensor([0.8, 0.05])
    data = {"A": Bernoulli(torch.full((num_obs,), 0.3)).sample()}
    data["B"] = Bernoulli(torch.gather(p_b, 0, data["A"].long())).sample()
    data["C"] = Bernoulli(torch.gather(p_c, 0, data["B"].long())).sample()

    @config_enumerate
    def model(prior, obs, num_obs):
        p_A = pyro.sample("p_A", dist.Beta(1, 1))
        p_B = pyro.sample("p_B", dist.Beta(torch.ones(2), torch.ones(2)).to_event(1))
        p_C = pyro.sample("p_C", dist.Beta(torch.ones(2), torch.ones(2)).to_event(1))
        with pyro.plate("data_plate", num_obs):
            A = pyro.sample("A", dist.Bernoulli(p_A.expand(num_obs)), obs=obs["A"])
            B = pyro.sample("B", dist.Bernoulli(Vindex(p_B)[A.long()]), infer={"enumerate": "parallel"})
            pyro.sample("C", dist.Bernoulli(Vindex(p_C)[B.long()]), obs=obs["C"])

    def guide(prior, obs, num_obs):
        a = pyro.param("a", prior["A"], constraint=dist.constraints.positive)
        pyro.sample("p_A", dist.Beta(a[0], a[1]))
        b = pyro.param("b", prior["B"], constraint=dist.constraints.positive)
        pyro.sample("p_B", dist.Beta(b[:, 0], b[:, 1]).to_event(1))
        c = pyro.param("c", prior["C"], constraint=dist.constraints.positive)
        pyro.sample("p_C", dist.Beta(c[:, 0], c[:, 1]).to_event(1))

    return model, guide, (prior, data, num_obs), {}, pyro.optim.Adam({"lr": 0.01})


def test_pyro_lda_example_runs_with_the_loss_class_swapped():
    """examples/lda.py: SVI with BetaTraceEnumELBO follows TraceEnum_ELBO step for step (β = 1), terms recorded."""
    expected = _example_run(lambda: TraceEnum_ELBO(max_plate_nesting=2), lda_example)
    _assert_same_run(_example_run(lambda: BetaTraceEnumELBO(max_plate_nesting=2), lda_example), expected)
    # the script's --jit branch with JitTraceEnum_ELBO swapped for ours: the same numbers for the same seed
    from pyro_elbo_lab import JitBetaTraceEnumELBO

    # ignore_jit_warnings: torch's Gamma.log_prob calls torch.as_tensor (a TracerWarning, an error under pytest)
    elbo = JitBetaTraceEnumELBO(max_plate_nesting=2, ignore_jit_warnings=True)
    _assert_same_run(_example_run(lambda: elbo, lda_example), expected)
    assert elbo.num_compilations == 1
    assert set(elbo.last_terms.per_site) == {"doc_words", "topic_weights", "topic_words", "doc_topics"}


def test_pyro_toy_mixture_example_runs_with_the_loss_class_swapped():
    """examples/toy_mixture_model_discrete_enumeration.py: BetaTraceEnumELBO follows TraceEnum_ELBO (β = 1)."""
    expected = _example_run(lambda: TraceEnum_ELBO(max_plate_nesting=1), toy_mixture_example)
    elbo = BetaTraceEnumELBO(max_plate_nesting=1)
    _assert_same_run(_example_run(lambda: elbo, toy_mixture_example), expected)
    # B summed out (no entry); C's entry is the marginal likelihood of the group that depends on B
    assert set(elbo.last_terms.per_site) == {"A", "C", "p_A", "p_B", "p_C"}


def test_supported_pyro_range_is_pyprojects_and_holds_the_installed_pyro():
    """The range losses/pyro_enum.py names in its ImportError is the one pyproject.toml pins, and this Pyro is in it."""
    from pathlib import Path

    specifiers = pytest.importorskip("packaging.specifiers")
    from pyro_elbo_lab.losses.pyro_enum import SUPPORTED_PYRO

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert f'"pyro-ppl{SUPPORTED_PYRO}"' in pyproject
    assert specifiers.SpecifierSet(SUPPORTED_PYRO).contains(pyro.__version__)
