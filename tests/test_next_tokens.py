"""Next-token counts: what the base wrote after each 1-3 tokens, MASK drafts chosen with them
knowing the token just committed, and every output still the base's."""

from __future__ import annotations

import math
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from rids.engine.draft_corpus import followed_by, suffix_keys
from rids.engine.engine import Engine
from rids.engine.next_tokens import FILENAME, ORDER, TOP_K, WEIGHT, NextTokenCounts
from rids.engine.step_block import StepBlock
from rids.engine.step_inputs import StepEntry
from rids.errors import RidsError
from rids.llm import LLM
from tests.conftest import (
    GPU_LIKE_COSTS,
    answered,
    answers,
    check_chooser_leaves_sampling_alone,
    hf_greedy,
)


def context_count(table: NextTokenCounts, context: list[int]) -> int:
    key = list(suffix_keys(context, len(context), len(context)))[-1]
    return int(table.count(np.array([followed_by(key, -1)]))[0])


def pair_count(table: NextTokenCounts, context: list[int], token: int) -> int:
    key = list(suffix_keys(context, len(context), len(context)))[-1]
    return int(table.count(np.array([followed_by(key, token)]))[0])


def test_counts_of_each_target_token_after_its_last_one_to_three_tokens():
    table = NextTokenCounts.build(answers([1, 2, 3, 4], [1, 2, 3, 5], [7, 2, 3, 4]))
    assert pair_count(table, [2, 3], 4) == 2 and pair_count(table, [2, 3], 5) == 1
    assert pair_count(table, [1, 2, 3], 4) == 1 and pair_count(table, [7, 2, 3], 4) == 1
    assert context_count(table, [2, 3]) == 3 and context_count(table, [3]) == 3
    assert context_count(table, [1, 2, 3]) == 2
    assert pair_count(table, [3], 9) == 0 and context_count(table, [9]) == 0  # never seen
    # a prompt token (not a target) is context, never counted as what came next
    prompt = NextTokenCounts.build([([1, 2, 3], [False, False, True])])
    assert pair_count(prompt, [1], 2) == 0 and pair_count(prompt, [1, 2], 3) == 1
    # with min_count 2: what was seen once is left out
    pruned = NextTokenCounts.build(answers([1, 2, 3, 4], [1, 2, 3, 5], [7, 2, 3, 4]), min_count=2)
    assert pair_count(pruned, [2, 3], 4) == 2 and pair_count(pruned, [2, 3], 5) == 0
    assert context_count(pruned, [1, 2, 3]) == 2 and context_count(pruned, [7, 2, 3]) == 0
    assert len(pruned) < len(table)
    # contexts of ORDER = 3 tokens at most, or as many as asked
    longer = NextTokenCounts.build(answers([9, 1, 2, 3, 4]))
    assert ORDER == 3 and pair_count(longer, [1, 2, 3], 4) == 1
    assert pair_count(longer, [9, 1, 2, 3], 4) == 0
    assert pair_count(NextTokenCounts.build(answers([9, 1, 2, 3, 4]), 4), [9, 1, 2, 3], 4) == 1


def test_a_draft_is_chosen_knowing_the_tokens_before_it():
    # after ".. 8 2" the base always wrote 3, after ".. 8 5" always 6; then 4 after "3" and
    # 7 after "6"; the MASK rows mix both continuations, slightly preferring the other one
    table = NextTokenCounts.build(answers(*[[8, 2, 3, 4]] * 5, *[[8, 5, 6, 7]] * 5))
    rows = [[6, 3, 11], [7, 4, 12]]
    log_probs = [[math.log(0.4), math.log(0.35), math.log(0.25)]] * 2
    assert table.choose([8, 2], rows, log_probs) == ([3, 4], 6)
    assert table.choose([8, 5], rows, log_probs) == ([6, 7], 3)
    # text the counts never saw: the rows' own order
    assert table.choose([30, 31], rows, log_probs) == ([6, 7], 3)
    assert NextTokenCounts.build([]).choose([8, 2], rows, log_probs) == ([6, 7], 3)
    # one candidate: no runner-up
    assert table.choose([8, 2], [[6]], [[0.0]]) == ([6], None)


def test_the_counts_weigh_against_a_sure_mask_row():
    table = NextTokenCounts.build(answers(*[[8, 2, 3]] * 5))
    sure = [[math.log(0.95), math.log(0.0005)]]
    assert table.choose([8, 2], [[6, 3]], sure)[0] == [6]  # 0.95 vs 0.0005: the row wins
    unsure = [[math.log(0.5), math.log(0.3)]]
    assert table.choose([8, 2], [[6, 3]], unsure)[0] == [3]
    assert 0 < WEIGHT < 1


