"""Attention: each forward's metadata (in the context) does the attending.

`Attention.forward(q, k, v)` calls `get_context().attn.attend(layer, q, k, v)`. A backend's
`prepare(inputs, dev)` builds that metadata once per forward from the step's layout
(`rids.engine.step_inputs`): the torch backend (any device, any dtype) writes K/V into the paged
cache, gathers each sequence's pages and runs `scaled_dot_product_attention` with a mask built
on the device from each row's visibility; the flashinfer backend (CUDA, fp16/bf16;
`rids.layers.flashinfer_attention`) plans from the same layout's page tables. Training passes
bring their own metadata (`rids.train.attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rids.utils.context import get_context


@dataclass(slots=True)
class TorchAttention:
    slots: torch.Tensor  # [T] flat KV-cache slot written by each token
    kv_gather: torch.Tensor  # [S * max_kv] flat slots of each sequence's keys
    row_q: torch.Tensor  # [T] where each flat token sits in the padded [S * max_q] layout
    mask: torch.Tensor  # [S, 1, max_q, max_kv] True where a query may attend
    max_q: int

    def attend(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hk, D]; caches: [slots, Hk, D]
        layer.k_cache.index_copy_(0, self.slots, k)
        layer.v_cache.index_copy_(0, self.slots, v)
        num_seqs, _, _, max_kv = self.mask.shape
        shape = (num_seqs, max_kv, layer.num_kv_heads, layer.head_dim)
        # index_select, not advanced indexing: several times faster for a row gather
        keys = layer.k_cache.index_select(0, self.kv_gather).view(shape).transpose(1, 2)
        values = layer.v_cache.index_select(0, self.kv_gather).view(shape).transpose(1, 2)
        qp = q.new_zeros(num_seqs * self.max_q, *q.shape[1:]).index_copy_(0, self.row_q, q)
        qp = qp.view(num_seqs, self.max_q, *q.shape[1:]).transpose(1, 2)  # [S, H, max_q, D]
        o = F.scaled_dot_product_attention(
            qp,
            keys,
            values,
            attn_mask=self.mask,
            scale=layer.scale,
            enable_gqa=layer.num_kv_heads != layer.num_heads,
        )
        return o.transpose(1, 2).reshape(-1, *q.shape[1:]).index_select(0, self.row_q)


class TorchBackend:
    """Paged attention in PyTorch ops: every index and mask is built on the device from the
    step's packed metadata (no host work per layer, no per-step host copies of its own)."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    def prepare(self, inputs, dev: dict[str, torch.Tensor]) -> TorchAttention:
        device = dev["slots"].device
        kv = torch.arange(inputs.max_kv, device=device)
        tables = dev["page_tables"]  # [S, max_pages]
        page = (kv // self.page_size).clamp(max=tables.shape[1] - 1)
        kv_gather = (tables[:, page] * self.page_size + kv % self.page_size).flatten()
        # each row sees KV indices [0, prefix) and lo..hi; rows of the padding see index 0
        sees = (kv < dev["row_prefix"][:, None]) | (
            (kv >= dev["row_lo"][:, None]) & (kv <= dev["row_hi"][:, None])
        )
        mask = torch.zeros(inputs.num_seqs * inputs.max_q, inputs.max_kv, dtype=torch.bool,
                           device=device)  # fmt: skip
        mask[:, 0] = True
        mask[dev["row_q"]] = sees
        return TorchAttention(
            slots=dev["slots"],
            kv_gather=kv_gather,
            row_q=dev["row_q"],
            mask=mask.view(inputs.num_seqs, 1, inputs.max_q, inputs.max_kv),
            max_q=inputs.max_q,
        )


class Attention(nn.Module):
    """One layer's attention; how it attends (paged cache, training blocks) is the context's."""

    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return get_context().attn.attend(self, q, k, v)
