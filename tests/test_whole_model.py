"""Whole-model I-DLM checkpoints (SDAR configs): read as Qwen3, no remote code, plain ISD."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from typer.testing import CliRunner

from rids.errors import RidsError
from rids.llm import LLM
from rids_cli.main import app
from tests.conftest import hf_greedy

TRAP = 'raise RuntimeError("rids executed a file from the checkpoint")\n'


@pytest.fixture(scope="module")
def sdar(tiny_base, tokenizer, tmp_path_factory):
    """A tiny checkpoint laid out like yifanyu/I-DLM-8B: SDAR config, auto_map, shards."""
    path = tmp_path_factory.mktemp("sdar") / "I-DLM-tiny"
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.save_pretrained(path, max_shard_size="60KB")
    tokenizer.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config |= {
        "model_type": "sdar",
        "architectures": ["SDARForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_sdar.SDARConfig",
            "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM",
        },
        "mask_token_id": tokenizer.convert_tokens_to_ids("<|MASK|>"),
        "block_size": 4,
    }
    (path / "config.json").write_text(json.dumps(config))
    for name in ("configuration_sdar.py", "modeling_sdar.py"):
        (path / name).write_text(TRAP)
    return path


def test_sdar_checkpoint_loads_as_qwen3_without_its_code(sdar, tiny_base, prompt_ids):
    assert len(list(sdar.glob("model-*.safetensors"))) > 2
    llm = LLM(sdar)
    assert llm.config.model_type == "sdar" and llm.config.qk_norm
    assert llm.default_stride == 4 and llm.mask_source == "the base config"
    want = LLM(tiny_base).generate(prompt_ids[:3], max_new_tokens=12)
    got = llm.generate(prompt_ids[:3], max_new_tokens=12, stride=1)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


@pytest.mark.parametrize("stride", [2, 4, 8])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_plain_isd_equals_its_own_greedy(sdar, tiny_base, prompt_ids, stride, batch_size):
    want = hf_greedy(tiny_base, prompt_ids, 32)  # the same weights, loaded by transformers
    llm = LLM(sdar, page_size=4)
    outs = []
    for i in range(0, len(prompt_ids), batch_size):
        outs += llm.generate(prompt_ids[i : i + batch_size], max_new_tokens=32, stride=stride)
    assert [o.token_ids for o in outs] == want


def test_verify_lossless_on_a_whole_model_checkpoint(sdar):
    result = CliRunner().invoke(
        app,
        ["verify-lossless", "--base", str(sdar), "--strides", "2,4,8", "--batch-sizes", "1,4",
         "--max-new-tokens", "16"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "lossless" in result.output
    # strides other than the trained block_size are explained, not refused
    assert "note: stride 8: this model's MASK proposals were trained for stride 4" in result.output


def test_sdar_without_any_mask_token_is_one_line(sdar, tmp_path):
    path = tmp_path / "nomask"
    shutil.copytree(sdar, path)
    config = json.loads((path / "config.json").read_text())
    del config["mask_token_id"]
    (path / "config.json").write_text(json.dumps(config))
    tok = json.loads((path / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|MASK|>"]
    tok["model"]["vocab"].pop("<|MASK|>", None)
    (path / "tokenizer.json").write_text(json.dumps(tok))
    llm = LLM(path)  # AR still works: there is just no MASK to propose with
    with pytest.raises(RidsError, match=r"needs a gated adapter .* or a whole-model ISD") as e:
        llm.generate([[1, 2, 3]], stride=4)
    assert "mask_token_id in config.json" in str(e.value) and "\n" not in str(e.value)


def test_unknown_architecture_names_the_supported_ones(sdar, tmp_path):
    path = tmp_path / "other"
    shutil.copytree(sdar, path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "llada"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        RidsError, match=r"unsupported architecture 'llada'.*'llama', 'qwen3', 'sdar'"
    ):
        LLM(path)
