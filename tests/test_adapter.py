"""PEFT interop (adapters made by `peft` itself) and adapter validation against the base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file, save_file

from rids.adapter import load_adapter
from rids.errors import RidsError
from rids.layers import linear as linear_module
from rids.llm import LLM
from rids.mask_token import resolve_mask_token_id
from rids.tiny import build_random_adapter
from tests.test_model import rids_logits

PEFT_CONFIGS = {
    "all-linear": dict(),
    "qv-rslora-rank4": dict(target_modules=["q_proj", "v_proj"], rank=4, use_rslora=True),
    "mlp-only": dict(target_modules=["gate_proj", "up_proj", "down_proj"]),
    "rank-pattern": dict(rank_pattern={"q_proj": 4, "down_proj": 2}),
    "embed-and-head-lora": dict(target_modules=["q_proj", "o_proj", "embed_tokens", "lm_head"]),
    "mask-row-trainable-tokens": dict(trainable_token_indices={"embed_tokens": ["MASK"]}),
    "modules-to-save": dict(target_modules=["k_proj"], modules_to_save=["embed_tokens", "lm_head"]),
}


@pytest.mark.parametrize("name", list(PEFT_CONFIGS))
def test_ungated_matches_peft_model(tiny_base, tokenizer, tmp_path, name):
    kwargs = dict(PEFT_CONFIGS[name])
    mask_id = tokenizer.convert_tokens_to_ids("<|MASK|>")
    if "trainable_token_indices" in kwargs:
        kwargs["trainable_token_indices"] = {"embed_tokens": [mask_id]}
    adapter = build_random_adapter(tmp_path / "a", tiny_base, seed=3, **kwargs)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, adapter).eval()
    ids = [5, 17, mask_id, 99, 3, mask_id, 250, 41, 8, 120, 64, mask_id, 7]
    with torch.inference_mode():
        want = peft_model(torch.tensor([ids])).logits[0]
        with peft_model.disable_adapter():
            base_logits = peft_model(torch.tensor([ids])).logits[0]
    assert (want - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    llm = LLM(tiny_base, adapter, page_size=4, ungated=True)
    torch.testing.assert_close(rids_logits(llm, ids, split=6), want, atol=1e-4, rtol=0)


def test_gate_keeps_clean_rows_exactly_base(tiny_base, tiny_adapter, prompt_ids):
    """With the gate on MASK rows only, every clean row's logits are the base model's."""
    plain = LLM(tiny_base, page_size=4)
    gated = LLM(tiny_base, tiny_adapter, page_size=4)
    ids = prompt_ids[3]
    torch.testing.assert_close(
        rids_logits(gated, ids, split=7), rids_logits(plain, ids, split=7), atol=0, rtol=0
    )


def corrupt(path):
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)


def set_rank(path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["r"] = 16
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def add_unknown_module(path):
    f = path / "adapter_model.safetensors"
    tensors = load_file(f)
    tensors["base_model.model.model.layers.0.self_attn.rope_proj.lora_A.weight"] = torch.ones(8, 4)
    save_file(tensors, f)


def drop_lora_b(path):
    f = path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(f).items() if "q_proj.lora_B" not in k}, f)


def stamp_other_base(path):
    (path / "rids.json").write_text(
        json.dumps({"base": "other/model", "base_config_hash": "0" * 16})
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda p: shutil.rmtree(p), "not found"),
        (lambda p: (p / "adapter_config.json").unlink(), "no adapter_config.json"),
        (corrupt, "is corrupt"),
        (set_rank, "rank 8 .* says r=16"),
        (add_unknown_module, "rope_proj"),
        (drop_lora_b, "lacks lora_A or lora_B"),
        (stamp_other_base, "was trained for base 'other/model'"),
    ],
)
def test_broken_adapters_are_one_line_errors(tiny_base, tiny_adapter, tmp_path, mutate, message):
    path = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, path)
    mutate(path)
    with pytest.raises(RidsError, match=message) as e:
        LLM(tiny_base, path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (dict(hidden_size=96), "(input|output) size 96, the base has 64"),
        (dict(num_layers=3), "layer 2, the base has 2 layers"),
        (dict(num_kv_heads=4), "k_proj LoRA B has output size 64, the base has 32"),
    ],
)
def test_adapter_for_another_base_is_refused(tiny_base, tiny_factory, tmp_path, other, message):
    adapter = build_random_adapter(tmp_path / "a", tiny_factory(**other))
    with pytest.raises(RidsError, match=message):
        LLM(tiny_base, adapter)


def test_mask_token_resolution_order(tiny_base, tiny_adapter, tokenizer, tmp_path):
    llm = LLM(tiny_base, tiny_adapter)
    assert llm.mask_token_id == tokenizer.convert_tokens_to_ids("<|MASK|>")
    path = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, path)
    (path / "rids.json").write_text(json.dumps({"mask_token_id": 7}))
    assert LLM(tiny_base, path).mask_token_id == 7  # adapter metadata wins
    (path / "rids.json").write_text(json.dumps({"mask_token_id": 10**6}))
    with pytest.raises(RidsError, match="outside the base's embedding table"):
        LLM(tiny_base, path)


def test_mask_token_defaults_and_errors(tiny_base):
    config = LLM(tiny_base).config
    with pytest.raises(RidsError, match=r"151669 .* outside"):  # the Qwen3 default needs that row
        resolve_mask_token_id(config, None, None)
    config.model_type = "llama"
    with pytest.raises(RidsError, match="no MASK token"):
        resolve_mask_token_id(config, None, None)
    config.mask_token_id = 11
    assert resolve_mask_token_id(config, None, None) == (11, "the base config")


def test_a_named_mask_id_spares_the_tokenizer_vocabulary(tiny_base):
    """The tokenizer's whole vocabulary (151k entries for Qwen3) is built only when neither
    the adapter nor the base config names the MASK id."""

    class Tokenizer:
        reads = 0

        def get_vocab(self) -> dict[str, int]:
            Tokenizer.reads += 1
            return {"<|MASK|>": 5}

    config = LLM(tiny_base).config
    assert resolve_mask_token_id(config, 7, Tokenizer()) == (7, "the adapter")
    assert Tokenizer.reads == 0
    assert resolve_mask_token_id(config, None, Tokenizer()) == (5, "the tokenizer's <|MASK|>")
    assert Tokenizer.reads == 1


@pytest.mark.skipif(not linear_module.ONEDNN, reason="oneDNN packing is CPU-build specific")
def test_swapping_adapters_packs_each_layer_once_and_equals_a_fresh_load(
    tiny_base, tiny_adapter, tmp_path, monkeypatch
):
    """`set_adapter` on a packed engine: each adapted layer packs [W; A] once (no pass through
    the cleared state), a layer the new adapter leaves alone packs W alone, and the logits are
    those of an engine loaded with the new adapter."""
    other = build_random_adapter(tmp_path / "attn", tiny_base, rank=4, target_modules=["q_proj"])
    llm = LLM(tiny_base, tiny_adapter, ungated=True)
    adapted = [layer for layer in llm.engine.runner.linear_layers() if layer.packed_rank]
    assert adapted
    packs = []
    real = linear_module.pack
    monkeypatch.setattr(linear_module, "pack", lambda w: packs.append(w.shape) or real(w))
    llm.set_adapter(load_adapter(other, llm.model))
    assert len(packs) == len(adapted)  # each adapted layer changes once (no cleared state)
    ids = [5, 17, 3, 99, 3, 41, 8, 120]
    fresh = LLM(tiny_base, other, ungated=True)
    assert torch.equal(rids_logits(llm, ids, 4), rids_logits(fresh, ids, 4))
    packs.clear()
    llm.set_adapter(load_adapter(tiny_adapter, llm.model))
    assert len(packs) == len(adapted)