def test_save_load_and_a_corrupt_file(tmp_path):
    table = NextTokenCounts.build(answers([1, 2, 3, 4, 5], [1, 2, 3, 9, 9], *[[6, 7]] * 300))
    assert int(table.counts.max()) > 255  # stored apart from the byte-sized counts
    path = table.save(tmp_path / FILENAME)
    loaded = NextTokenCounts.load(path)
    assert np.array_equal(loaded.keys, table.keys)
    assert np.array_equal(loaded.counts, table.counts) and loaded.order == table.order
    assert bool((table.keys[1:] > table.keys[:-1]).all())  # sorted, one entry per key
    assert path.stat().st_size < 4 * len(table) + 2**18 + 1024  # ~3 bytes an entry
    # keys spread over the whole 32-bit range, negative and positive, round-trip too
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(-(2**31), 2**31, 5000)).astype(np.int32)
    spread = NextTokenCounts(keys, rng.integers(1, 1000, keys.size).astype(np.int32), 2)
    again = NextTokenCounts.load(spread.save(path))
    assert np.array_equal(again.keys, spread.keys) and np.array_equal(again.counts, spread.counts)
    assert again.order == 2
    good = load_file(path)
    for broken in (
        {k: v for k, v in good.items() if k != "low"},
        {**good, "low": good["low"][::-1].copy()},  # keys out of order
        {**good, "big_at": good["big_at"] + keys.size},
    ):
        save_file(broken, path, {"order": "2"})
        with pytest.raises(RidsError, match=r"corrupt \(not next-token counts\)"):
            NextTokenCounts.load(path)
    save_file(good, path)
    with pytest.raises(RidsError, match=r"corrupt \(no context length\)"):
        NextTokenCounts.load(path)
    path.write_bytes(b"\0" * 16)
    with pytest.raises(RidsError, match=f"{FILENAME} is corrupt"):
        NextTokenCounts.load(path)


def test_verification_returns_each_rows_likeliest_tokens_and_log_probs(tiny_base, tiny_adapter):
    engine = LLM(tiny_base, tiny_adapter, page_size=4).engine
    block = StepBlock([5, 0, 0, 0], 8, 0, 3, (0,))  # no drafts: B_0 proposes 3
    table = list(engine.pages.free_page_ids)[: engine.pages.pages_for(block.end)]
    step, logits = engine.runner.run([StepEntry(block, table)])
    verify = engine.verifier.verify
    (plain,) = verify([block], step.inputs, step.dev, logits, {})
    (verdict,) = verify([block], step.inputs, step.dev, logits, {}, True, TOP_K)
    assert plain.candidates is None and verdict.drafts == plain.drafts
    assert verdict.candidates is not None and verdict.candidate_log_probs is not None
    top = torch.log_softmax(logits.masks.float(), -1).topk(TOP_K, -1)
    assert verdict.candidates == top.indices.tolist()
    torch.testing.assert_close(
        torch.tensor(verdict.candidate_log_probs), top.values, atol=1e-5, rtol=0
    )
    assert [c[0] for c in verdict.candidates] == verdict.drafts
    assert verdict.second == verdict.candidates[0][1]


def test_candidates_come_from_the_rows_of_the_branch_that_matched(
    tiny_base, tiny_adapter, prompt_ids
):
    """Two blocks in one step: a prompt with drafts r_1 (the base's token) and a wrong one,
    branches B_0, B_1, B_2 of two MASKs each (one draft passes: B_1 proposes), and a
    one-token prompt with three MASKs after it."""
    engine = LLM(tiny_base, tiny_adapter, page_size=4).engine
    prompt = prompt_ids[0]
    r1 = hf_greedy(tiny_base, [prompt], 1)[0][0]
    wrong = (r1 + 1) % 100
    first = StepBlock([*prompt, r1, wrong, *[0] * 6], 0, 2, 2, (0, 1, 2))
    second = StepBlock([7, 0, 0, 0], 0, 0, 3, (0,))
    free = list(engine.pages.free_page_ids)
    need = engine.pages.pages_for(first.end)
    tables = [free[:need], free[need : need + engine.pages.pages_for(second.end)]]
    entries = [StepEntry(b, t) for b, t in zip((first, second), tables, strict=True)]
    step, logits = engine.runner.run(entries)
    verdicts = engine.verifier.verify([first, second], step.inputs, step.dev, logits, {}, False, 4)
    assert [v.accepted for v in verdicts] == [1, 0]
    assert [len(v.drafts) for v in verdicts] == [2, 3]
    top = torch.log_softmax(logits.masks.float(), -1).topk(4, -1)
    for verdict, rows in zip(verdicts, step.inputs.mask_rows, strict=True):
        branch_rows = range(rows.start + (2 if verdict is verdicts[0] else 0), rows.stop)
        branch_rows = branch_rows[: len(verdict.drafts)]
        expected = [top.indices[r].tolist() for r in branch_rows]
        assert verdict.candidates == expected
        assert verdict.drafts == [c[0] for c in expected]
        scores = torch.tensor(verdict.candidate_log_probs)
        torch.testing.assert_close(scores, top.values[list(branch_rows)], atol=1e-5, rtol=0)


