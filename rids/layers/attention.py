"""Paged attention: the layer stores K/V into the paged cache, then a backend attends.

Backends share one interface: `prepare(seqs) -> metadata` once per forward, then
`forward(q, k_cache, v_cache, metadata, scale)` per layer. The torch backend (CPU, any device)
gathers each sequence's pages and runs `scaled_dot_product_attention` with a padded mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rids.errors import RidsError
from rids.utils.context import get_context


@dataclass(slots=True)
class AttentionSeq:
    """One sequence in a forward: where its query tokens sit in the flat batch (in block
    order), their positions, and its pages; its keys are positions 0..num_keys-1."""

    token_index: list[int]
    positions: list[int]
    block_table: list[int]
    num_keys: int


@dataclass(slots=True)
class TorchAttentionMetadata:
    kv_gather: torch.Tensor  # [B, Lk] flat slots of each sequence's keys (padded with slot 0)
    q_index: torch.Tensor  # [T] where each flat token sits in the padded [B * Lq] query layout
    mask: torch.Tensor  # [B, 1, Lq, Lk] True where a query may attend
    max_q: int


class TorchBackend:
    name = "torch"

    def prepare(
        self, seqs: list[AttentionSeq], page_size: int, device: torch.device
    ) -> TorchAttentionMetadata:
        max_q = max(len(s.positions) for s in seqs)
        max_k = max(s.num_keys for s in seqs)
        gather = torch.zeros(len(seqs), max_k, dtype=torch.long)
        q_pos = torch.full((len(seqs), max_q), -1, dtype=torch.long)
        q_index = torch.empty(sum(len(s.positions) for s in seqs), dtype=torch.long)
        in_page = torch.arange(page_size)
        for b, s in enumerate(seqs):
            pages = torch.tensor(s.block_table, dtype=torch.long)
            slots = (pages[:, None] * page_size + in_page).flatten()
            gather[b, : s.num_keys] = slots[: s.num_keys]
            q_pos[b, : len(s.positions)] = torch.tensor(s.positions)
            q_index[s.token_index] = torch.arange(b * max_q, b * max_q + len(s.positions))
        # strict causal by position: key j is visible to a query at position p iff j <= p
        mask = torch.arange(max_k)[None, None, :] <= q_pos[:, :, None]
        mask[:, :, 0] |= q_pos < 0  # padded query rows see key 0 (their output is dropped)
        return TorchAttentionMetadata(
            kv_gather=gather.to(device),
            q_index=q_index.to(device),
            mask=mask[:, None].to(device),
            max_q=max_q,
        )

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: TorchAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        # q: [T, H, D]; caches: [slots, Hk, D]
        num_seqs, _ = meta.kv_gather.shape
        k = k_cache[meta.kv_gather].transpose(1, 2)  # [B, Hk, Lk, D]
        v = v_cache[meta.kv_gather].transpose(1, 2)
        qp = q.new_zeros(num_seqs * meta.max_q, *q.shape[1:]).index_copy_(0, meta.q_index, q)
        qp = qp.view(num_seqs, meta.max_q, *q.shape[1:]).transpose(1, 2)  # [B, H, Lq, D]
        o = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=meta.mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
        )
        return o.transpose(1, 2).reshape(-1, *q.shape[1:]).index_select(0, meta.q_index)


BACKENDS = {"torch": TorchBackend}


def get_backend(name: str) -> TorchBackend:
    if name not in BACKENDS:
        raise RidsError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name]()


class Attention(nn.Module):
    """Writes this step's K/V into the paged cache, then attends over cache + block."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.backend: TorchBackend = TorchBackend()
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_context()
        self.k_cache.index_copy_(0, ctx.slot_mapping, k)
        self.v_cache.index_copy_(0, ctx.slot_mapping, v)
        return self.backend.forward(q, self.k_cache, self.v_cache, ctx.attn, self.scale)
