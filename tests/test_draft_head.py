"""The draft head: MASK drafts chosen in verification knowing the token before each, trained on
the adapter's own MASK rows, and every output still the base's."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from rids.engine.draft_head import FILENAME, DraftHead
from rids.engine.engine import Engine
from rids.engine.next_tokens import TOP_K
from rids.engine.step_block import StepBlock
from rids.engine.step_inputs import StepEntry
from rids.engine.verifier import Verifier
from rids.errors import RidsError
from rids.llm import LLM
from rids.train.data import Document
from rids.train.draft_head import (
    MaskRows,
    acceptance,
    head_drafts,
    mask_rows,
    train_draft_head,
)
from tests.conftest import GPU_LIKE_COSTS, check_chooser_leaves_sampling_alone, hf_greedy


def random_head(hidden: int, scale: float, seed: int = 0) -> DraftHead:
    """A head whose moves are large enough to overrule some rows' argmax."""
    torch.manual_seed(seed)
    head = DraftHead(hidden, 32)
    with torch.no_grad():
        head.down.weight.normal_(0, scale)
    return head


def head_adapter(tiny_adapter, tmp_path, hidden: int, scale: float = 1.0):
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    random_head(hidden, scale).save(folder / FILENAME)
    return folder


def test_an_untrained_head_keeps_each_rows_argmax():
    torch.manual_seed(0)
    embed = torch.randn(50, 8)
    head = DraftHead(8, 16).bind(embed, embed)
    hidden = torch.randn(3, 2, 8)
    candidates = (hidden @ embed.T).topk(5, -1).indices
    drafts, second = head.choose(hidden, torch.tensor([1, 2, 3]), candidates)
    assert drafts.tolist() == candidates[..., 0].tolist()
    assert second.tolist() == candidates[:, 0, 1].tolist()


def test_each_draft_is_chosen_after_the_one_before_it():
    head = random_head(8, 3.0)
    torch.manual_seed(1)
    embed = torch.randn(50, 8)
    head.bind(embed, embed)
    hidden, token = torch.randn(4, 3, 8), torch.tensor([5, 6, 7, 8])
    candidates = torch.stack([torch.randperm(50)[:6] for _ in range(12)]).view(4, 3, 6)
    drafts, second = head.choose(hidden, token, candidates)
    before = token
    for m in range(3):  # the same choice made one row at a time, by hand
        scores = head.scores(hidden[:, m], before, candidates[:, m])
        order = scores.argsort(-1, descending=True)
        assert drafts[:, m].tolist() == candidates[:, m].gather(1, order[:, :1])[:, 0].tolist()
        if m == 0:
            assert second.tolist() == candidates[:, 0].gather(1, order[:, 1:2])[:, 0].tolist()
        before = drafts[:, m]
    assert (drafts != candidates[..., 0]).any()  # it overruled some argmax


def test_save_load_and_bad_files(tmp_path):
    head = random_head(8, 0.5)
    path = head.save(tmp_path / FILENAME)
    assert all(t.dtype == torch.bfloat16 for t in load_file(path).values())
    loaded = DraftHead.load(path, 8)
    for (name, a), b in zip(head.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(a.to(torch.bfloat16).float(), b, msg=name)
    with pytest.raises(RidsError, match="trained for hidden size 8, the base has 16"):
        DraftHead.load(path, 16)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(
        RidsError, match=r"is corrupt .*retrain it with `rids train-draft-head` or delete it"
    ):
        DraftHead.load(bad, 8)
    save_file({"x": torch.zeros(2)}, bad)
    with pytest.raises(RidsError, match="not a draft head"):
        DraftHead.load(bad, 8)
    tensors = load_file(path)
    del tensors["down.bias"]
    save_file(tensors, bad)
    with pytest.raises(RidsError, match="wrong tensors"):
        DraftHead.load(bad, 8)
    assert not list(tmp_path.glob(".*.tmp"))  # saved atomically: no temp file left


def test_verification_chooses_with_the_head_knowing_the_token_committed(
    tiny_base, tiny_adapter, tmp_path, hidden
):
    llm = LLM(tiny_base, head_adapter(tiny_adapter, tmp_path, hidden), page_size=4)
    engine = llm.engine
    head = engine.draft_head
    assert head is not None and engine.num_candidates == TOP_K
    block = StepBlock([5, 0, 0, 0], 8, 0, 3, (0,))  # no drafts: B_0 proposes 3
    table = list(engine.pages.free_page_ids)[: engine.pages.pages_for(block.end)]
    step, logits = engine.runner.run([StepEntry(block, table)])
    (verdict,) = engine.verifier.verify(
        [block], step.inputs, step.dev, logits, {}, True, TOP_K, head
    )
    assert verdict.candidates is None  # chosen on the device: nothing for the host to choose
    candidates = logits.masks.float().topk(TOP_K, -1).indices[None]
    expected, second = head.choose(
        logits.mask_hidden[None], torch.tensor([verdict.token]), candidates
    )
    assert verdict.drafts == expected[0].tolist() and verdict.second == second[0].item()


@pytest.fixture
def hidden(tiny_base) -> int:
    return json.loads((tiny_base / "config.json").read_text())["hidden_size"]


@pytest.mark.parametrize("branches", ["off", "all"])
def test_drafts_chosen_by_a_head_keep_generations_identical_to_transformers(
    tiny_base, tiny_adapter, tmp_path, branches, hidden, monkeypatch
):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 200) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    llm = LLM(
        tiny_base, head_adapter(tiny_adapter, tmp_path, hidden), page_size=4, branches=branches
    )
    llm.engine.policy.cost = GPU_LIKE_COSTS  # drafts in every step, whatever this machine does
    changed, verify = [], Verifier.verify

    def recording(self, *args, **kwargs):  # the verdicts' drafts against the step's argmax's
        verdicts = verify(self, *args, **kwargs)
        argmax = verify(self, *args, **{**kwargs, "head": None})
        changed.extend(v.drafts != a.drafts for v, a in zip(verdicts, argmax, strict=True))
        return verdicts

    monkeypatch.setattr(Verifier, "verify", recording)
    reference = hf_greedy(tiny_base, prompts, 40)
    for stride, batch in [(4, 1), (2, 6), (4, 6)]:
        outs = llm.generate(prompts[:batch], max_new_tokens=40, stride=stride)
        assert [o.token_ids for o in outs] == reference[:batch], (stride, batch)
    assert any(changed)  # the head changed the drafts of some steps' verdicts
    assert llm.engine.pages.num_free_pages == llm.engine.pages.num_pages


