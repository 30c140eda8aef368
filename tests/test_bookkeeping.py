"""Step bookkeeping with the MASK proposals replaced by an oracle, and the KV page accounting."""

from __future__ import annotations

import pytest

from rids.engine.page_manager import PageManager
from rids.engine.sequence import Sequence
from rids.engine.step_inputs import slot_of
from rids.errors import RidsError
from rids.llm import LLM
from tests.conftest import oracle_drafter


@pytest.fixture(scope="module")
def llm(tiny_base, tiny_adapter) -> LLM:
    # the fixed I-DLM step without branches: the counts below are plain R-ISD's
    return LLM(tiny_base, tiny_adapter, page_size=4, branches="off", drafting="fixed")


@pytest.fixture
def refs(prompt_ids, reference) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): r for p, r in zip(prompt_ids, reference, strict=True)}


def full_length_prompts(prompt_ids, reference, n: int) -> list[list[int]]:
    """Prompts whose reference runs the full 48 tokens (no early EOS)."""
    return [p for p, r in zip(prompt_ids, reference, strict=True) if len(r) == 48][:n]


@pytest.mark.parametrize("stride", [2, 3, 4, 8])
def test_perfect_drafts_give_tpf_n(llm, refs, prompt_ids, reference, stride):
    prompts = full_length_prompts(prompt_ids, reference, 3)
    llm.engine.drafter = oracle_drafter(refs)
    try:
        # prefill commits 1 token, then every decode step N: 1 + 4N tokens in 4 decode steps
        outs = llm.generate(prompts, max_new_tokens=1 + 4 * stride, stride=stride)
    finally:
        llm.engine.drafter = None
    for o in outs:
        assert o.token_ids == refs[tuple(o.prompt_token_ids)][: 1 + 4 * stride]
        assert (o.stats.decode_steps, o.stats.decode_tokens) == (4, 4 * stride)
        assert o.stats.tpf == stride
        assert o.stats.forwards == 5
        assert o.stats.cold_starts == 0
        assert o.stats.acceptance == [1.0] * (stride - 1)


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_always_wrong_drafts_give_tpf_1(llm, refs, prompt_ids, reference, stride):
    prompts = full_length_prompts(prompt_ids, reference, 3)
    llm.engine.drafter = oracle_drafter(refs, wrong_at=lambda seq, i: True)
    try:
        outs = llm.generate(prompts, max_new_tokens=20, stride=stride)
    finally:
        llm.engine.drafter = None
    for o in outs:
        assert o.token_ids == refs[tuple(o.prompt_token_ids)][:20]
        assert o.stats.tpf == 1.0
        # verify (reject d_1) and cold start alternate after the prefill's proposal
        assert o.stats.decode_steps == 19
        assert o.stats.cold_starts == 9
        assert o.stats.acceptance[0] == 0.0


@pytest.mark.parametrize("stride", [3, 4, 8])
def test_wrong_at_position_i_commits_i_tokens(llm, refs, prompt_ids, reference, stride):
    prompt = full_length_prompts(prompt_ids, reference, 1)[0]
    for i in range(1, stride):  # d_i is the first wrong draft (1-based)
        llm.engine.drafter = oracle_drafter(refs, wrong_at=lambda seq, k, i=i: k == i - 1)
        seq = llm.make_sequence(prompt, max_new_tokens=40, stride=stride)
        llm.engine.add(seq)
        llm.engine.step()  # prefill: 1 token + drafts
        assert len(seq.completion_ids) == 1 and len(seq.drafts) == stride - 1
        llm.engine.step()  # verify: d_1..d_{i-1} pass, d_i fails -> i tokens
        assert len(seq.completion_ids) == 1 + i
        assert seq.completion_ids == refs[tuple(prompt)][: 1 + i]
        assert seq.drafts == []  # MASK outputs were conditioned on a wrong draft
        assert seq.num_cached_tokens == seq.num_tokens - 1  # only the pending token uncached
        assert len(seq.page_table) == -(-seq.num_cached_tokens // 4)
        seq.finish("abort")
        llm.engine.scheduler.release_finished()
    llm.engine.drafter = None
    bm = llm.engine.pages
    assert bm.num_free_pages == bm.num_pages


def test_page_manager_allocate_truncate_free():
    bm = PageManager(num_pages=4, page_size=4)
    assert bm.scratch_page == 4  # the cache's extra page: never handed out
    seq = Sequence(1, [1, 2, 3], max_new_tokens=4, stride=2)
    bm.allocate(seq, 6)
    assert len(seq.page_table) == 2 and bm.num_free_pages == 2
    assert slot_of(seq.page_table, 5, 4) == seq.page_table[1] * 4 + 1
    bm.allocate(seq, 8)  # still two pages
    assert len(seq.page_table) == 2
    bm.truncate(seq, 3)
    assert len(seq.page_table) == 1 and bm.num_free_pages == 3
    assert bm.new_pages(seq, 17) == 4 > bm.num_free_pages
    with pytest.raises(RidsError, match="KV cache exhausted"):
        bm.allocate(seq, 17)
    bm.deallocate(seq)
    assert seq.page_table == [] and bm.num_free_pages == 4


def test_small_cache_serves_a_batch_in_waves(tiny_base, tiny_adapter, prompt_ids, reference):
    llm = LLM(tiny_base, tiny_adapter, page_size=4, kv_cache_tokens=160)
    outs = llm.generate(prompt_ids, max_new_tokens=48, stride=4)
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.pages.num_free_pages == llm.engine.pages.num_pages


def test_interrupted_generate_gives_back_every_page(tiny_base, tiny_adapter, prompt_ids):
    llm = LLM(tiny_base, tiny_adapter, page_size=4, kv_cache_tokens=160)
    steps = 0

    def interrupt(seq, proposals, second):
        nonlocal steps
        steps += 1
        if steps == 5:
            raise KeyboardInterrupt
        return proposals, second

    llm.engine.drafter = interrupt
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompt_ids, max_new_tokens=48, stride=4)  # some running, some waiting
    bm = llm.engine.pages
    assert bm.num_free_pages == bm.num_pages
    assert llm.engine.scheduler.is_finished()
    llm.engine.drafter = None
    assert llm.generate(prompt_ids[:1], max_new_tokens=4, stride=4)[0].token_ids  # still usable
