"""Continuous batching: admission by pages, chunked prefill, preemption, stationary batches.

Unit checks of the scheduler's decisions, then end-to-end runs under pressure whose output
must still equal `transformers` greedy `generate` token for token, with every page given back.
"""

from __future__ import annotations

import pytest

from rids.engine.page_manager import PageManager
from rids.engine.scheduler import Scheduler
from rids.engine.sequence import Sequence
from rids.errors import RidsError
from rids.llm import LLM
from tests.conftest import noisy, oracle_drafter

MAX_NEW = 48


def seqs_of(n: int, prompt_len: int, stride: int = 2) -> list[Sequence]:
    return [Sequence(i, [1] * prompt_len, max_new_tokens=4, stride=stride) for i in range(n)]


def test_admits_while_the_whole_prompt_fits_then_waits_for_pages():
    sched = Scheduler(PageManager(num_pages=5, page_size=4), max_batch_size=8)
    seqs = seqs_of(3, 6)  # prompt + MASK block = 7 tokens: 2 pages each
    for s in seqs:
        sched.add(s)
    assert [s for s, _ in sched.schedule()] == seqs[:2]
    for s in seqs[:2]:
        sched.pages.allocate(s, 7)
    seqs[0].finish("stop")
    sched.release_finished()
    assert [s for s, _ in sched.schedule()] == seqs[1:]


def test_refuses_a_request_larger_than_the_cache():
    sched = Scheduler(PageManager(num_pages=2, page_size=4), max_batch_size=8)
    with pytest.raises(RidsError, match="KV cache too small"):
        sched.add(Sequence(1, [1] * 10, max_new_tokens=4, stride=2))


def test_max_batch_size_bounds_the_batch():
    sched = Scheduler(PageManager(num_pages=64, page_size=4), max_batch_size=2)
    for s in seqs_of(3, 4):
        sched.add(s)
    assert len(sched.schedule()) == 2 and len(sched.waiting) == 1


def test_long_prompts_are_prefilled_in_chunks_within_the_step_budget():
    sched = Scheduler(PageManager(num_pages=64, page_size=4), max_batch_size=8, max_step_tokens=8)
    a, b = seqs_of(2, 20, stride=4)
    sched.add(a)
    sched.add(b)
    plan = sched.schedule()
    assert plan == [(a, 8)]  # a fills the budget; b waits for a step with room
    a.num_cached_tokens = 16  # two chunks later: a's last 4 + 3 MASKs, b's first chunk
    assert sched.schedule() == [(a, 4), (b, 1)]


def test_pressure_preempts_the_newest_request():
    bm = PageManager(num_pages=4, page_size=4)
    sched = Scheduler(bm, max_batch_size=8)
    old, new = seqs_of(2, 3)
    for s in (old, new):
        sched.add(s)
    assert len(sched.schedule()) == 2
    for s in (old, new):  # both have grown to 8 cached tokens: 2 pages each, none free
        bm.allocate(s, 8)
        s.token_ids += [1] * 6
        s.num_cached_tokens = 8
    plan = sched.schedule()  # old needs a third page: new gives its pages back
    assert plan == [(old, 1)] and sched.num_preemptions == 1
    assert list(sched.waiting) == [new] and new.num_cached_tokens == 0 and not new.page_table
    assert bm.num_free_pages == 2


def test_stationary_batch_admits_only_every_k_steps():
    sched = Scheduler(PageManager(num_pages=64, page_size=4), max_batch_size=8, stationary_steps=3)
    a, b = seqs_of(2, 4)
    sched.add(a)
    assert len(sched.schedule()) == 1  # an empty batch admits at once
    sched.add(b)
    assert len(sched.schedule()) == 1 and len(sched.schedule()) == 1
    assert len(sched.schedule()) == 2  # the third step after the last admission


@pytest.mark.parametrize("option", ["max_step_tokens", "stationary_steps"])
def test_bad_scheduler_options_are_refused(option):
    with pytest.raises(RidsError, match=option):
        Scheduler(PageManager(num_pages=4, page_size=4), 8, **{option: 0})


@pytest.fixture
def refs(prompt_ids, reference) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): r for p, r in zip(prompt_ids, reference, strict=True)}


