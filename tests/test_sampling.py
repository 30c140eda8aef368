"""Sampled R-ISD has exactly the base's distribution: a chi-square test that can fail."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import transformers

from rids.engine.verifier import TorchRule, inverse_cdf
from rids.errors import RidsError
from rids.llm import LLM
from rids.sampling import NUCLEUS_CANDIDATES, SamplingParams, nucleus, probabilities

TOP_K = 8
SAMPLES = 4000
PARAMS = SamplingParams(temperature=1.5, top_k=TOP_K)


@pytest.fixture(scope="module", params=["off", "all"])
def setup(request, fitted, trained_adapter):
    """A base with structure and an adapter trained for it: drafts are often accepted.
    With `all`, drafts after a rejection come from the matching MASK branch."""
    llm = LLM(fitted[0], trained_adapter, max_batch_size=256, branches=request.param,
              drafting="fixed")  # fmt: skip
    return llm, llm.encode("three four five six")


@pytest.fixture(scope="module")
def exact_joint(fitted, setup) -> dict[tuple[int, int, int], float]:
    """P(t1, t2, t3) of the base after top-k 8, from `transformers` (1 + 8 + 64 forwards)."""
    _, prompt = setup
    model = transformers.AutoModelForCausalLM.from_pretrained(fitted[0], dtype=torch.float32)

    @torch.inference_mode()
    def dist(prefix: list[int]) -> dict[int, float]:
        p = probabilities(model(torch.tensor([prompt + prefix])).logits[0, -1:], PARAMS)[0]
        return {int(t): float(p[t]) for t in p.nonzero().flatten()}

    joint = {}
    for t1, a in dist([]).items():
        for t2, b in dist([t1]).items():
            for t3, c in dist([t1, t2]).items():
                joint[(t1, t2, t3)] = a * b * c
    return joint


def chi_square_p_value(samples: list[tuple], expected: dict[tuple, float]) -> float:
    """Goodness of fit; cells with expected count < 5 are pooled into one."""
    counts, n = Counter(samples), len(samples)
    big = [c for c, p in expected.items() if n * p >= 5]
    observed = [counts[c] for c in big] + [n - sum(counts[c] for c in big)]
    wanted = [n * expected[c] for c in big] + [n * (1 - sum(expected[c] for c in big))]
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, wanted, strict=True) if e > 0)
    df = len([e for e in wanted if e > 0]) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2), torch.tensor(stat / 2)))


def first_three(llm: LLM, prompt: list[int], stride: int, seed: int) -> tuple[list[tuple], float]:
    """SAMPLES draws of three tokens. With branches (`all`) the requests are unseeded (a seeded
    request takes no branches); their generators then come from torch's, seeded here."""
    torch.manual_seed(seed)
    branched = llm.engine.policy.branches == "all"
    outs = llm.generate(
        [prompt] * SAMPLES, max_new_tokens=3, stride=stride, ignore_eos=True,
        temperature=PARAMS.temperature, top_k=TOP_K, seed=None if branched else seed,
    )  # fmt: skip
    verified = sum(o.stats.drafts_verified[0] for o in outs) if stride > 1 else 0
    accepted = sum(o.stats.drafts_accepted[0] for o in outs) if stride > 1 else 0
    return [tuple(o.token_ids) for o in outs], accepted / max(verified, 1)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_sampled_risd_has_the_base_distribution(setup, exact_joint, stride):
    llm, prompt = setup
    samples, acceptance = first_three(llm, prompt, stride, seed=stride)
    assert chi_square_p_value(samples, exact_joint) > 1e-3
    if stride > 1:
        assert acceptance > 0.3, acceptance  # drafts were accepted, not only resampled


def test_the_chi_square_test_rejects_a_wrong_rule(setup, exact_joint, monkeypatch):
    """Same test, same sample size: accepting every draft (the mistake) is caught."""
    llm, prompt = setup

    def accept_all(p, q, drafts, u):
        k = drafts.shape[0]
        return torch.tensor(k), inverse_cdf(p[k : k + 1], u[-1:])[0]

    monkeypatch.setattr(TorchRule, "sampled", staticmethod(accept_all))
    samples, _ = first_three(llm, prompt, 4, seed=4)
    assert chi_square_p_value(samples, exact_joint) < 1e-6


@pytest.mark.parametrize("stride", [1, 4])
def test_zero_temperature_and_top_k_1_are_greedy(
    tiny_base, tiny_adapter, prompt_ids, reference, stride
):
    llm = LLM(tiny_base, tiny_adapter)
    cold = llm.generate(prompt_ids, max_new_tokens=48, stride=stride, temperature=1e-5, seed=0)
    top1 = llm.generate(prompt_ids, max_new_tokens=48, stride=stride, temperature=1.0, top_k=1)
    assert [o.token_ids for o in cold] == reference
    assert [o.token_ids for o in top1] == reference


def test_seeded_request_is_the_same_alone_and_in_a_batch(tiny_base, tiny_adapter, prompt_ids):
    llm = LLM(tiny_base, tiny_adapter)
    kw = dict(max_new_tokens=24, stride=4, temperature=1.0, top_p=0.9)
    alone = llm.generate([prompt_ids[2]], seed=7, **kw)[0].token_ids
    batched = llm.generate(prompt_ids[:5], seed=5, **kw)[2].token_ids  # prompt 2 gets seed 7
    assert alone == batched
    assert llm.generate([prompt_ids[2]], seed=8, **kw)[0].token_ids != alone


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).log()  # probabilities 0.4 0.3 0.2 0.1
    p = probabilities(logits, SamplingParams(temperature=1.0, top_p=0.65))
    torch.testing.assert_close(p, torch.tensor([[4 / 7, 3 / 7, 0.0, 0.0]]))
    p = probabilities(logits, SamplingParams(temperature=1.0, top_k=3))
    torch.testing.assert_close(p, torch.tensor([[4 / 9, 3 / 9, 2 / 9, 0.0]]))


@pytest.mark.parametrize(
    ("spread", "top_p", "beyond"),  # beyond: some row's nucleus is larger than the candidates
    [(4.0, 0.3, False), (4.0, 0.9, False), (4.0, 0.999, True), (0.5, 0.9, True)],
)
def test_nucleus_from_candidates_equals_the_full_sort(spread, top_p, beyond):
    logits = torch.randn(6, 5000, generator=torch.Generator().manual_seed(0)) * spread
    probs = logits.softmax(-1)
    ranked, order = probs.sort(-1, descending=True)
    drop = ranked.cumsum(-1) - ranked >= top_p
    want = torch.zeros_like(probs).scatter(-1, order, ranked.masked_fill(drop, 0.0))
    got = nucleus(probs, top_p)
    assert torch.equal(got > 0, want > 0)  # the same tokens kept, however small
    torch.testing.assert_close(got, want / want.sum(-1, keepdim=True))
    assert bool(((got > 0).sum(-1) > NUCLEUS_CANDIDATES).any()) == beyond


@pytest.mark.parametrize(
    ("kw", "message"),
    [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top_k"), (dict(top_p=0), "top_p")],
)
def test_bad_sampling_parameters(kw, message):
    with pytest.raises(RidsError, match=message):
        SamplingParams(**kw)