def test_a_sampled_request_beside_greedy_ones_draws_the_same_with_or_without_counts(
    tiny_base, tiny_adapter, tmp_path, prompt_ids
):
    adapter = counts_adapter(tiny_base, tiny_adapter, tmp_path, prompt_ids)
    llm = LLM(tiny_base, adapter, page_size=4)
    llm.engine.policy.cost = GPU_LIKE_COSTS
    reference = hf_greedy(tiny_base, prompt_ids[:3], 40)
    check_chooser_leaves_sampling_alone(llm, "next_tokens", prompt_ids, reference)


def counts_adapter(tiny_base, tiny_adapter, tmp_path, prompts: list[list[int]]):
    """The tiny adapter with next-token counts of `answered(prompts)`."""
    docs = answered(tiny_base, prompts)
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    NextTokenCounts.build(docs).save(folder / FILENAME)
    return folder


@pytest.mark.parametrize("branches", ["off", "all"])
def test_drafts_chosen_with_counts_keep_generations_identical_to_transformers(
    tiny_base, tiny_adapter, tmp_path, branches, monkeypatch
):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 200) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    adapter = counts_adapter(tiny_base, tiny_adapter, tmp_path, prompts)
    llm = LLM(tiny_base, adapter, page_size=4, branches=branches)
    llm.engine.policy.cost = GPU_LIKE_COSTS  # drafts in every step, whatever this machine does
    policy = llm.engine.policy
    assert policy.next_tokens is not None and policy.num_candidates == TOP_K
    changed, choose = [], NextTokenCounts.choose

    def recording(self, text, candidates, log_probs):
        drafts, second = choose(self, text, candidates, log_probs)
        changed.append(drafts != [c[0] for c in candidates])
        return drafts, second

    monkeypatch.setattr(NextTokenCounts, "choose", recording)
    reference = hf_greedy(tiny_base, prompts, 40)
    for stride, batch in [(4, 1), (2, 6), (4, 6)]:
        outs = llm.generate(prompts[:batch], max_new_tokens=40, stride=stride)
        assert [o.token_ids for o in outs] == reference[:batch], (stride, batch)
    assert any(changed) and not all(changed)  # the counts overruled some rows' argmax
    assert llm.engine.pages.num_free_pages == llm.engine.pages.num_pages


def test_requests_that_distrust_the_counts_take_the_argmax_drafts_and_stay_identical(
    tiny_base, tiny_adapter, tmp_path, monkeypatch
):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 200) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    llm = LLM(tiny_base, counts_adapter(tiny_base, tiny_adapter, tmp_path, prompts), page_size=4)
    policy = llm.engine.policy
    policy.cost = GPU_LIKE_COSTS
    trusted, chosen, overruled = [], [], []
    monkeypatch.setattr(policy, "trusts_chooser", lambda seq: trusted[-1])  # drawn in `choose`
    choose, advance = NextTokenCounts.choose, Engine.advance

    def recording(self, text, candidates, log_probs):
        trusted.append(rng.random() < 0.5)
        drafts, second = choose(self, text, candidates, log_probs)
        chosen.append(drafts)
        return drafts, second

    def checking(self, seq, block, verdict):  # the drafts: the argmax's where distrusted
        advance(self, seq, block, verdict)
        if verdict.candidates and seq.copy is None and not seq.is_finished:
            argmax = [c[0] for c in verdict.candidates]
            assert seq.drafts == (chosen[-1] if trusted[-1] else argmax)
            if not trusted[-1]:  # the sibling draft: the first row's runner-up
                runner_up = verdict.candidates[0][1]
                assert seq.sibling_draft == (runner_up if runner_up != argmax[0] else None)
            assert seq.first_choices == (chosen[-1][0], argmax[0])
            overruled.append(not trusted[-1] and chosen[-1] != argmax)

    monkeypatch.setattr(NextTokenCounts, "choose", recording)
    monkeypatch.setattr(Engine, "advance", checking)
    reference = hf_greedy(tiny_base, prompts, 40)
    for stride, batch in [(4, 1), (3, 6)]:
        outs = llm.generate(prompts[:batch], max_new_tokens=40, stride=stride)
        assert [o.token_ids for o in outs] == reference[:batch], (stride, batch)
    assert any(overruled)  # some distrusted request's argmax drafts were not the counts'


def test_counts_are_used_by_adaptive_drafting_only(tiny_base, tiny_adapter, tmp_path):
    adapter = counts_adapter(tiny_base, tiny_adapter, tmp_path, [[11, 12, 13]])
    assert LLM(tiny_base, adapter).engine.policy.num_candidates == TOP_K
    assert LLM(tiny_base, adapter, drafting="fixed").engine.policy.num_candidates == 0
    assert LLM(tiny_base, tiny_adapter).engine.policy.num_candidates == 0  # none beside it
