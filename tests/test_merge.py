"""`rids merge`: folding (plain ISD, lossless only against itself) and combining adapters."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from typer.testing import CliRunner

from rids.adapter import load_adapter
from rids.errors import RidsError
from rids.llm import LLM
from rids.merge import combine_adapters, fold_adapter
from rids.tiny import build_random_adapter
from rids_cli.main import app
from tests.test_model import rids_logits


@pytest.fixture(scope="module")
def masked_adapter(tiny_base, tokenizer, tmp_path_factory):
    """A PEFT adapter with LoRA everywhere and a trained MASK row (trainable tokens)."""
    mask_id = tokenizer.convert_tokens_to_ids("<|MASK|>")
    return build_random_adapter(
        tmp_path_factory.mktemp("a") / "a", tiny_base, rank=4, std=0.05,
        trainable_token_indices={"embed_tokens": [mask_id]},
    )  # fmt: skip


@pytest.fixture(scope="module")
def merged(tiny_base, masked_adapter, tmp_path_factory):
    return fold_adapter(tiny_base, masked_adapter, tmp_path_factory.mktemp("m") / "merged")


def test_folded_logits_equal_the_adapter_applied_everywhere(tiny_base, masked_adapter, merged):
    ids = [5, 17, 3, 99, 3, 41, 8, 120, 64, 3, 77]
    want = rids_logits(LLM(tiny_base, masked_adapter, ungated=True), ids, 5)
    torch.testing.assert_close(rids_logits(LLM(merged), ids, 5), want, atol=1e-4, rtol=0)
    config = json.loads((merged / "config.json").read_text())
    assert config["mask_token_id"] == 3
    assert transformers.AutoModelForCausalLM.from_pretrained(merged) is not None


def test_folded_checkpoint_is_plain_isd_lossless_only_against_itself(tiny_base, merged):
    runner = CliRunner()
    common = ["verify-lossless", "--base", str(merged), "--strides", "2,4", "--batch-sizes", "1,3"]
    common += ["--max-new-tokens", "24"]
    itself = runner.invoke(app, common)
    assert itself.exit_code == 0, itself.output  # plain ISD == its own greedy AR
    against_base = runner.invoke(app, [*common, "--reference", str(tiny_base)])
    assert against_base.exit_code == 1 and "MISMATCH" in against_base.output


def deltas(adapter) -> dict[str, torch.Tensor]:
    return {n: (w.B @ w.A) * w.scaling for n, w in adapter.loras.items()}


def test_cat_combination_is_exact(tiny_base, masked_adapter, tmp_path):
    llm = LLM(tiny_base)
    other = build_random_adapter(tmp_path / "b", tiny_base, rank=2, std=0.05, seed=1,
                                 target_modules=["q_proj", "down_proj"])  # fmt: skip
    out = combine_adapters(llm, [masked_adapter, other], [0.7, 0.3], tmp_path / "cat")
    a, b, c = (load_adapter(p, llm.model) for p in (masked_adapter, other, out))
    da, db, dc = deltas(a), deltas(b), deltas(c)
    for name, got in dc.items():
        want = 0.7 * da[name] + (0.3 * db[name] if name in db else 0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert c.rank == 6 and c.overrides  # ranks add up; the MASK row travels along


def test_svd_combination_hits_the_target_rank(tiny_base, masked_adapter, tmp_path):
    llm = LLM(tiny_base)
    other = build_random_adapter(tmp_path / "b", tiny_base, rank=4, std=0.05, seed=2)
    full = combine_adapters(llm, [masked_adapter, other], [1, 1], tmp_path / "s8", "svd", rank=8)
    low = combine_adapters(llm, [masked_adapter, other], [1, 1], tmp_path / "s2", "svd", rank=2)
    a, b = (load_adapter(p, llm.model) for p in (masked_adapter, other))
    want = {n: d + deltas(b)[n] for n, d in deltas(a).items()}
    exact, approx = (deltas(load_adapter(p, llm.model)) for p in (full, low))
    for name, w in want.items():
        torch.testing.assert_close(exact[name], w, atol=1e-5, rtol=1e-4)  # rank 8 = 4 + 4
        s = torch.linalg.svdvals(w)
        err = torch.linalg.matrix_norm(approx[name] - w)
        torch.testing.assert_close(err, s[2:].norm(), atol=1e-5, rtol=1e-4)  # Eckart-Young
    assert load_adapter(low, llm.model).rank == 2


def test_merge_errors(tiny_base, masked_adapter, merged, tmp_path):
    with pytest.raises(RidsError, match="is not empty"):
        fold_adapter(tiny_base, masked_adapter, merged)
    llm = LLM(tiny_base)
    with pytest.raises(RidsError, match="1 --weights for 2"):
        combine_adapters(llm, [masked_adapter, masked_adapter], [1.0], tmp_path / "x")
    with pytest.raises(RidsError, match="cat or svd"):
        combine_adapters(llm, [masked_adapter, masked_adapter], [1, 1], tmp_path / "x", "ties")
    args = ["merge", "--base", tiny_base, "--adapter", masked_adapter, "--adapter", masked_adapter]
    args += ["--weights", "a,b", "--output", tmp_path / "y"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 1 and "--weights must be" in result.output