def test_requests_that_distrust_the_head_take_the_argmax_drafts_and_stay_identical(
    tiny_base, tiny_adapter, tmp_path, hidden, monkeypatch
):
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 200) for _ in range(rng.randrange(3, 12))] for _ in range(6)]
    llm = LLM(tiny_base, head_adapter(tiny_adapter, tmp_path, hidden), page_size=4)
    policy = llm.engine.policy
    policy.cost = GPU_LIKE_COSTS
    monkeypatch.setattr(policy, "trusts_chooser", lambda seq: rng.random() < 0.5)
    overruled, verify = [], Verifier.verify
    reference = hf_greedy(tiny_base, prompts, 40)
    refs = {tuple(p): r for p, r in zip(prompts, reference, strict=True)}
    advance, record, judged_at = Engine.advance, policy.record_choices, {}

    def advancing(self, seq, block, verdict):  # where the next commit begins
        judged_at[seq.seq_id] = len(seq.completion_ids)
        advance(self, seq, block, verdict)

    def judging(seq, token):  # the choices are judged by the base's token at their position
        assert token == refs[tuple(seq.token_ids[: seq.num_prompt_tokens])][judged_at[seq.seq_id]]
        record(seq, token)

    def checking(self, *args, **kwargs):  # each block's drafts: the argmax's where distrusted
        verdicts = verify(self, *args, **kwargs)
        by_head = verify(self, *args, **{**kwargs, "argmax_blocks": None})
        by_argmax = verify(self, *args, **{**kwargs, "head": None})
        for i, (v, h, a) in enumerate(zip(verdicts, by_head, by_argmax, strict=True)):
            expected = a if i in kwargs["argmax_blocks"] else h
            assert (v.drafts, v.second) == (expected.drafts, expected.second)
            assert v.first_choices == ((h.drafts[0], a.drafts[0]) if v.drafts else None)
            overruled.append(i in kwargs["argmax_blocks"] and h.drafts != a.drafts)
        return verdicts

    monkeypatch.setattr(Verifier, "verify", checking)
    monkeypatch.setattr(Engine, "advance", advancing)
    monkeypatch.setattr(policy, "record_choices", judging)
    for stride, batch in [(4, 1), (3, 6)]:
        outs = llm.generate(prompts[:batch], max_new_tokens=40, stride=stride)
        assert [o.token_ids for o in outs] == reference[:batch], (stride, batch)
    assert any(overruled)  # some distrusted block's argmax drafts were not the head's


def test_a_sampled_request_beside_greedy_ones_draws_the_same_with_or_without_a_head(
    tiny_base, tiny_adapter, tmp_path, prompt_ids, hidden
):
    llm = LLM(tiny_base, head_adapter(tiny_adapter, tmp_path, hidden), page_size=4)
    llm.engine.policy.cost = GPU_LIKE_COSTS
    reference = hf_greedy(tiny_base, prompt_ids[:3], 40)
    check_chooser_leaves_sampling_alone(llm, "draft_head", prompt_ids, reference)


