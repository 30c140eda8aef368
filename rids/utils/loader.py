"""Build the model and load HF safetensors checkpoints (single file or sharded)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rids.config import ModelConfig
from rids.errors import RidsError
from rids.layers.linear import GatedLinear
from rids.models.qwen3 import Qwen3ForCausalLM


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RidsError(f"{path} not found") from None
    except json.JSONDecodeError as e:
        raise RidsError(f"{path} is not valid JSON ({e}); re-download or re-export it") from None


def load_model_config(path: Path) -> ModelConfig:
    if not (path / "config.json").is_file():
        raise RidsError(f"{path} has no config.json; point --base at an HF model folder or hub id")
    return ModelConfig.from_dict(read_json(path / "config.json"))


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise RidsError(f"{path} is missing shards {missing}; re-download the checkpoint")
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise RidsError(f"{path} has no *.safetensors weights (convert .bin checkpoints first)")
    return files


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def load_model(
    path: Path, config: ModelConfig, device: str | torch.device, dtype: torch.dtype
) -> Qwen3ForCausalLM:
    """Build the model on `device` in `dtype` and stream weights in tensor by tensor."""
    with torch.device(device), default_dtype(dtype):
        model = Qwen3ForCausalLM(config)
    names = {id(m): n for n, m in model.named_modules()}
    expected = set()
    for name, _ in model.named_parameters():  # a tied weight appears once
        module_name, _, param = name.rpartition(".")
        module = model.get_submodule(module_name)
        shards = module.shards if isinstance(module, GatedLinear) and param == "weight" else {}
        expected |= {f"{name}{':' + s if s else ''}" for s in shards or [""]}
    loaded: set[str] = set()
    for file in safetensors_files(path):
        try:
            with safe_open(file, "pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    loaded.add(load_tensor(model, names, name, f.get_tensor(name)))
        except SafetensorError as e:
            raise RidsError(f"{file} is corrupt ({e}); re-download the checkpoint") from None
    missing = sorted(expected - loaded)
    if missing:
        raise RidsError(f"{path} lacks weights for {missing[:3]} ({len(missing)} in all)")
    return model.eval()


def load_tensor(
    model: Qwen3ForCausalLM, names: dict[int, str], name: str, tensor: torch.Tensor
) -> str:
    """Copy one checkpoint tensor into the model; returns the key of what it filled."""
    module_name, _, param = name.rpartition(".")
    if name.endswith("rotary_emb.inv_freq") or (
        name == "lm_head.weight" and model.config.tie_word_embeddings
    ):
        return ""
    try:
        module, shard = model.resolve(module_name)
        target = getattr(module, param)
        assert isinstance(target, torch.Tensor)
    except (AttributeError, AssertionError):
        raise RidsError(
            f"checkpoint tensor {name!r} has no place in a {model.config.model_type} model; "
            "does config.json belong to these weights?"
        ) from None
    expect = tuple(target.shape)
    if isinstance(module, GatedLinear):
        expect = (module.shard_size(shard), *expect[1:])
    if tuple(tensor.shape) != expect:
        raise RidsError(
            f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
            f"{expect}; config and weights disagree"
        )
    with torch.no_grad():
        if isinstance(module, GatedLinear):
            module.load_weight(param, tensor, shard)
        else:
            target.copy_(tensor)
    return f"{names[id(module)]}.{param}{':' + shard if shard and param == 'weight' else ''}"
