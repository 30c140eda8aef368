"""Token embedding with a gated adapter: replacement rows and/or a LoRA, on gated tokens only."""

import torch
import torch.nn.functional as F
from torch import nn

from rids.layers.linear import LoraWeights, RowOverride


class GatedEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.lora: LoraWeights | None = None  # PEFT embedding LoRA: A [r, vocab], B [dim, r]
        self.row_override: RowOverride | None = None

    def clear_adapter(self) -> None:
        self.lora = None
        self.row_override = None

    def forward(self, ids: torch.Tensor, lora_rows: torch.Tensor | None = None) -> torch.Tensor:
        out = F.embedding(ids, self.weight)
        if lora_rows is None or (self.lora is None and self.row_override is None):
            return out
        ids_r = ids.index_select(0, lora_rows)
        new = out.index_select(0, lora_rows)
        if self.row_override is not None:
            o = self.row_override
            hit = ids_r[:, None] == o.ids[None, :]  # [rows, n]
            found = hit.any(1)
            new = torch.where(found[:, None], o.values[hit.int().argmax(1)], new)
        if self.lora is not None:
            w = self.lora
            new = new + (F.embedding(ids_r, w.A.T) @ w.B.T) * w.scaling
        return out.index_copy(0, lora_rows, new)
