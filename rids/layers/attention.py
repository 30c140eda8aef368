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
class GroupAttention:
    """One query group's padded attention call (`rids.engine.step_inputs.QueryGroup`)."""

    offset: int  # first row of the padded query layout
    kv_gather: torch.Tensor  # [S_g * max_kv_g] flat slots of each sequence's keys
    mask: torch.Tensor  # [S_g, 1, max_q_g, max_kv_g] True where a query may attend


@dataclass(slots=True)
class TorchAttention:
    slots: torch.Tensor  # [T] flat KV-cache slot written by each token
    row_q: torch.Tensor  # [T] where each flat token sits in the padded query layout
    num_rows: int  # rows of the padded query layout
    groups: list[GroupAttention]

    def attend(
        self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, Hk, D]; caches: [slots, Hk, D]
        layer.k_cache.index_copy_(0, self.slots, k)
        layer.v_cache.index_copy_(0, self.slots, v)
        heads = q.shape[1:]
        qp = q.new_zeros(self.num_rows, *heads).index_copy_(0, self.row_q, q)
        outs = []
        for g in self.groups:
            num_seqs, _, max_q, max_kv = g.mask.shape
            shape = (num_seqs, max_kv, layer.num_kv_heads, layer.head_dim)
            # index_select, not advanced indexing: several times faster for a row gather
            keys = layer.k_cache.index_select(0, g.kv_gather).view(shape).transpose(1, 2)
            values = layer.v_cache.index_select(0, g.kv_gather).view(shape).transpose(1, 2)
            rows = qp[g.offset : g.offset + num_seqs * max_q]
            o = F.scaled_dot_product_attention(
                rows.view(num_seqs, max_q, *heads).transpose(1, 2),  # [S_g, H, max_q, D]
                keys,
                values,
                attn_mask=g.mask,
                scale=layer.scale,
                enable_gqa=layer.num_kv_heads != layer.num_heads,
            )
            outs.append(o.transpose(1, 2).reshape(-1, *heads))
        o = outs[0] if len(outs) == 1 else torch.cat(outs)
        return o.index_select(0, self.row_q)


class TorchBackend:
    """Paged attention in PyTorch ops: every index and mask is built on the device from the
    step's packed metadata (no host work per layer, no per-step host copies of its own), one
    padded call per query group."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size

    def prepare(self, inputs, dev: dict[str, torch.Tensor]) -> TorchAttention:
        device = dev["slots"].device
        kv = torch.arange(inputs.max_kv, device=device)
        # each row sees KV indices [0, prefix) and lo..hi; rows of the padding see index 0
        sees = (kv < dev["row_prefix"][:, None]) | (
            (kv >= dev["row_lo"][:, None]) & (kv <= dev["row_hi"][:, None])
        )
        num_rows = sum(g.num_seqs * g.max_q for g in inputs.query_groups)
        mask = torch.zeros(num_rows, inputs.max_kv, dtype=torch.bool, device=device)
        mask[:, 0] = True  # padding rows see one key (a row that sees none gives NaN)
        mask[dev["row_q"]] = sees
        groups = []
        for g in inputs.query_groups:
            seqs = dev["group_seqs"][g.first : g.first + g.num_seqs]
            groups.append(GroupAttention(
                g.offset,
                self.kv_slots(dev["page_tables"][seqs], kv[: g.max_kv]),
                mask[g.offset : g.offset + g.num_seqs * g.max_q, : g.max_kv]
                .reshape(g.num_seqs, 1, g.max_q, g.max_kv),
            ))  # fmt: skip
        return TorchAttention(dev["slots"], dev["row_q"], num_rows, groups)

    def kv_slots(self, tables: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Flat cache slots of KV indices `kv` (0 .. n-1) of each sequence with these pages."""
        page = (kv // self.page_size).clamp(max=tables.shape[1] - 1)
        return (tables[:, page] * self.page_size + kv % self.page_size).flatten()


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
