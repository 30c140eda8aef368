"""Corpus drafts: the table holds what the base wrote most often after each n-gram, it loads
from beside an adapter, and every output stays the base's."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from safetensors.torch import save_file

from rids.engine.cost_model import CostModel
from rids.engine.draft_corpus import FILENAME, DraftCorpus
from rids.engine.drafting import Copy, DraftingPolicy
from rids.engine.sequence import Sequence
from rids.errors import RidsError
from rids.llm import LLM
from tests.conftest import answered, answers, hf_greedy


def build(docs, **kw) -> DraftCorpus:
    return DraftCorpus.build(docs, **{"length": 2, "min_support": 1, "min_expected": 0.0, **kw})


def test_the_likeliest_continuation_token_by_token_with_shrunk_shares():
    # after [1, 2]: (3, 4) twice, (3, 5) once, (6, 7) once
    corpus = build(answers([1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7]))
    drafts, expected = corpus.lookup([9, 1, 2], 2)
    assert drafts == [3, 4]
    assert expected == pytest.approx([3 / 5, (3 + 2) / (4 + 1)])  # 3 start with 3, 2 go on with 4
    assert corpus.lookup([9, 1, 2], 1) == ([3], pytest.approx([3 / 5]))
    assert corpus.lookup([5, 5], 2) == ([], [])  # never seen


def test_the_longest_ngram_found_wins():
    # after [2]: 3 mostly; after [7, 2]: 8 always
    corpus = build(answers([1, 2, 3, 0], [1, 2, 3, 0], [4, 2, 3, 0], [5, 7, 2, 8, 0]))
    assert corpus.lookup([6, 2], 1)[0] == [3]
    assert corpus.lookup([6, 7, 2], 1)[0] == [8]


def test_only_answers_are_continued_and_thin_or_unsure_ngrams_are_left_out():
    prompt_only = ([1, 2, 3, 4], [False] * 4)
    assert len(build([prompt_only])) == 0
    once = answers([1, 2, 3, 4])
    assert len(build(once, min_support=2)) == 0
    assert len(build(once, min_expected=1.1)) == 0  # one occurrence: 2 x 1/2 expected at best


def test_a_longer_ngram_that_agrees_with_its_suffix_is_not_stored_and_still_found():
    docs = answers([1, 2, 3, 4], [5, 2, 3, 4])
    corpus = build(docs)
    # [2] -> (3, 4) is stored; [1, 2] and [5, 2] agree with it and are not
    assert corpus.lookup([1, 2], 2)[0] == [3, 4]
    assert corpus.lookup([5, 2], 2)[0] == [3, 4]
    assert len(corpus) == len(build(docs, max_ngram=1))  # [1], [2], [5]


def brute_force(docs, tokens: list[int], n: int) -> dict[int, int]:
    """What followed the last n tokens in the answers, counted."""
    counts: dict[int, int] = {}
    for ids, target in docs:
        for end in range(n, len(ids)):
            if target[end] and ids[end - n : end] == tokens[-n:]:
                counts[ids[end]] = counts.get(ids[end], 0) + 1
    return counts


def test_lookups_match_a_brute_force_count():
    """The draft is the likeliest after the longest n-gram seen; its expected share is that
    n-gram's or, where it was not stored (it agreed), a shorter agreeing one's."""
    rng = random.Random(0)
    docs = answers(*[[rng.randrange(4) for _ in range(30)] for _ in range(20)])
    corpus = build(docs, length=1, max_ngram=3)
    for _ in range(50):
        tokens = [rng.randrange(4) for _ in range(5)]
        drafts, expected = corpus.lookup(tokens, 1)
        longest = next((n for n in range(3, 0, -1) if brute_force(docs, tokens, n)), None)
        if longest is None:
            assert drafts == []
            continue
        counts = brute_force(docs, tokens, longest)
        assert counts[drafts[0]] == max(counts.values())
        shares = []
        for n in range(longest, 0, -1):
            c = brute_force(docs, tokens, n)
            if c.get(drafts[0]) == max(c.values()):
                shares.append(c[drafts[0]] / (sum(c.values()) + 1))
        assert any(expected == pytest.approx([s]) for s in shares)


def test_save_and_load(tmp_path):
    corpus = build(answers([1, 2, 3, 4, 5], [1, 2, 3, 9, 9]))
    path = corpus.save(tmp_path / FILENAME)
    loaded = DraftCorpus.load(path, vocab_size=10)
    assert torch.equal(loaded.keys, corpus.keys) and torch.equal(loaded.tokens, corpus.tokens)
    assert loaded.lookup([1, 2], 2) == corpus.lookup([1, 2], 2)
    with pytest.raises(RidsError, match=r"outside this base's vocabulary.*rids build-corpus"):
        DraftCorpus.load(path, vocab_size=int(corpus.tokens.max()))  # its largest id is not
    save_file({"keys": corpus.keys}, path)
    with pytest.raises(RidsError, match=r"corrupt \(not a draft corpus\)"):
        DraftCorpus.load(path, vocab_size=10)
    path.write_bytes(b"not safetensors")
    with pytest.raises(RidsError, match=r"corrupt.*rebuild it or delete it"):
        DraftCorpus.load(path, vocab_size=10)


def test_corpus_trust_follows_what_corpus_copies_pass():
    policy = DraftingPolicy()
    seq = Sequence(0, [1, 2, 3], max_new_tokens=8, stride=4)
    assert policy.corpus_trust(seq) == pytest.approx(1.0)
    for _ in range(10):  # copies the corpus expected 2 passes of, of which none passed
        seq.copy = Copy([4, 5, 6], [0.9, 0.8, 0.6], [0.9, 1.6, 2.0])
        policy.record_copy(seq, 3, 0)
    assert policy.corpus_trust(seq) < 0.2
    fresh = Sequence(1, [1, 2, 3], max_new_tokens=8, stride=4)
    assert seq.corpus_predicted < policy.corpus_predicted  # older copies weigh less
    assert policy.corpus_trust(seq) < policy.corpus_trust(fresh) < 0.2


def corpus_adapter(tiny_base, tiny_adapter, tmp_path, prompts: list[list[int]]):
    """The tiny adapter with a corpus of `answered(prompts)`."""
    docs = answered(tiny_base, prompts)
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    DraftCorpus.build(docs, min_support=1).save(folder / FILENAME)
    return folder


@pytest.mark.parametrize("stride", [2, 4])
def test_corpus_copies_keep_generations_identical_to_transformers(
    tiny_base, tiny_adapter, tmp_path, stride
):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 200) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    adapter = corpus_adapter(tiny_base, tiny_adapter, tmp_path, prompts)
    llm = LLM(tiny_base, adapter, page_size=4)
    policy = llm.engine.policy
    assert policy.corpus is not None
    outs = llm.generate(prompts, max_new_tokens=40, stride=stride)
    assert [o.token_ids for o in outs] == hf_greedy(tiny_base, prompts, 40)
    assert policy.corpus_predicted > 0 and policy.corpus_passed > 0  # corpus copies were tried
    # one at a time, too (a request's own trust, no batch-mates)
    for p in prompts[1::2]:
        assert (
            llm.generate([p], max_new_tokens=40, stride=stride)[0].token_ids
            == hf_greedy(tiny_base, [p], 40)[0]
        )


def test_copy_steps_that_verify_a_prefix_or_branch_off_the_end_stay_lossless(
    tiny_base, tiny_adapter, tmp_path
):
    """Copies of right and wrong answers, planned under two cost models: clean rows cheap and
    MASKs dear (copies verified in part, no MASKs), and every row nearly free (branches at
    likely rejection points, not only after the whole copy). Text stays the base's."""
    rng = random.Random(2)
    prompts = [[rng.randrange(10, 200) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    adapter = corpus_adapter(tiny_base, tiny_adapter, tmp_path, prompts)
    llm = LLM(tiny_base, adapter, page_size=4)
    plans = []
    copy_plan = llm.engine.policy.copy_plan

    def recording(seq, *args):
        plans.append((len(seq.drafts), copy_plan(seq, *args)))
        return plans[-1][1]

    llm.engine.policy.copy_plan = recording
    costs = {
        "masks dear": CostModel([1, 2, 64], [0.010, 0.030, 1.0], clean=[0.010, 0.0102, 0.02]),
        "free": CostModel([1, 64], [0.010, 0.0101], clean=[0.010, 0.0101]),
    }
    for cost in costs.values():
        llm.engine.policy.cost = cost
        outs = llm.generate(prompts, max_new_tokens=40, stride=4)
        assert [o.token_ids for o in outs] == hf_greedy(tiny_base, prompts, 40)
    assert any(0 < p.num_drafts < n for n, p in plans)  # a prefix of a copy verified
    assert any(p.branches and p.num_drafts not in p.branches for _, p in plans)


def test_a_corrupt_corpus_beside_an_adapter_is_one_clear_error(tiny_base, tiny_adapter, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    (folder / FILENAME).write_bytes(b"\0" * 16)
    with pytest.raises(RidsError, match=f"{FILENAME} is corrupt"):
        LLM(tiny_base, folder)
