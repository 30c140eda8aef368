"""Rotary position embedding; inverse frequencies come from `transformers` for every RoPE type.

cos/sin are computed once per forward (`RotaryEmbedding.cos_sin`) and applied in every layer.
"""

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def rope_inv_freq(config: PretrainedConfig, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params["rope_theta"]
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions, and RoPE on q and k of shape [tokens, heads, head_dim]."""

    def __init__(self, config: PretrainedConfig, head_dim: int) -> None:
        super().__init__()
        # transformers computes the tables (llama3, yarn, ...) on the CPU; then they follow the
        # device the model is being built on, like every other parameter and buffer
        device = torch.empty(0).device
        with torch.device("cpu"):
            inv_freq, self.scaling = rope_inv_freq(config, head_dim)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """[tokens, 1, head_dim] cos and sin (in `dtype`) for these positions."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
