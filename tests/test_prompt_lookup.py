"""Prompt lookup: copied drafts are found as specified and keep every output the base's."""

from __future__ import annotations

import random

import pytest

from rids.engine.prompt_lookup import MAX_NGRAM, MIN_NGRAM, NgramIndex
from rids.llm import LLM
from tests.conftest import hf_greedy


def brute_force(tokens: list[int], num: int) -> tuple[list[int], int]:
    """The specification: the longest suffix (MAX_NGRAM down to MIN_NGRAM) that occurred
    earlier, its latest earlier occurrence, and what followed it."""
    for n in range(min(MAX_NGRAM, len(tokens)), MIN_NGRAM - 1, -1):
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + num], n
    return [], 0


def test_lookup_matches_a_brute_force_search_as_the_text_grows():
    rng = random.Random(0)
    for trial in range(40):
        vocab = rng.choice([3, 5, 20])  # small vocabularies repeat often, large ones rarely
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))]
        index = NgramIndex()
        for _ in range(30):
            num = rng.randrange(1, 6)
            assert index.lookup(tokens, num) == brute_force(tokens, num), (trial, tokens)
            tokens += [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]


def test_lookup_examples():
    index = NgramIndex()
    assert index.lookup([7, 8, 9], 3) == ([], 0)  # nothing repeats
    assert index.lookup([7, 8, 9, 1, 7, 8], 3) == ([9, 1, 7], 2)
    assert index.lookup([7, 8, 9, 1, 7, 8, 9], 3) == ([1, 7, 8], 3)  # the longer match wins
    # the latest occurrence wins among equally long ones
    assert NgramIndex().lookup([1, 2, 3, 1, 2, 4, 1, 2], 1) == ([4], 2)


def looping_prompts(n: int) -> list[list[int]]:
    """Random prompts: a random tiny model's greedy text soon loops (copies pass there)."""
    rng = random.Random(0)
    return [[rng.randrange(10, 200) for _ in range(9)] for _ in range(n)]


@pytest.mark.parametrize("stride", [2, 4])
def test_copied_drafts_keep_generations_identical_to_transformers(tiny_base, tiny_adapter, stride):
    """Copies are proposed and accepted, and every text stays `transformers`' greedy text, in
    a batch (each request copies as much as its own text repeats)."""
    llm = LLM(tiny_base, tiny_adapter, page_size=4)
    prompts = looping_prompts(6)
    want = hf_greedy(tiny_base, prompts, 40)
    outs = llm.generate(prompts, max_new_tokens=40, stride=stride)
    assert [o.token_ids for o in outs] == want
    copies = [o.stats.copies_accepted for o in outs]
    assert sum(copies) >= 10, copies
    # fixed drafting (the I-DLM step) proposes MASK drafts only
    fixed = LLM(tiny_base, tiny_adapter, page_size=4, drafting="fixed")
    outs = fixed.generate(prompts, max_new_tokens=40, stride=stride)
    assert [o.token_ids for o in outs] == want
    assert all(o.stats.copy_steps == 0 for o in outs)


def test_copies_survive_preemption_losslessly(tiny_base, tiny_adapter):
    """A preempted request keeps its copied drafts; its recompute verifies them whole."""
    llm = LLM(tiny_base, tiny_adapter, page_size=4, kv_cache_tokens=160)
    prompts = looping_prompts(8)
    outs = llm.generate(prompts, max_new_tokens=40, stride=4)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == hf_greedy(tiny_base, prompts, 40)
    assert sum(o.stats.copies_accepted for o in outs) > 0


def test_sampled_requests_take_no_copies(tiny_base, tiny_adapter):
    """A copy has no proposal distribution to sample against."""
    llm = LLM(tiny_base, tiny_adapter, page_size=4)
    prompts = looping_prompts(6)
    greedy = llm.generate(prompts, max_new_tokens=40, stride=4)
    sampled = llm.generate(prompts, max_new_tokens=40, stride=4, temperature=0.7)
    assert sum(o.stats.copy_steps for o in greedy) > 0
    assert all(o.stats.copy_steps == 0 for o in sampled)
