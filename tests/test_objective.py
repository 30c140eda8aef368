"""The multi-block training pass equals running each MASK block on its own (loss and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rids.adapter import apply_adapter
from rids.llm import LLM
from rids.train.attention import CausalAttention
from rids.train.lora import new_adapter
from rids.train.objective import block_layout, mask_block_loss, run
from rids.utils.context import Context


def naive_loss(model, ids, anchors, stride, mask_id, distill_weight, weights=None):
    """One forward per anchor over [x_0..x_s | MASK x (N-1)] (plain causal attention); MASK_k's
    loss times weights[k-1] / mean(weights)."""
    w = torch.tensor(weights or [1.0] * (stride - 1), dtype=torch.float32)
    w = w / w.mean()
    batch, length = ids.shape
    with torch.no_grad():
        pos = torch.arange(length).expand(batch, -1)
        hidden = run(model, ids, pos, Context(num_gated=0, attn=CausalAttention(batch)))
        base = model.compute_logits(hidden).view(batch, length, -1).float()
    losses = []
    for b in range(batch):
        for s in anchors[b].tolist():
            seq = torch.cat([ids[b, : s + 1], torch.full((stride - 1,), mask_id)])[None]
            pos = torch.arange(s + stride)[None]
            out = run(model, seq, pos, Context(num_gated=stride - 1, attn=CausalAttention(1)))
            log_q = F.log_softmax(model.compute_logits(out[-(stride - 1) :], stride - 1), -1)
            for k in range(1, stride):
                p = F.softmax(base[b, s + k], -1)
                kl = (p * (p.log() - log_q[k - 1])).sum()
                ce = -log_q[k - 1, ids[b, s + k + 1]]
                losses.append(w[k - 1] * ((1 - distill_weight) * ce + distill_weight * kl))
    return torch.stack(losses).mean()


@pytest.mark.parametrize(
    ("stride", "distill_weight", "weights"),
    [(2, 0.0, None), (4, 0.5, None), (3, 1.0, None), (4, 1.0, [3.0, 1.0, 0.0]), (3, 0.5, [1, 4])],
)
def test_multi_block_pass_equals_naive(tiny_base, tokenizer, stride, distill_weight, weights):
    llm = LLM(tiny_base)
    mask_id = tokenizer.convert_tokens_to_ids("<|MASK|>")
    adapter = new_adapter(llm.model, rank=4, alpha=8, mask_token_id=mask_id, seed=0)
    for lora in adapter.loras.values():
        torch.nn.init.normal_(lora.B, std=0.1)  # B = 0 at init would hide gradient paths
    params = adapter.parameters()
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 24))
    anchors = torch.tensor([[0, 5, 11, 17], [3, 4, 9, 24 - stride - 1]])

    def grads(loss_fn):
        apply_adapter(llm.model, adapter)
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    fast, fast_g = grads(
        lambda: (
            mask_block_loss(
                llm.model, ids, anchors, stride, mask_id, distill_weight, position_weights=weights
            ).loss
        )
    )
    slow, slow_g = grads(
        lambda: naive_loss(llm.model, ids, anchors, stride, mask_id, distill_weight, weights)
    )
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    for f, s in zip(fast_g, slow_g, strict=True):
        torch.testing.assert_close(f, s, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in fast_g)


def test_block_layout_mask():
    layout = block_layout(torch.tensor([[1, 3]]), length=7, stride=3)
    assert layout.positions.tolist() == [[2, 3, 4, 5]]
    assert layout.targets.tolist() == [[3, 4, 5, 6]]
    m = layout.mask[0, 0].int().tolist()
    # clean keys 0..6, then MASK keys (a0k1, a0k2, a1k1, a1k2)
    assert m == [
        [1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1],
    ]
