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

    def forward(self, ids: torch.Tensor, num_gated: int = 0) -> torch.Tensor:
        # ids: [T]; the last num_gated tokens have gate 1
        out = F.embedding(ids, self.weight)
        if not num_gated or (self.lora is None and self.row_override is None):
            return out
        ids_g, out_g = ids[-num_gated:], out[-num_gated:]  # views: updates land in out
        if self.row_override is not None:
            o = self.row_override
            hit = ids_g[:, None] == o.ids[None, :]  # [gated, n]
            out_g.copy_(torch.where(hit.any(1)[:, None], o.values[hit.int().argmax(1)], out_g))
        if self.lora is not None:
            w = self.lora
            out_g += (F.embedding(ids_g, w.A.T) @ w.B.T) * w.scaling
        return out
