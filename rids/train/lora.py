"""A fresh trainable gated adapter in PEFT layout (A Kaiming-uniform, B zero)."""

from __future__ import annotations

import math

import torch
from torch import nn

from rids.adapter import Adapter, base_config_hash
from rids.errors import RidsError
from rids.layers.linear import LoraWeights, RowOverride
from rids.models.qwen3 import Qwen3ForCausalLM

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def module_names(model: Qwen3ForCausalLM, targets: tuple[str, ...]) -> list[str]:
    names = []
    for i in range(model.config.num_hidden_layers):
        for leaf in targets:
            kind = "self_attn" if leaf in ATTENTION else "mlp"
            names.append(f"model.layers.{i}.{kind}.{leaf}")
    return names


def init_lora_a(rows: int, in_features: int, gen: torch.Generator) -> torch.Tensor:
    """Fresh rows of LoRA A: kaiming_uniform(a=sqrt(5)), as PEFT (B starts at zero)."""
    bound = 1 / math.sqrt(in_features)
    return torch.empty(rows, in_features).uniform_(-bound, bound, generator=gen)


def new_adapter(
    model: Qwen3ForCausalLM,
    *,
    rank: int,
    alpha: float,
    mask_token_id: int,
    targets: tuple[str, ...] = ALL_LINEAR,
    train_mask_embedding: bool = True,
    seed: int = 0,
    base_name: str | None = None,
) -> Adapter:
    """LoRA on `targets` of every layer (fp32 parameters), plus a trainable MASK input row."""
    gen = torch.Generator().manual_seed(seed)
    adapter = Adapter(
        path=None,
        config={"r": rank, "lora_alpha": alpha, "base_model_name_or_path": base_name},
        metadata={
            "mask_token_id": mask_token_id,
            "base": base_name,
            "base_config_hash": base_config_hash(model),
        },
    )
    device = model.lm_head.weight.device
    for name in module_names(model, targets):
        module, shard = model.resolve(name)
        adapter.loras[name] = LoraWeights(
            nn.Parameter(init_lora_a(rank, module.in_features, gen).to(device)),
            nn.Parameter(torch.zeros(module.shard_size(shard), rank, device=device)),
            alpha / rank,
        )
    if train_mask_embedding:
        row = model.model.embed_tokens.weight[mask_token_id].detach().float().clone()
        adapter.overrides["model.embed_tokens"] = RowOverride(
            torch.tensor([mask_token_id], device=device), nn.Parameter(row[None])
        )
    return adapter


def trainable(adapter: Adapter) -> Adapter:
    """The same adapter with fp32 parameters that require grad (to train a loaded adapter on)."""
    for name, w in adapter.loras.items():
        adapter.loras[name] = LoraWeights(
            nn.Parameter(w.A.detach().float()), nn.Parameter(w.B.detach().float()), w.scaling
        )
    for name, o in adapter.overrides.items():
        adapter.overrides[name] = RowOverride(o.ids, nn.Parameter(o.values.detach().float()))
    return adapter


def grow_rank(adapter: Adapter, rank: int, seed: int = 0) -> Adapter:
    """The same adapter at a higher `rank`, computing the same function: each A gains
    Kaiming-uniform rows and each B zero columns (PEFT's fresh-LoRA init for the new part, so
    training continues from where the adapter was and the added rank learns from the first
    step); lora_alpha keeps every layer's scaling."""
    if rank < adapter.rank:
        raise RidsError(
            f"--rank {rank} is below the initial adapter's rank {adapter.rank}; training cannot "
            f"shrink it (`rids merge --method svd --rank {rank}` can)"
        )
    if adapter.config.get("use_rslora") or adapter.config.get("rank_pattern"):
        raise RidsError("growing the rank of an rsLoRA or per-module-rank adapter is unsupported")
    gen = torch.Generator().manual_seed(seed)
    extra = rank - adapter.rank
    for name, w in adapter.loras.items():
        A = torch.cat([w.A.detach(), init_lora_a(extra, w.A.shape[1], gen).to(w.A)])
        B = torch.cat([w.B.detach(), w.B.new_zeros(w.B.shape[0], extra)], dim=1)
        adapter.loras[name] = LoraWeights(nn.Parameter(A), nn.Parameter(B), w.scaling)
    scaling = float(adapter.config.get("lora_alpha", adapter.rank)) / adapter.rank
    adapter.config |= {"r": rank, "lora_alpha": scaling * rank}
    return adapter
