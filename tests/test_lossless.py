"""R-ISD greedy output is token-identical to `transformers` greedy `generate` (fp32, CPU).

The adapter has random non-zero LoRA weights, so the MASK path really differs from the base.
Its drafts are almost never accepted, so a second family of runs replaces the MASK proposals by
a noisy oracle (the base's own continuation, corrupted at random): verification, partial
acceptance, bonus tokens and KV truncation then all happen, still checked against `generate`.
"""

from __future__ import annotations

import pytest

from rids.llm import LLM
from tests.conftest import GPU_LIKE_COSTS, hf_greedy, noisy, oracle_drafter

MAX_NEW = 48


@pytest.fixture(
    scope="module",
    params=[("fixed", "off"), ("fixed", "all"), ("fixed", 1), ("adaptive", "auto"),
            ("adaptive", "off")],
    ids=lambda p: f"{p[0]}-{p[1]}",
)  # fmt: skip
def llm(request, tiny_base, tiny_adapter) -> LLM:
    # small pages: blocks cross page boundaries; every drafting and MASK-branch mode must be
    # lossless (adaptive: blocks of every size the policy picks, AR steps and probes included)
    drafting, branches = request.param
    llm = LLM(tiny_base, tiny_adapter, page_size=4, branches=branches, drafting=drafting)
    if llm.engine.policy.cost is not None:
        llm.engine.policy.cost = GPU_LIKE_COSTS
    return llm


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def run(llm: LLM, prompts: list[list[int]], stride: int, batch_size: int) -> list:
    outs = []
    for batch in batches(prompts, batch_size):
        outs += llm.generate(batch, max_new_tokens=MAX_NEW, stride=stride)
    assert llm.engine.pages.num_free_pages == llm.engine.pages.num_pages
    return outs


@pytest.mark.parametrize("stride", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_random_adapter_is_lossless(llm, prompt_ids, reference, stride, batch_size):
    llm.engine.drafter = None
    outs = run(llm, prompt_ids, stride, batch_size)
    assert [o.token_ids for o in outs] == reference


@pytest.mark.parametrize("stride", [2, 3, 4, 8])
@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_accepting_drafts_is_lossless(llm, prompt_ids, reference, stride, batch_size):
    refs = {tuple(p): r for p, r in zip(prompt_ids, reference, strict=True)}
    llm.engine.drafter = oracle_drafter(refs, noisy(0.25, seed=stride * 10 + batch_size))
    try:
        outs = run(llm, prompt_ids, stride, batch_size)
    finally:
        llm.engine.drafter = None
    assert [o.token_ids for o in outs] == reference
    stats = [o.stats for o in outs]
    assert sum(s.decode_tokens for s in stats) > sum(s.decode_steps for s in stats) * 1.3
    assert any(s.drafts_accepted[0] < s.drafts_verified[0] for s in stats)  # rejections too


def test_mixed_strides_in_one_batch(llm, prompt_ids, reference):
    seqs = [
        llm.make_sequence(p, max_new_tokens=MAX_NEW, stride=n)
        for p, n in zip(prompt_ids, [1, 2, 3, 4, 8, 2, 5, 1], strict=True)
    ]
    for s in seqs:
        llm.engine.add(s)
    while not llm.engine.scheduler.is_finished():
        llm.engine.step()
    assert [s.completion_ids for s in seqs] == reference


def test_stops_at_eos_like_generate(tiny_base, tiny_adapter, prompt_ids, reference):
    eos = reference[0][5]  # a token the greedy continuation of prompt 0 emits early
    model_eos = LLM(tiny_base).eos_token_ids
    want = hf_greedy(tiny_base, prompt_ids, MAX_NEW, eos=[*model_eos, eos])
    assert len(want[0]) <= 6
    llm = LLM(tiny_base, tiny_adapter, page_size=4)
    for stride in (1, 4):
        outs = llm.generate(prompt_ids, max_new_tokens=MAX_NEW, stride=stride, stop_token_ids=[eos])
        assert [o.token_ids for o in outs] == want
        assert outs[0].finish_reason == "stop"


def test_llama_base_is_lossless(tiny_factory, tmp_path, prompt_ids):
    from rids.tiny import build_random_adapter

    base = tiny_factory(model_type="llama", tie_word_embeddings=True)
    adapter = build_random_adapter(tmp_path / "a", base, rank=4)
    want = hf_greedy(base, prompt_ids, 24)
    llm = LLM(base, adapter, page_size=8)
    for stride in (2, 4):
        outs = llm.generate(prompt_ids, max_new_tokens=24, stride=stride)
        assert [o.token_ids for o in outs] == want


def test_llama_bos_prompts_are_what_transformers_users_send(tiny_factory, tmp_path):
    """A tokenizer that adds BOS (Llama style): string prompts get it exactly once, chat
    prompts get it from the template only, and R-ISD from a string equals `generate` on
    `tokenizer(text)`, what `transformers` users send."""
    from transformers import AutoTokenizer

    from rids.tiny import build_random_adapter
    from rids.verify import encode_prompts

    base = tiny_factory(model_type="llama", add_bos=True)
    tok = AutoTokenizer.from_pretrained(base)
    llm = LLM(base, build_random_adapter(tmp_path / "a", base, rank=4), page_size=8)
    texts = ["The quick brown fox", "Water boils at", "One, two,"]
    for text in texts:
        assert llm.encode(text) == tok(text).input_ids and llm.encode(text)[0] == tok.bos_token_id
    chat = llm.encode_chat([{"role": "user", "content": texts[0]}])
    assert chat[0] == tok.bos_token_id and chat.count(tok.bos_token_id) == 1
    assert encode_prompts(llm, texts[:1]) == [chat]
    want = hf_greedy(base, [tok(t).input_ids for t in texts], 24)
    for stride in (1, 4):
        outs = llm.generate(texts, max_new_tokens=24, stride=stride)
        assert [o.token_ids for o in outs] == want
