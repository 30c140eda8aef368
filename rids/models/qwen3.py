"""Qwen3 / Llama decoder over flat token batches, with gated LoRA on every projection.

Module names mirror `transformers` so checkpoint keys map directly; q/k/v and gate/up are fused
(`packed_modules_mapping`). Qwen3 is Llama plus a per-head RMSNorm on q and k (`config.qk_norm`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rids.config import ModelConfig
from rids.layers.attention import Attention
from rids.layers.embedding import GatedEmbedding
from rids.layers.linear import GatedLinear
from rids.layers.norm import RMSNorm
from rids.layers.rotary import RotaryEmbedding, apply_rotary
from rids.utils.context import get_context

Rotary = tuple[torch.Tensor, torch.Tensor]  # cos, sin of this forward's positions


class Qwen3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        h, hk, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.sizes = [h * d, hk * d, hk * d]
        self.shape = (h, hk, d)
        bias = config.attention_bias
        self.qkv_proj = GatedLinear(config.hidden_size, self.sizes, bias, ("q", "k", "v"))
        self.o_proj = GatedLinear(h * d, config.hidden_size, bias)
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.attn = Attention(layer_id, h, hk, d)

    def forward(self, rotary: Rotary, x: torch.Tensor, gated: int) -> torch.Tensor:
        h, hk, d = self.shape
        q, k, v = self.qkv_proj(x, gated).split(self.sizes, dim=-1)
        q, k, v = q.view(-1, h, d), k.view(-1, hk, d), v.view(-1, hk, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, rotary)
        return self.o_proj(self.attn(q, k, v).reshape(-1, h * d), gated)


class Qwen3MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        i, bias = config.intermediate_size, config.mlp_bias
        self.gate_up_proj = GatedLinear(config.hidden_size, [i, i], bias, ("gate", "up"))
        self.down_proj = GatedLinear(i, config.hidden_size, bias)

    def forward(self, x: torch.Tensor, gated: int) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, gated).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up, gated)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer_id)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rotary: Rotary, x: torch.Tensor, gated: int) -> torch.Tensor:
        x = x + self.self_attn(rotary, self.input_layernorm(x), gated)
        return x + self.mlp(self.post_attention_layernorm(x), gated)


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.rotary = RotaryEmbedding(config.hf_config, config.head_dim)
        self.embed_tokens = GatedEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        gated = get_context().num_gated
        x = self.embed_tokens(input_ids, gated)
        rotary = self.rotary.cos_sin(positions, x.dtype)  # once per forward, for every layer
        for layer in self.layers:
            x = layer(rotary, x, gated)
        return self.norm(x)


class Qwen3ForCausalLM(nn.Module):
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = GatedLinear(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, hidden] of a flat token batch (metadata in the context).

        Gated (MASK) tokens come last; attention metadata maps every token to its sequence."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor, num_gated: int = 0) -> torch.Tensor:
        """Logits of selected final hidden states; the last num_gated rows are MASKs."""
        return self.lm_head(hidden, num_gated)

    def resolve(self, hf_name: str) -> tuple[nn.Module, str | None]:
        """Map an HF module path (`model.layers.0.self_attn.q_proj`) to (our module, shard)."""
        parent, _, leaf = hf_name.rpartition(".")
        if leaf in self.packed_modules_mapping:
            fused, shard = self.packed_modules_mapping[leaf]
            return self.get_submodule(f"{parent}.{fused}"), shard
        return self.get_submodule(hf_name), None

    def clear_adapter(self) -> None:
        for m in self.modules():
            if isinstance(m, (GatedLinear, GatedEmbedding)):
                m.clear_adapter()
