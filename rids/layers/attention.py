"""Attention: each forward's metadata (in the context) does the attending.

`Attention.forward(q, k, v)` calls `get_context().attn.attend(layer, q, k, v)`. A backend's
`prepare(...)` builds that metadata once per forward: the torch backend (CPU, any device) writes
K/V into the paged cache, gathers each sequence's pages and runs `scaled_dot_product_attention`
with a padded mask. Training passes bring their own metadata (`rids.train.attention`).
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
    """One sequence in a forward: where its block's tokens sit in the flat batch (in block
    order), its pages, and how many tokens are cached before the block. Every token sees all
    cached keys; inside the block, `block_mask` [n, n] says who sees whom (None: causal)."""

    token_index: list[int]
    block_table: list[int]
    num_cached: int
    block_mask: torch.Tensor | None = None


@dataclass(slots=True)
class TorchAttentionMetadata:
    slot_mapping: torch.Tensor  # [T] flat KV-cache slot written by each token
    kv_gather: torch.Tensor  # [B, Lk] flat slots of each sequence's keys (padded with slot 0)
    q_index: torch.Tensor  # [T] where each flat token sits in the padded [B * Lq] query layout
    mask: torch.Tensor  # [B, 1, Lq, Lk] True where a query may attend
    max_q: int

    def attend(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hk, D]; caches: [slots, Hk, D]
        layer.k_cache.index_copy_(0, self.slot_mapping, k)
        layer.v_cache.index_copy_(0, self.slot_mapping, v)
        num_seqs = self.kv_gather.shape[0]
        keys = layer.k_cache[self.kv_gather].transpose(1, 2)  # [B, Hk, Lk, D]
        values = layer.v_cache[self.kv_gather].transpose(1, 2)
        qp = q.new_zeros(num_seqs * self.max_q, *q.shape[1:]).index_copy_(0, self.q_index, q)
        qp = qp.view(num_seqs, self.max_q, *q.shape[1:]).transpose(1, 2)  # [B, H, Lq, D]
        o = F.scaled_dot_product_attention(
            qp,
            keys,
            values,
            attn_mask=self.mask,
            scale=layer.scale,
            enable_gqa=layer.num_kv_heads != layer.num_heads,
        )
        return o.transpose(1, 2).reshape(-1, *q.shape[1:]).index_select(0, self.q_index)


class TorchBackend:
    def prepare(
        self,
        seqs: list[AttentionSeq],
        slot_mapping: torch.Tensor,
        page_size: int,
        device: torch.device,
    ) -> TorchAttentionMetadata:
        max_q = max(len(s.token_index) for s in seqs)
        max_k = max(s.num_cached + len(s.token_index) for s in seqs)
        gather = torch.zeros(len(seqs), max_k, dtype=torch.long)
        mask = torch.zeros(len(seqs), max_q, max_k, dtype=torch.bool)
        q_index = torch.empty(sum(len(s.token_index) for s in seqs), dtype=torch.long)
        in_page = torch.arange(page_size)
        for b, s in enumerate(seqs):
            n, c = len(s.token_index), s.num_cached
            pages = torch.tensor(s.block_table, dtype=torch.long)
            gather[b, : c + n] = (pages[:, None] * page_size + in_page).flatten()[: c + n]
            q_index[s.token_index] = torch.arange(b * max_q, b * max_q + n)
            mask[b, :n, :c] = True  # the cache: strictly earlier tokens
            inner = s.block_mask if s.block_mask is not None else causal(n)
            mask[b, :n, c : c + n] = inner
            mask[b, n:, 0] = True  # padded query rows see key 0 (their output is dropped)
        return TorchAttentionMetadata(
            slot_mapping=slot_mapping,
            kv_gather=gather.to(device),
            q_index=q_index.to(device),
            mask=mask[:, None].to(device),
            max_q=max_q,
        )


def causal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).tril()


BACKENDS = {"torch": TorchBackend}


def get_backend(name: str) -> TorchBackend:
    if name not in BACKENDS:
        raise RidsError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[name]()


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