def test_the_head_is_used_by_adaptive_drafting_only(tiny_base, tiny_adapter, tmp_path, hidden):
    adapter = head_adapter(tiny_adapter, tmp_path, hidden)
    assert LLM(tiny_base, adapter).engine.draft_head is not None
    fixed = LLM(tiny_base, adapter, drafting="fixed").engine
    assert fixed.draft_head is None and fixed.num_candidates == 0
    assert LLM(tiny_base, tiny_adapter).engine.draft_head is None  # none beside the adapter
    wrong = tmp_path / "wrong"
    shutil.copytree(tiny_adapter, wrong)
    random_head(hidden + 1, 0.1).save(wrong / FILENAME)
    with pytest.raises(RidsError, match="retrain it with `rids train-draft-head`"):
        LLM(tiny_base, wrong)


def test_mask_rows_are_the_anchors_next_tokens_teacher_forced(tiny_base, tiny_adapter):
    llm = LLM(tiny_base, tiny_adapter, drafting="fixed", branches="off")
    ids = list(range(20, 40))
    trainable = [False] * 6 + [True] * 14  # anchors s = 5..15: x_{s+1}..x_{s+4} all targets
    rows = mask_rows(llm.model, llm.mask_token_id, Document(ids, trainable, ids[:6]), 4, 5)
    assert rows is not None and len(rows) == 11 and rows.anchor.tolist() == list(range(5, 16))
    doc = Document(ids, trainable, ids[:6])
    chunked = mask_rows(llm.model, llm.mask_token_id, doc, 4, 5, anchors_per_pass=4)
    assert chunked is not None and torch.equal(chunked.candidates, rows.candidates)
    torch.testing.assert_close(chunked.hidden, rows.hidden)  # 3 passes over one clean pass
    assert rows.before[0].tolist() == [26, 27, 28] and rows.target[0].tolist() == [27, 28, 29]
    assert rows.hidden.shape == (11, 3, llm.model.config.hidden_size) and rows.candidates.shape == (
        11,
        3,
        5,
    )
    # the first MASK row of anchor s runs where an engine step's first MASK does after x_s
    engine = llm.engine
    mask = llm.mask_token_id
    block = StepBlock([*ids[:6], mask, mask, mask], 0, 0, 3, (0,))  # x_0..x_5, then 3 MASKs
    table = list(engine.pages.free_page_ids)[: engine.pages.pages_for(block.end)]
    _, logits = engine.runner.run([StepEntry(block, table)])
    assert rows.candidates[0, 0].tolist() == logits.masks[0].float().topk(5).indices.tolist()
    assert mask_rows(llm.model, llm.mask_token_id, Document(ids, [False] * 20, []), 4) is None
    share = [
        mask_rows(llm.model, llm.mask_token_id, doc, 4, top_k=5, index=7, anchor_share=0.5)
        for _ in range(2)
    ]
    assert share[0] is not None and share[1] is not None
    kept = share[0].anchor.tolist()  # a random half, the same each time for the same document
    assert kept == share[1].anchor.tolist() and 0 < len(kept) < 11 and set(kept) < set(range(5, 16))
    at = torch.tensor(kept) - 5
    assert torch.equal(share[0].candidates, rows.candidates[at]) and share[0].document.eq(7).all()
    torch.testing.assert_close(share[0].hidden, rows.hidden[at])


def test_training_learns_what_follows_each_token():
    """Rows whose truth is a fixed function of the token before it, hidden among 8 candidates
    in random order: the argmax is right 1 time in 8, a trained head nearly always."""
    torch.manual_seed(0)
    vocab, hidden, count = 64, 16, 4096
    follows = torch.randperm(vocab)
    before = torch.randint(0, vocab, (count, 3))
    target = follows[before]
    candidates = torch.stack([torch.randperm(vocab)[:8] for _ in range(count * 3)]).view(
        count, 3, 8
    )
    slot = torch.randint(0, 8, (count, 3))
    candidates = candidates.masked_fill(candidates == target[..., None], -1)
    candidates.scatter_(-1, slot[..., None], target[..., None])
    candidates = torch.where(candidates < 0, (target[..., None] + 1) % vocab, candidates)
    rows = MaskRows(
        torch.randn(count, 3, hidden).half(), before, target, candidates,
        torch.zeros(count, 3, 8), torch.zeros(count, dtype=torch.long), torch.arange(count),
    )  # fmt: skip
    train, held = (
        MaskRows(*(getattr(rows, f)[s] for f in MaskRows.__slots__))
        for s in (slice(0, 3584), slice(3584, None))
    )
    embed = torch.randn(vocab, hidden)
    head = DraftHead(hidden, 64).bind(embed, embed)
    untrained = acceptance(head_drafts(head, held), held)
    epochs = []
    train_draft_head(head, train, held, epochs=6, lr=3e-3, batch_size=256, on_epoch=epochs.append)
    trained = acceptance(head_drafts(head, held), held)
    assert untrained[0] < 0.3 and trained[0] > 0.9, (untrained, trained)
    assert [e.epoch for e in epochs] == list(range(1, 7)) and epochs[-1].loss < epochs[0].loss
    assert epochs[-1].acceptance == trained
