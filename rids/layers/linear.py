"""Linear layer with fused output shards and a gated LoRA delta.

    y = x W^T + b;  y[-g:] += (x[-g:] A^T) B^T      (the last g rows are the tokens with gate 1)

The model runner puts every gated (MASK) token at the tail of the flat batch, so the gate is a
row count, not an index. Fused projections (q/k/v, gate/up) keep one weight; each shard's LoRA A
is stacked into one A ([sum r, in]) and its B, scaled, placed block-diagonally in one B
([out, sum r]): the delta is two GEMMs over the gated rows only, and the other rows get exactly
the base output.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


ONEDNN = _onednn_available()
# dtypes oneDNN packs for this CPU: bfloat16 only with native bf16 instructions (AVX512-BF16,
# AMX); elsewhere oneDNN would emulate it, which nobody has timed
NATIVE_BF16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
PACKABLE_DTYPES = (torch.float32, torch.bfloat16) if ONEDNN and NATIVE_BF16 else (torch.float32,)


PACK_ROWS = 16  # the row count oneDNN blocks a packed weight for (fast from 1 to 64 rows)


def packable(weight: torch.Tensor) -> bool:
    return ONEDNN and weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A oneDNN-blocked copy of a `packable` weight, for inference.

    Unpacked, oneDNN reorders the weight on every call; packed once, a few-row GEMM streams it
    as it is (SmolLM2 shapes, AVX2, 2 cores: the linear layers of a 1-token step 32 -> 21 ms, of
    a 7-token step 60 -> 33 ms; in bfloat16 on AVX512-BF16, rids AR 50 -> 61 tokens/s)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACK_ROWS)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.linear`, through oneDNN on CPU at inference (with `packed`, `weight`'s packed copy).

    MKL's sgemm repacks the weight on every call, which makes a few-token GEMM cost about as
    much as that many one-token GEMVs; oneDNN's kernels do not. Autograd and other devices use
    `F.linear`."""
    if ONEDNN and x.device.type == "cpu" and not torch.is_grad_enabled() and x.dim() == 2:
        w = weight if packed is None else packed
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, bias, "none", [], "")
    return F.linear(x, weight, bias)


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
        self.shard_sizes = sizes
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        )
        self.lora_A: torch.Tensor | None = None
        self.lora_B: torch.Tensor | None = None  # scaling folded in
        self.lora_ranks: list[int] = []  # per shard
        self.row_override: RowOverride | None = None
        # a fused kernel (rids.kernels) the engine may install: kernel(self, y, x, num_gated)
        self.lora_kernel: Callable | None = None
        # CPU inference: one oneDNN-packed copy, of the weight or, with a frozen LoRA, of
        # [weight; A] (the LoRA's shrink computed beside the weight, in the same GEMM)
        self.prepacked = False
        self.packed: torch.Tensor | None = None
        self.packed_rank = 0  # rows of A packed after the weight's
        self.packed_B_T: torch.Tensor | None = None  # then B^T, contiguous (an addmm twice as fast)
        self.packed_bias: torch.Tensor | None = None  # the bias, then zeros for A's outputs

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
        """Install each shard's LoRA (None: the whole layer), replacing any previous one.

        Differentiable in the LoRA weights, so a trainer can install PEFT-layout parameters."""
        ref = self.weight
        As, Bs = [], []
        for shard in self.shards or [None]:
            w = loras.get(shard)
            if w is None:  # a shard without LoRA: zero rank
                As.append(ref.new_zeros(0, self.in_features))
                Bs.append(ref.new_zeros(self.shard_size(shard), 0))
            else:
                As.append(w.A.to(ref.dtype))
                Bs.append(w.B.to(ref.dtype) * w.scaling)
        self.lora_A, self.lora_B = torch.cat(As), torch.block_diag(*Bs)
        self.lora_ranks = [a.shape[0] for a in As]
        self.repack()

    def prepack(self) -> None:
        """Keep a packed copy for CPU inference from now on (the model runner's choice)."""
        self.prepacked = True
        self.repack()

    def repack(self) -> None:
        """Pack the weight, with a frozen LoRA's A beside it (a trainable one stays apart: a
        trainer installs one per micro-batch, and the weight alone stays packed meanwhile)."""
        frozen = self.lora_A is not None and not self.lora_A.requires_grad
        if not (self.prepacked and packable(self.weight)):
            self.packed, self.packed_rank = None, 0
        elif frozen:
            self.packed = None  # the old copy is freed before the new one is made
            self.packed = pack(torch.cat([self.weight, self.lora_A]))
            self.packed_rank = self.lora_A.shape[0]
            self.packed_B_T = self.lora_B.T.contiguous()
            self.packed_bias = (
                None
                if self.bias is None
                else torch.cat([self.bias, self.bias.new_zeros(self.packed_rank)])
            )
        elif self.packed is None or self.packed_rank:
            self.packed, self.packed_rank = pack(self.weight), 0
        if not self.packed_rank:
            self.packed_B_T = self.packed_bias = None

    def clear_adapter(self) -> None:
        self.lora_A = self.lora_B = None
        self.row_override = None
        self.repack()

    def forward(self, x: torch.Tensor, num_gated: int = 0) -> torch.Tensor:
        # x: [T, in]; the last num_gated rows have gate 1
        if self.packed_rank and not torch.is_grad_enabled():
            return self.forward_packed(x, num_gated)
        y = linear(x, self.weight, self.bias, self.packed)
        if not num_gated or (self.lora_A is None and self.row_override is None):
            return y
        xg, yg = x[-num_gated:], y[-num_gated:]  # views: updates land in y
        self.override_rows(xg, yg)
        if self.lora_A is None:
            return y
        if self.lora_kernel is not None and not torch.is_grad_enabled():
            self.lora_kernel(self, y, x, num_gated)
        else:
            yg.addmm_(linear(xg, self.lora_A), self.lora_B.T)
        return y

    def forward_packed(self, x: torch.Tensor, num_gated: int) -> torch.Tensor:
        """CPU inference: [y | x A^T] in one GEMM over every row (y bit for bit as without A:
        oneDNN blocks the reduction, not the output columns, and adds the bias in the same
        place), then the gated rows' expand."""
        n = self.out_features
        out = linear(x, self.weight, self.packed_bias, self.packed)
        y = out[:, :n]
        if num_gated:
            yg = y[-num_gated:]
            self.override_rows(x[-num_gated:], yg)
            yg.addmm_(out[-num_gated:, n:], self.packed_B_T)
        return y

    def override_rows(self, xg: torch.Tensor, yg: torch.Tensor) -> None:
        if self.row_override is not None:
            o = self.row_override
            yg[:, o.ids] = linear(xg, o.values, None if self.bias is None else self.bias[o.ids])
