"""Branch MASK blocks: the tree mask, no cold starts, exact counts, and the auto policy."""

from __future__ import annotations

import pytest
import torch

from rids.engine.branches import BranchPolicy, CostModel, parse_branches, reject_probabilities
from rids.engine.sequence import Sequence
from rids.errors import RidsError
from rids.llm import LLM
from tests.conftest import oracle_drafter


@pytest.fixture
def refs(prompt_ids, reference) -> dict[tuple[int, ...], list[int]]:
    return {tuple(p): r for p, r in zip(prompt_ids, reference, strict=True)}


def full_length(prompt_ids, reference, n):
    return [p for p, r in zip(prompt_ids, reference, strict=True) if len(r) == 48][:n]


@pytest.mark.parametrize("stride", [3, 4, 8])
def test_tree_mask_equals_each_branch_as_its_own_block(tiny_base, tiny_adapter, prompt_ids, stride):
    llm = LLM(tiny_base, tiny_adapter, page_size=4)
    bm, runner, mask = llm.engine.block_manager, llm.engine.runner, llm.mask_token_id
    prompt, drafts = prompt_ids[3], [7, 19, 250, 33, 41, 8, 99][: stride - 1]

    def masks_of(branches: tuple[int, ...], seq_drafts: list[int]) -> torch.Tensor:
        seq = Sequence(0, prompt, max_new_tokens=8, stride=1)
        prefill = seq.next_block(None)  # the prompt's KV into the cache
        bm.allocate(seq, prefill.end)
        runner.run([seq], [prefill], bm)
        seq.num_cached_tokens, seq.stride, seq.drafts = len(prompt) - 1, stride, seq_drafts
        block = seq.next_block(mask, branches)
        bm.allocate(seq, block.end)
        out = runner.run([seq], [block], bm).masks
        bm.deallocate(seq)
        return out

    tree = masks_of(tuple(range(stride)), drafts)
    for j in range(stride):  # B_j alone: the pending token, d_1..d_j, then N-1 MASKs
        alone = masks_of((j,), drafts[:j])
        torch.testing.assert_close(
            tree[j * (stride - 1) : (j + 1) * (stride - 1)], alone, atol=1e-5, rtol=0
        )
    assert bm.num_free_pages == bm.num_pages


@pytest.mark.parametrize("stride", [3, 4, 8])
def test_branches_remove_cold_starts(tiny_base, tiny_adapter, refs, prompt_ids, reference, stride):
    prompts = full_length(prompt_ids, reference, 3)
    for i in range(stride - 1):  # drafts right up to d_i, wrong at d_{i+1}
        counts = {}
        for mode in ("off", "all"):
            llm = LLM(tiny_base, tiny_adapter, page_size=4, branches=mode)
            llm.engine.drafter = oracle_drafter(refs, wrong_at=lambda seq, k, i=i: k == i)
            outs = llm.generate(prompts, max_new_tokens=1 + 6 * (i + 1), stride=stride)
            for o in outs:
                assert o.token_ids == refs[tuple(o.prompt_token_ids)][: 1 + 6 * (i + 1)]
            counts[mode] = outs[0].stats
        # all: every step verifies B_i's drafts and commits i + 1 tokens (i drafts + correction)
        assert counts["all"].cold_starts == 0
        assert counts["all"].decode_steps == 6 and counts["all"].tpf == i + 1
        # off: a verify step (i + 1 tokens) then a cold start (1 token), again and again
        steps, cold = plain_counts(i, 6 * (i + 1))
        off = counts["off"]
        assert (off.decode_steps, off.cold_starts, off.decode_tokens) == (steps, cold, 6 * (i + 1))


def plain_counts(i: int, total: int) -> tuple[int, int]:
    """Decode steps and cold starts of plain R-ISD when drafts are right up to d_i only."""
    steps = cold = tokens = 0
    verify = True  # the prefill proposed drafts
    while tokens < total:
        tokens += min(i + 1 if verify else 1, total - tokens)
        steps, cold, verify = steps + 1, cold + (not verify), not verify
    return steps, cold


def test_branch_budget_k_keeps_the_likeliest_rejection_points():
    seq = Sequence(0, [1, 2], max_new_tokens=8, stride=4)
    seq.drafts, seq.draft_confidence = [5, 6, 7], [0.9, 0.2, 0.8]
    # P(exactly j accepted): j=0: 0.1, j=1: 0.9 * 0.8 = 0.72, j=2: 0.9 * 0.2 * 0.2 = 0.036
    assert reject_probabilities(seq.draft_confidence) == pytest.approx([0.1, 0.72, 0.036])
    assert BranchPolicy(1).choose([seq]) == [(1, 3)]
    assert BranchPolicy(2).choose([seq]) == [(0, 1, 3)]
    assert BranchPolicy("all").choose([seq]) == [(0, 1, 2, 3)]
    assert BranchPolicy("off").choose([seq]) == [None]


def test_auto_follows_the_cost_model():
    """Same running acceptance (0.7, 0.6, 0.5), two cost models, opposite choices."""
    seqs = []
    for i in range(4):
        seq = Sequence(i, [1, 2, 3], max_new_tokens=8, stride=4)
        seq.num_cached_tokens = 2
        seq.drafts, seq.draft_confidence = [5, 6, 7], [0.7, 0.6, 0.5]
        seqs.append(seq)
    stats = dict(verified=[100, 70, 42], accepted=[70, 42, 21])
    free = BranchPolicy("auto", CostModel([1, 1024], [0.01, 0.01]), **stats)  # tokens are free
    assert free.choose(seqs) == [(0, 1, 2, 3)] * 4
    linear = BranchPolicy("auto", CostModel([1, 1024], [0.001, 1.024]), **stats)  # per token
    assert linear.choose(seqs) == [None] * 4


def test_auto_end_to_end_is_lossless_and_measures_its_costs(
    tiny_base, tiny_adapter, prompt_ids, reference
):
    llm = LLM(tiny_base, tiny_adapter, branches="auto")
    outs = llm.generate(prompt_ids, max_new_tokens=48, stride=4)
    assert [o.token_ids for o in outs] == reference
    cost = llm.engine.branches.cost
    assert cost is not None and cost.tokens[0] == 1 and len(cost.seconds) >= 5


def test_bad_branch_option():
    assert parse_branches("3") == 3 and parse_branches("auto") == "auto"
    with pytest.raises(RidsError, match="off, all, auto or a number"):
        parse_branches("some")


def test_median_seconds_warms_up_then_takes_the_median():
    from rids.utils.timing import median_seconds

    calls = []
    seconds = median_seconds(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and seconds >= 0.0
