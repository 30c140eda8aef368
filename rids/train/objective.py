"""The R-ISD training objective, many MASK blocks per sequence in one LoRA pass.

For an anchor s, MASK_k (k = 1..N-1) sits at position s+k, sees x_0..x_s and MASK_1..MASK_k, and
is trained to predict x_{s+k+1}: the data token (cross-entropy) and/or the base's own
distribution at clean position s+k (distillation; the clean pass computes it for free).
One no-grad clean pass gives every layer's K/V; one gated pass runs all anchors' MASK blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rids.models.qwen3 import Qwen3ForCausalLM
from rids.train.attention import CausalAttention, MaskBlockAttention
from rids.utils.context import Context, reset_context, set_context


@dataclass(slots=True)
class BlockLayout:
    """Where the MASK blocks of a batch sit: [B, Q] with Q = anchors x (N-1)."""

    positions: torch.Tensor  # position s+k of each MASK
    targets: torch.Tensor  # index s+k+1 of the token it predicts
    mask: torch.Tensor  # [B, 1, Q, L + Q] attention mask


def block_layout(anchors: torch.Tensor, length: int, stride: int) -> BlockLayout:
    """anchors: [B, A] positions s with s + stride <= length - 1."""
    batch, num_anchors = anchors.shape
    k = torch.arange(1, stride, device=anchors.device)  # 1..N-1
    positions = (anchors[:, :, None] + k).reshape(batch, -1)  # [B, Q]
    block = torch.arange(num_anchors, device=anchors.device).repeat_interleave(stride - 1)
    kk = k.repeat(num_anchors)
    clean = (
        torch.arange(length, device=anchors.device)[None, None, :]
        <= anchors.repeat_interleave(stride - 1, dim=1)[:, :, None]
    )  # [B, Q, L]: clean prefix x_0..x_s
    own = (block[:, None] == block[None, :]) & (kk[None, :] <= kk[:, None])  # [Q, Q]
    mask = torch.cat([clean, own.expand(batch, -1, -1)], dim=2)[:, None]
    return BlockLayout(positions, positions + 1, mask)


@dataclass(slots=True)
class LossParts:
    loss: torch.Tensor  # the mean over the predictions whose target trains
    total: torch.Tensor  # their sum (a trainer normalizes it over its whole batch)
    count: int  # how many there are
    ce: float  # data-token cross-entropy of the MASK predictions
    kl: float  # KL(base || MASK prediction)
    agree: float  # fraction of MASK argmax equal to the base's argmax (a proxy for acceptance)


def run(model: Qwen3ForCausalLM, ids: torch.Tensor, positions: torch.Tensor, ctx: Context):
    set_context(ctx)
    try:
        return model(ids.flatten(), positions.flatten())
    finally:
        reset_context()


def mask_pass(
    model: Qwen3ForCausalLM, layout: BlockLayout, clean: CausalAttention, mask_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every MASK block of `layout`, gated, over the K/V `clean` kept: the MASK rows' final
    hidden states and their logits (fp32)."""
    num_q = layout.positions.numel()
    masks = torch.full_like(layout.positions, mask_token_id)
    attn = MaskBlockAttention(clean, layout.mask)
    hidden = run(model, masks, layout.positions, Context(num_gated=num_q, attn=attn))
    return hidden, model.compute_logits(hidden, num_q).float()


def mask_block_loss(
    model: Qwen3ForCausalLM,
    ids: torch.Tensor,
    anchors: torch.Tensor,
    stride: int,
    mask_token_id: int,
    distill_weight: float,
    trainable: torch.Tensor | None = None,
    position_weights: Sequence[float] | None = None,
) -> LossParts:
    """ids: [B, L] training tokens; anchors: [B, A]; trainable: [B, L] bool, which tokens are
    targets (None: all). Mean over the B * A * (N-1) predictions whose target trains, MASK_k's
    loss weighted by `position_weights[k-1]` scaled to mean 1 (None: equal); the reported ce,
    kl and agreement are plain means."""
    batch, length = ids.shape
    layout = block_layout(anchors, length, stride)
    clean = CausalAttention(batch)
    with torch.no_grad():  # the base, gate 0: its K/V is every block's context
        pos = torch.arange(length, device=ids.device).expand(batch, -1)
        hidden = run(model, ids, pos, Context(num_gated=0, attn=clean)).view(batch, length, -1)
        source = torch.gather(
            hidden, 1, (layout.positions)[..., None].expand(-1, -1, hidden.shape[-1])
        )
        base_logits = model.compute_logits(source.flatten(0, 1)).float()
    _, logits = mask_pass(model, layout, clean, mask_token_id)
    log_q = F.log_softmax(logits, -1)
    targets = torch.gather(ids, 1, layout.targets).flatten()
    weight = (
        torch.ones_like(targets, dtype=log_q.dtype)
        if trainable is None
        else torch.gather(trainable, 1, layout.targets).flatten().to(log_q.dtype)
    )
    count = int(weight.sum())
    if position_weights is not None:
        w = torch.tensor(position_weights, dtype=log_q.dtype, device=log_q.device)
        loss_weight = weight * (w / w.mean()).repeat(anchors.shape[1] * batch)
    else:
        loss_weight = weight

    def mean(x: torch.Tensor) -> torch.Tensor:
        return (x * weight).sum() / max(count, 1)

    ce = F.nll_loss(log_q, targets, reduction="none")
    p = F.softmax(base_logits, -1)
    kl = (p * (F.log_softmax(base_logits, -1) - log_q)).sum(-1)
    total = ((1 - distill_weight) * ce + distill_weight * kl).mul(loss_weight).sum()
    agree = (logits.argmax(-1) == base_logits.argmax(-1)).to(log_q.dtype)
    return LossParts(
        total / max(count, 1), total, count, mean(ce).item(), mean(kl).item(), mean(agree).item()
    )
