"""Our Qwen3/Llama decoder against `transformers` on the same weights (fp32, CPU, 1e-4)."""

from __future__ import annotations

import pytest
import torch
import transformers

import rids.layers.linear as linear_module
from rids.engine.sequence import Sequence
from rids.engine.step_block import StepBlock
from rids.engine.step_inputs import StepEntry
from rids.llm import LLM

CONFIGS = {
    "qwen3-gqa2": dict(),
    "qwen3-mha-tied": dict(num_kv_heads=4, tie_word_embeddings=True),
    "qwen3-gqa4-hd32": dict(num_heads=8, num_kv_heads=2, head_dim=32, hidden_size=96),
    "qwen3-mqa-hd8": dict(num_heads=4, num_kv_heads=1, head_dim=8, num_layers=3),
    "llama-gqa3-tied": dict(
        model_type="llama",
        num_heads=6,
        num_kv_heads=2,
        head_dim=16,
        hidden_size=96,
        tie_word_embeddings=True,
    ),
}


def rids_logits(llm: LLM, ids: list[int], split: int) -> torch.Tensor:
    """Logits at every position: a prefill of ids[:split], then the rest as one cached block."""
    seq = Sequence(0, ids, max_new_tokens=1, stride=1)
    pages, runner = llm.engine.pages, llm.engine.runner
    out = []
    # a block whose "drafts" are the remaining tokens asks for logits at every row
    for start, stop in ((0, split), (split, len(ids))):
        block = StepBlock(ids[start:stop], start, stop - start - 1)
        pages.allocate(seq, stop)
        out.append(runner.run([StepEntry(block, seq.page_table)])[1].verify)
    pages.deallocate(seq)
    return torch.cat(out)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tiny_factory, name):
    base = tiny_factory(**CONFIGS[name])
    hf = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    llm = LLM(base, page_size=4)
    torch.manual_seed(0)
    ids = torch.randint(0, llm.config.vocab_size, (37,)).tolist()
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    got = rids_logits(llm, ids, split=13)  # page boundary inside both parts
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_batched_ragged_blocks_match_single(tiny_base):
    """Several sequences of different lengths in one forward give each its own logits."""
    llm = LLM(tiny_base, page_size=4)
    torch.manual_seed(1)
    seqs_ids = [torch.randint(0, 300, (n,)).tolist() for n in (3, 17, 9)]
    single = [rids_logits(llm, ids, split=len(ids) - 1) for ids in seqs_ids]
    pages, runner = llm.engine.pages, llm.engine.runner
    seqs = [Sequence(i, ids, max_new_tokens=1, stride=1) for i, ids in enumerate(seqs_ids)]
    entries = []
    for s, ids in zip(seqs, seqs_ids, strict=True):
        pages.allocate(s, len(ids))
        entries.append(StepEntry(StepBlock(ids, 0, len(ids) - 1), s.page_table))
    batched = runner.run(entries)[1].verify.split([len(i) for i in seqs_ids])
    for b, s in zip(batched, single, strict=True):
        torch.testing.assert_close(b, s, atol=1e-5, rtol=0)


@pytest.mark.skipif(
    not linear_module.packable(torch.empty(0, dtype=torch.bfloat16)),
    reason="this CPU has no native bfloat16 GEMM for oneDNN to pack",
)
def test_bfloat16_on_cpu_packs_its_weights_and_keeps_their_numbers(
    tiny_base, tiny_adapter, monkeypatch
):
    """bfloat16 on a CPU with native kernels: every weight packed (the adapter's A beside it),
    and logits and R-ISD text bit for bit what the unpacked weights give."""
    packed = LLM(tiny_base, tiny_adapter, dtype="bfloat16", drafting="fixed", branches="off")
    layers = packed.engine.runner.linear_layers()
    assert all(layer.packed is not None for layer in layers)
    assert any(layer.packed_rank for layer in layers)
    monkeypatch.setattr(linear_module, "PACKABLE_DTYPES", (torch.float32,))
    plain = LLM(tiny_base, tiny_adapter, dtype="bfloat16", drafting="fixed", branches="off")
    assert all(layer.packed is None for layer in plain.engine.runner.linear_layers())
    torch.manual_seed(3)
    ids = torch.randint(0, packed.config.vocab_size, (29,)).tolist()
    assert torch.equal(rids_logits(packed, ids, 11), rids_logits(plain, ids, 11))
    prompts = [ids[:5], ids[:17], ids]
    runs = [
        [o.token_ids for o in llm.generate(prompts, max_new_tokens=24, stride=4)]
        for llm in (packed, plain)
    ]
    assert runs[0] == runs[1]
