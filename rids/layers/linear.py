"""Linear layer with fused output shards and a gated LoRA delta.

    y = x W^T + b;  y[rows] += ((x[rows] A^T) * scaling) B^T     (rows: tokens whose gate is 1)

Fused projections (q/k/v, gate/up) keep one weight; each shard's LoRA A is stacked into one A
([sum r, in]) and its B placed block-diagonally in one B ([out, sum r]), so the delta is two matmuls
over the gated rows only. Rows with gate 0 get exactly the base output.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(slots=True)
class LoraWeights:
    """One module's LoRA in PEFT layout: A [r, in], B [out, r], delta = scaling * B A x."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float


@dataclass(slots=True)
class RowOverride:
    """Replacement rows of a weight (PEFT trainable tokens, modules_to_save) for gated rows."""

    ids: torch.Tensor  # [n] long
    values: torch.Tensor  # [n, dim]


class GatedLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int | Sequence[int],
        bias: bool = False,
        shard_names: Sequence[str] = (),
    ) -> None:
        super().__init__()
        sizes = [out_features] if isinstance(out_features, int) else list(out_features)
        self.in_features = in_features
        self.out_features = sum(sizes)
        ends = list(itertools.accumulate(sizes))
        slices = [slice(end - size, end) for end, size in zip(ends, sizes, strict=True)]
        self.shards = dict(zip(shard_names, slices, strict=True)) if shard_names else {}
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        )
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scaling: torch.Tensor | None = None
        self.row_override: RowOverride | None = None

    def out_slice(self, shard: str | None) -> slice:
        return self.shards[shard] if shard else slice(0, self.out_features)

    def shard_size(self, shard: str | None) -> int:
        s = self.out_slice(shard)
        return s.stop - s.start

    def load_weight(self, name: str, tensor: torch.Tensor, shard: str | None = None) -> None:
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise KeyError(name)
        param.data[self.out_slice(shard)].copy_(tensor)

    def set_lora(self, loras: dict[str | None, LoraWeights]) -> None:
        """Install the LoRA of each shard (None: the whole layer); replaces any previous one."""
        ref = self.weight
        blocks = [(self.out_slice(s), w) for s, w in loras.items()]
        rank = sum(w.A.shape[0] for _, w in blocks)
        A = torch.zeros(rank, self.in_features, dtype=ref.dtype, device=ref.device)
        B = torch.zeros(self.out_features, rank, dtype=ref.dtype, device=ref.device)
        scaling = torch.empty(rank, dtype=ref.dtype, device=ref.device)
        r0 = 0
        for out, w in blocks:
            r = w.A.shape[0]
            A[r0 : r0 + r] = w.A
            B[out, r0 : r0 + r] = w.B
            scaling[r0 : r0 + r] = w.scaling
            r0 += r
        self.lora_A = nn.Parameter(A, requires_grad=False)
        self.lora_B = nn.Parameter(B, requires_grad=False)
        self.lora_scaling = scaling

    def clear_adapter(self) -> None:
        self.lora_A = self.lora_B = self.lora_scaling = None
        self.row_override = None

    def forward(self, x: torch.Tensor, lora_rows: torch.Tensor | None = None) -> torch.Tensor:
        # x: [T, in]; lora_rows: indices of the tokens whose gate is 1
        y = F.linear(x, self.weight, self.bias)
        if lora_rows is None or (self.lora_A is None and self.row_override is None):
            return y
        xr = x.index_select(0, lora_rows)
        if self.row_override is not None:
            o = self.row_override
            yr = y.index_select(0, lora_rows)
            new = F.linear(xr, o.values, None if self.bias is None else self.bias[o.ids])
            yr[:, o.ids] = new
            y = y.index_copy(0, lora_rows, yr)
        if self.lora_A is not None:
            delta = ((xr @ self.lora_A.T) * self.lora_scaling) @ self.lora_B.T
            y = y.index_add(0, lora_rows, delta)
        return y
