"""Verification in two Triton kernels, one program per sequence, the whole batch per launch.

- `greedy_verify`: argmax of each verify row (the first maximum, as `torch.argmax`), the
  number of leading drafts equal to it, and the base's token after them (correction or bonus).
- `sampled_verify`: the speculative-sampling rule of `rids.sampling.speculative_accept` on
  distributions p (base, verify rows) and q (drafts' proposals) that already carry the request's
  temperature / top-k / top-p: draft i passes unless u_i q(d_i) >= p(d_i); the token after the
  accepted drafts is drawn by inverse CDF (fp64) from norm(max(0, p - q)) at the first rejection,
  else from p (the bonus), with the step's last uniform.

Rows of sequence b start at `row_start[b]` (verify rows: num_drafts[b] + 1 of them; q rows:
num_drafts[b], from `q_start[b]`); drafts and uniforms are padded to `max_drafts` per sequence.
Inputs and outputs are device tensors: the engine copies results to the host once per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_V = 1024


@triton.jit
def _row_argmax(row_ptr, V, BLOCK_V: tl.constexpr):
    best = tl.full((), float("-inf"), tl.float32)
    best_i = tl.full((), 0, tl.int64)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + vs, mask=vs < V, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        i = tl.min(tl.where(x == m, vs, V), 0).to(tl.int64)  # first maximum in the tile
        better = m > best
        best_i = tl.where(better, i, best_i)
        best = tl.where(better, m, best)
    return best_i


@triton.jit
def _greedy_kernel(
    logits_ptr, row_start_ptr, num_drafts_ptr, drafts_ptr, accepted_ptr, token_ptr,
    V, stride_l, MAX_DRAFTS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    row0 = tl.load(row_start_ptr + b)
    k = tl.load(num_drafts_ptr + b)
    accepted = k
    for i in range(MAX_DRAFTS):
        if i < k:
            target = _row_argmax(logits_ptr + (row0 + i) * stride_l, V, BLOCK_V)
            d = tl.load(drafts_ptr + b * MAX_DRAFTS + i)
            accepted = tl.where((accepted == k) & (d != target), i, accepted)
    token = _row_argmax(logits_ptr + (row0 + accepted) * stride_l, V, BLOCK_V)
    tl.store(accepted_ptr + b, accepted)
    tl.store(token_ptr + b, token)


@triton.jit
def _sampled_kernel(
    p_ptr, q_ptr, row_start_ptr, q_start_ptr, num_drafts_ptr, drafts_ptr, u_ptr,
    accepted_ptr, token_ptr, V, stride_p, stride_q,
    MAX_DRAFTS: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    row0 = tl.load(row_start_ptr + b)
    q0 = tl.load(q_start_ptr + b)
    k = tl.load(num_drafts_ptr + b)
    accepted = k
    for i in range(MAX_DRAFTS):
        if i < k:
            d = tl.load(drafts_ptr + b * MAX_DRAFTS + i)
            pv = tl.load(p_ptr + (row0 + i) * stride_p + d)
            qv = tl.load(q_ptr + (q0 + i) * stride_q + d)
            u = tl.load(u_ptr + b * (MAX_DRAFTS + 1) + i)  # fp64, as the PyTorch rule
            reject = u * qv.to(tl.float64) >= pv.to(tl.float64)
            accepted = tl.where((accepted == k) & reject, i, accepted)
    p_row = p_ptr + (row0 + accepted) * stride_p
    rejected = accepted < k
    q_row = q_ptr + tl.where(rejected, q0 + accepted, 0) * stride_q  # row 0: always there
    # one pass: the residual's mass and p's (no residual mass: draw from p, as PyTorch does)
    mass = tl.zeros((), tl.float64)
    p_mass = tl.zeros((), tl.float64)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        p = tl.load(p_row + vs, mask=vs < V, other=0.0)
        q = tl.load(q_row + vs, mask=vs < V, other=0.0) * tl.where(rejected, 1.0, 0.0)
        mass += tl.sum(tl.maximum(p - q, 0.0).to(tl.float64), 0)
        p_mass += tl.sum(p.to(tl.float64), 0)
    residual = rejected & (mass > 0)
    q_scale = tl.where(residual, 1.0, 0.0)
    total = tl.where(residual, mass, p_mass)
    target = tl.load(u_ptr + b * (MAX_DRAFTS + 1) + MAX_DRAFTS) * total
    below = tl.zeros((), tl.int64)  # entries whose CDF is < target: searchsorted, left side
    running = tl.zeros((), tl.float64)
    for v0 in range(0, V, BLOCK_V):
        vs = v0 + tl.arange(0, BLOCK_V)
        p = tl.load(p_row + vs, mask=vs < V, other=0.0)
        q = tl.load(q_row + vs, mask=vs < V, other=0.0) * q_scale
        w = tl.maximum(p - q, 0.0).to(tl.float64)
        cdf = running + tl.cumsum(w, 0)
        below += tl.sum(((cdf < target) & (vs < V)).to(tl.int64), 0)
        running += tl.sum(w, 0)
    tl.store(accepted_ptr + b, accepted)
    tl.store(token_ptr + b, tl.minimum(below, V - 1))


def greedy_verify(
    logits: torch.Tensor, row_start: torch.Tensor, num_drafts: torch.Tensor, drafts: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence b (device tensors, no host sync): drafts accepted and the token after them.
    Its verify rows are logits[row_start[b] : row_start[b] + num_drafts[b] + 1]; drafts:
    [B, width], padded."""
    batch, width = drafts.shape
    accepted = torch.empty(batch, dtype=torch.int64, device=logits.device)
    token = torch.empty_like(accepted)
    _greedy_kernel[(batch,)](
        logits, row_start, num_drafts, drafts.contiguous(), accepted, token, logits.shape[1],
        logits.stride(0), MAX_DRAFTS=width, BLOCK_V=BLOCK_V,
    )  # fmt: skip
    return accepted, token


def sampled_verify(
    p: torch.Tensor,
    q: torch.Tensor,
    row_start: torch.Tensor,
    q_start: torch.Tensor,
    num_drafts: torch.Tensor,
    drafts: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence b (device tensors): drafts accepted and the token after them. p rows from
    row_start[b] (k + 1 of them), q rows from q_start[b] (k); drafts [B, width] padded;
    uniforms [B, width + 1] fp64: one per draft, the last draws the token."""
    batch, width = drafts.shape
    accepted = torch.empty(batch, dtype=torch.int64, device=p.device)
    token = torch.empty_like(accepted)
    _sampled_kernel[(batch,)](
        p, q, row_start, q_start, num_drafts, drafts.contiguous(), uniforms.contiguous(),
        accepted, token, p.shape[1], p.stride(0), q.stride(0),
        MAX_DRAFTS=width, BLOCK_V=BLOCK_V,
    )  # fmt: skip
    return accepted, token
