"""Attention for training: a clean causal pass that keeps its K/V, then MASK blocks over it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rids.layers.attention import Attention


def _heads_first(x: torch.Tensor, batch: int) -> torch.Tensor:
    # [batch * n, heads, dim] -> [batch, heads, n, dim]
    return x.view(batch, -1, *x.shape[1:]).transpose(1, 2)


@dataclass
class CausalAttention:
    """Causal self-attention over `batch` equal-length flat sequences; keeps every layer's K/V."""

    batch: int
    kept: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def attend(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        self.kept[layer.layer_id] = (k, v)
        o = F.scaled_dot_product_attention(
            _heads_first(q, self.batch),
            _heads_first(k, self.batch),
            _heads_first(v, self.batch),
            is_causal=True,
            scale=layer.scale,
            enable_gqa=layer.num_kv_heads != layer.num_heads,
        )
        return o.transpose(1, 2).reshape(q.shape)


@dataclass
class MaskBlockAttention:
    """MASK blocks over a clean pass: each sees its clean prefix and, causally, its own MASKs.

    `mask` is [batch, 1, Q, L + Q]: Q MASK queries against the L clean keys, then the Q MASKs.
    """

    clean: CausalAttention
    mask: torch.Tensor

    def attend(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        batch = self.clean.batch
        ck, cv = self.clean.kept[layer.layer_id]
        keys = torch.cat([_heads_first(ck, batch), _heads_first(k, batch)], dim=2)
        values = torch.cat([_heads_first(cv, batch), _heads_first(v, batch)], dim=2)
        o = F.scaled_dot_product_attention(
            _heads_first(q, batch),
            keys,
            values,
            attn_mask=self.mask,
            scale=layer.scale,
            enable_gqa=layer.num_kv_heads != layer.num_heads,
        )
        return o.transpose(1, 2).reshape(q.shape)
