"""Finding checkpoints (local folder, hub cache) and loading them (single file, sharded)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from rids.errors import RidsError
from rids.llm import LLM
from rids.utils.hub import resolve_path
from tests.test_model import rids_logits


def as_hub_snapshot(folder, cache, repo: str, revision: str = "0" * 40):
    """Lay `folder` out as huggingface_hub's cache does: models--org--name/{refs,snapshots}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / revision)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)


def test_resolve_local_folder(tiny_base):
    assert resolve_path(tiny_base) == tiny_base


def test_resolve_from_hub_cache(tiny_base, tiny_adapter, tmp_path, monkeypatch, prompt_ids):
    as_hub_snapshot(tiny_base, tmp_path, "someorg/tiny-qwen3")
    as_hub_snapshot(tiny_adapter, tmp_path, "someorg/tiny-qwen3-lora")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    path = resolve_path("someorg/tiny-qwen3")
    assert path.parent.name == "snapshots" and (path / "config.json").is_file()
    llm = LLM("someorg/tiny-qwen3", "someorg/tiny-qwen3-lora")
    local = LLM(tiny_base, tiny_adapter)
    got = llm.generate(prompt_ids[:2], max_new_tokens=8, stride=3)
    want = local.generate(prompt_ids[:2], max_new_tokens=8, stride=3)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_missing_everywhere_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RidsError, match="not in the Hugging Face cache") as e:
        resolve_path("nobody/nothing", "base model")
    assert "\n" not in str(e.value)
    with pytest.raises(RidsError, match="not a hub id"):
        resolve_path(tmp_path / "nope")


def test_sharded_checkpoint_loads(tiny_base, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    shutil.copy(tiny_base / "tokenizer.json", tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ids = list(range(3, 30))
    torch.testing.assert_close(
        rids_logits(LLM(tmp_path), ids, 5), rids_logits(LLM(tiny_base), ids, 5), atol=0, rtol=0
    )


def test_incomplete_checkpoints_are_refused(tiny_base, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(RidsError, match="missing shards"):
        LLM(tmp_path)
    shard.write_bytes(b"\x01" * 64)
    with pytest.raises(RidsError, match="is corrupt"):
        LLM(tmp_path)


def test_unknown_architecture_is_refused(tiny_base, tmp_path):
    shutil.copytree(tiny_base, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    supported = r"\['llama', 'qwen3', 'sdar'\]"
    with pytest.raises(RidsError, match=rf"unsupported architecture 'gpt2'.*{supported}"):
        LLM(tmp_path / "m")


def test_request_validation(tiny_base, tiny_adapter):
    llm = LLM(tiny_base, tiny_adapter)
    with pytest.raises(RidsError, match=r"stride N must be an integer in 1\.\.32"):
        llm.generate([[1, 2]], stride=0)
    with pytest.raises(RidsError, match=r"stride N must be an integer in 1\.\.32"):
        llm.generate([[1, 2]], stride=33)
    with pytest.raises(RidsError, match="exceeds the model's context of 512"):
        llm.generate([[1] * 500], max_new_tokens=20)
    with pytest.raises(RidsError, match="empty prompt"):
        llm.generate([[]])
    with pytest.raises(RidsError, match="needs a gated adapter"):
        LLM(tiny_base).generate([[1, 2]], stride=2)