def run_all(llm: LLM, prompt_ids, refs, stride: int) -> list[list[int]]:
    """Every prompt at once, MASK proposals replaced by a noisy oracle so drafts get accepted."""
    llm.engine.drafter = oracle_drafter(refs, noisy(0.3))
    outs = llm.generate(prompt_ids, max_new_tokens=MAX_NEW, stride=stride)
    bm = llm.engine.pages
    assert bm.num_free_pages == bm.num_pages and llm.engine.scheduler.is_finished()
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("stride", [1, 4])
def test_chunked_prefill_is_lossless(tiny_base, tiny_adapter, prompt_ids, refs, reference, stride):
    llm = LLM(
        tiny_base, tiny_adapter, page_size=4, max_step_tokens=7, branches="off", drafting="fixed"
    )
    assert run_all(llm, prompt_ids, refs, stride) == reference
    seq = llm.make_sequence(prompt_ids[3], max_new_tokens=4, stride=stride)
    llm.engine.add(seq)
    while not seq.is_finished:
        llm.engine.step()
    chunks = -(-(len(prompt_ids[3]) + stride - 1) // 7)
    assert seq.num_forwards == seq.decode_steps + chunks  # the prompt took several forwards


@pytest.mark.parametrize("branches", ["off", "all"])
def test_preemption_under_pressure_is_lossless(
    tiny_base, tiny_adapter, prompt_ids, refs, reference, branches
):
    # room for about two full requests: the batch must shed and recompute requests
    llm = LLM(tiny_base, tiny_adapter, page_size=4, kv_cache_tokens=160, branches=branches)
    assert run_all(llm, prompt_ids, refs, 4) == reference
    assert llm.engine.scheduler.num_preemptions > 0


def test_stationary_batches_are_lossless(tiny_base, tiny_adapter, prompt_ids, refs, reference):
    llm = LLM(tiny_base, tiny_adapter, page_size=4, max_batch_size=3, stationary_steps=4)
    assert run_all(llm, prompt_ids, refs, 3) == reference


def test_a_seeded_request_survives_preemption_unchanged(tiny_base, tiny_adapter, prompt_ids):
    """Preemption keeps the drafts, so the recompute step is the verify step it replaced: a
    seeded sampled request's text is the same alone and in a batch that preempts it."""
    kw = dict(max_new_tokens=MAX_NEW, stride=4, temperature=1.0, top_k=50)
    alone = LLM(tiny_base, tiny_adapter).generate([prompt_ids[6]], seed=16, **kw)[0].token_ids
    llm = LLM(tiny_base, tiny_adapter, page_size=4, kv_cache_tokens=160)
    crowd = llm.generate(prompt_ids, seed=10, **kw)  # prompt 6 gets seed 16
    assert llm.engine.scheduler.num_preemptions > 0
    assert crowd[6].token_ids == alone


@pytest.mark.parametrize("branches", ["all", "auto"])
def test_a_step_never_exceeds_max_step_tokens(
    tiny_base, tiny_adapter, prompt_ids, refs, reference, branches
):
    """Branches come out of the room the plain blocks leave: with max_step_tokens a step holds
    at most that many tokens, whatever the branch mode."""
    llm = LLM(tiny_base, tiny_adapter, page_size=4, max_step_tokens=20, branches=branches,
              drafting="fixed")  # fmt: skip
    sizes = []
    run = llm.engine.runner.run

    def recording(entries, pad=None):
        sizes.append(sum(len(e.block.token_ids) for e in entries))
        return run(entries, pad)

    llm.engine.runner.run = recording
    assert run_all(llm, prompt_ids, refs, 4) == reference
    assert max(sizes) <= 20, sizes
    assert len(sizes) > 10  # many steps ran


def test_pages_are_reserved_for_plain_blocks_only():
    """A decoding sequence with 3 drafts at stride 4 needs its plain block (7 tokens), not the
    16 of every branch: no preemption when plain blocks fit."""
    pages = PageManager(num_pages=6, page_size=4)
    sched = Scheduler(pages, max_batch_size=8)
    a, b = seqs_of(2, 4, stride=4)
    for s in (a, b):
        sched.add(s)
    sched.schedule()
    for s in (a, b):  # both prefilled: 4 cached tokens, a pending one, 3 drafts
        pages.allocate(s, 5)
        s.token_ids.append(1)
        s.num_cached_tokens, s.drafts = 5, [1, 2, 3]
    plan = sched.schedule()  # 5 + 7 = 12 tokens: 3 pages each, 2 more each, 2 free
    assert [s for s, _ in plan] == [a, b] and sched.num_preemptions == 0
    assert sched.room.pages == 0  # nothing left for extra branches
