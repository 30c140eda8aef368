"""Gated LoRA in two Triton kernels: shrink (x A^T) and expand (y += h B^T), gated rows only.

The model runner puts every gated (MASK) token at the tail of the flat batch, so both kernels
start at row T - g and never touch a clean row: clean tokens cost no LoRA work at all. A fused
projection (q/k/v, gate/up) is one launch of each kernel: A stacks the shards' A matrices
([R, K], R = sum of ranks) and B is block-diagonal ([N, R], scaling folded in); the expand
kernel reads, for each tile of output columns, only the rank range of the shards under it
(`rank_ranges`), so the zero blocks of B are never multiplied.

`gated_lora_(y, x, A, B, g, rank_ranges)` matches the PyTorch reference
`y[-g:] += (x[-g:] @ A.T) @ B.T` (fp32 accumulation; tests run it under `TRITON_INTERPRET=1`
on CPU and natively on a GPU).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # expand: output columns per program (rank ranges are computed for this tile)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, h_ptr, row0, M, K, R,
    stride_xm, stride_ak, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # no i32 overflow at scale
    ranks = (pid_r * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + (row0 + rows)[:, None] * stride_xm + ks[None, :],
            mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0,
        )  # fmt: skip
        a = tl.load(
            a_ptr + ranks[None, :] * stride_ak + ks[:, None],
            mask=(ranks[None, :] < R) & (ks[:, None] < K), other=0.0,
        )  # fmt: skip
        acc += tl.dot(x.to(tl.float32), a.to(tl.float32))
    tl.store(
        h_ptr + rows[:, None] * stride_hm + ranks[None, :], acc,
        mask=(rows[:, None] < M) & (ranks[None, :] < R),
    )  # fmt: skip


@triton.jit
def _expand_kernel(
    h_ptr, b_ptr, y_ptr, ranges_ptr, row0, M, N,
    stride_hm, stride_bn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    r_lo = tl.load(ranges_ptr + 2 * pid_n)
    r_hi = tl.load(ranges_ptr + 2 * pid_n + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        rs = r0 + tl.arange(0, BLOCK_R)
        h = tl.load(
            h_ptr + rows[:, None] * stride_hm + rs[None, :],
            mask=(rows[:, None] < M) & (rs[None, :] < r_hi), other=0.0,
        )  # fmt: skip
        b = tl.load(
            b_ptr + cols[None, :] * stride_bn + rs[:, None],
            mask=(cols[None, :] < N) & (rs[:, None] < r_hi), other=0.0,
        )  # fmt: skip
        acc += tl.dot(h, b.to(tl.float32))
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    y_tile = y_ptr + (row0 + rows)[:, None] * stride_ym + cols[None, :]
    y = tl.load(y_tile, mask=mask, other=0.0)
    tl.store(y_tile, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def rank_ranges(shard_sizes: list[int], shard_ranks: list[int], block_n: int = BLOCK_N) -> list:
    """For each tile of `block_n` output columns: [lo, hi) of the ranks its shards use."""
    out_end, rank_end, shards = 0, 0, []
    for size, rank in zip(shard_sizes, shard_ranks, strict=True):
        shards.append((out_end, out_end + size, rank_end, rank_end + rank))
        out_end, rank_end = out_end + size, rank_end + rank
    ranges = []
    for n0 in range(0, out_end, block_n):
        touched = [s for s in shards if s[0] < n0 + block_n and s[1] > n0 and s[3] > s[2]]
        lo = min((s[2] for s in touched), default=0)
        ranges += [lo, max((s[3] for s in touched), default=lo)]
    return ranges


def block_sizes(m: int) -> int:
    return max(16, min(64, triton.next_power_of_2(m)))


def gated_lora_(
    y: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    num_gated: int,
    ranges: torch.Tensor,
) -> torch.Tensor:
    """y[-g:] += (x[-g:] A^T) B^T in place, for g = num_gated; `ranges` from `rank_ranges`."""
    T, K = x.shape
    N, R = B.shape
    if num_gated == 0 or R == 0:
        return y
    assert x.stride(1) == 1 and y.stride(1) == 1 and A.is_contiguous() and B.is_contiguous()
    row0, M = T - num_gated, num_gated
    bm = block_sizes(M)
    h = torch.empty(M, R, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(M, bm), triton.cdiv(R, 32))
    _shrink_kernel[grid](
        x, A, h, row0, M, K, R, x.stride(0), A.stride(0), h.stride(0),
        BLOCK_M=bm, BLOCK_R=32, BLOCK_K=64,
    )  # fmt: skip
    grid = (triton.cdiv(M, bm), triton.cdiv(N, BLOCK_N))
    _expand_kernel[grid](
        h, B, y, ranges, row0, M, N, h.stride(0), B.stride(0), y.stride(0),
        BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_R=32,
    )  # fmt: skip
    return y


@functools.lru_cache(maxsize=64)
def _device_ranges(sizes: tuple[int, ...], ranks: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.tensor(rank_ranges(list(sizes), list(ranks)), dtype=torch.int32, device=device)


def gated_lora_layer_(layer, y: torch.Tensor, x: torch.Tensor, num_gated: int) -> torch.Tensor:
    """`gated_lora_` with a `GatedLinear`'s LoRA (the engine installs this as its kernel)."""
    ranges = _device_ranges(tuple(layer.shard_sizes), tuple(layer.lora_ranks), str(y.device))
    return gated_lora_(y, x, layer.lora_A, layer.lora_B, num_gated, ranges)
