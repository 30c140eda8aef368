"""Training a draft head (`rids.engine.draft_head`) on its adapter's own MASK rows.

Per document the base runs clean once (every layer's K/V), then every anchor's MASK block runs
with the adapter, in the layout the adapter was trained in (`rids.train.objective`), at each
anchor s whose next N tokens are targets (answer tokens): the condition MASK drafts are proposed
in, drafts before them right. Each MASK_k row gives its final hidden state and its TOP_K
likeliest tokens; the head learns to pick x_{s+k+1} among them from that state and the token
before it, x_{s+k} (the truth: a draft only counts where the ones before it passed). Rows whose
truth is not among their candidates teach nothing and are left out of the loss. The rows are
computed once (no gradient reaches the model), then the head trains on them for a few epochs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rids.engine.draft_head import DraftHead
from rids.engine.next_tokens import TOP_K
from rids.errors import RidsError
from rids.models.qwen3 import Qwen3ForCausalLM
from rids.train.attention import CausalAttention
from rids.train.data import Document
from rids.train.objective import block_layout, mask_pass, run
from rids.utils.context import Context

ANCHORS_PER_PASS = 128  # anchors whose MASK blocks share one gated pass (bounds its memory)


@dataclass(slots=True)
class MaskRows:
    """Teacher-forced MASK rows of many anchors: A anchors x (N-1) rows each."""

    hidden: torch.Tensor  # [A, N-1, hidden] final hidden states (float16: only drafts)
    before: torch.Tensor  # [A, N-1] the token before each row's draft: x_{s+1}..x_{s+N-1}
    target: torch.Tensor  # [A, N-1] the draft it should be: x_{s+2}..x_{s+N}
    candidates: torch.Tensor  # [A, N-1, K] its likeliest tokens, likeliest first
    log_probs: torch.Tensor  # [A, N-1, K] their log-probabilities under the row
    document: torch.Tensor  # [A] index of the anchor's document
    anchor: torch.Tensor  # [A] the anchor s: the MASKs draft x_{s+2}.. after x_0..x_{s+1}

    def __len__(self) -> int:
        return self.target.shape[0]

    @staticmethod
    def cat(parts: Sequence[MaskRows]) -> MaskRows:
        return MaskRows(*(torch.cat([getattr(p, f) for p in parts]) for f in MaskRows.__slots__))


@torch.no_grad()
def mask_rows(
    model: Qwen3ForCausalLM,
    mask_token_id: int,
    doc: Document,
    stride: int,
    top_k: int = TOP_K,
    index: int = 0,
    anchors_per_pass: int = ANCHORS_PER_PASS,
    anchor_share: float = 1.0,
) -> MaskRows | None:
    """The MASK rows of every anchor of one document whose next `stride` tokens are targets
    (None: it has no such anchor), `anchors_per_pass` anchors' blocks a gated pass over the one
    clean pass; with `anchor_share` < 1, of a random share of them (seeded by `index`: adjacent
    anchors' rows are much alike, so a share keeps most of what the rows teach at that share of
    their time and memory). The adapter must be applied to `model`."""
    ids, targets = doc.ids, doc.trainable
    anchors = [s for s in range(len(ids) - stride) if all(targets[s + 1 : s + stride + 1])]
    if anchor_share < 1:
        rng = random.Random(index)
        anchors = [s for s in anchors if rng.random() < anchor_share]
    if not anchors:
        return None
    device = next(model.parameters()).device
    x = torch.tensor(ids, device=device)[None]
    clean = CausalAttention(1)
    run(model, x, torch.arange(len(ids), device=device)[None], Context(num_gated=0, attn=clean))
    hidden, top_ids, log_probs = [], [], []
    for i in range(0, len(anchors), anchors_per_pass):
        chunk = torch.tensor(anchors[i : i + anchors_per_pass], device=device)
        layout = block_layout(chunk[None], len(ids), stride)
        out, logits = mask_pass(model, layout, clean, mask_token_id)
        top = logits.topk(top_k, -1)
        hidden.append(out.half().cpu())
        top_ids.append(top.indices.cpu())
        log_probs.append((top.values - logits.logsumexp(-1, keepdim=True)).cpu())
    shape = (len(anchors), stride - 1)
    at = torch.tensor(anchors)
    following = x[0].cpu()[at[:, None] + torch.arange(1, stride + 1)]
    return MaskRows(
        torch.cat(hidden).view(*shape, -1),
        following[:, :-1],
        following[:, 1:],
        torch.cat(top_ids).view(*shape, top_k),
        torch.cat(log_probs).view(*shape, top_k),
        torch.full((len(anchors),), index),
        at,
    )


def collect_mask_rows(
    model: Qwen3ForCausalLM,
    mask_token_id: int,
    docs: Sequence[Document],
    stride: int,
    on_document: Callable[[int], None] | None = None,
    anchor_share: float = 1.0,
) -> MaskRows | None:
    """`mask_rows` of every document, concatenated (None: no document has an anchor);
    `on_document(i)` after the i-th."""
    parts = []
    for i, doc in enumerate(docs):
        rows = mask_rows(model, mask_token_id, doc, stride, index=i, anchor_share=anchor_share)
        if rows is not None:
            parts.append(rows)
        if on_document is not None:
            on_document(i)
    return MaskRows.cat(parts) if parts else None


def head_drafts(head: DraftHead, rows: MaskRows, batch_size: int = 4096) -> torch.Tensor:
    """The draft the head picks in each row [A, N-1], each after the true token before it."""
    picks = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            c = rows.candidates[i : i + batch_size]
            scores = head.scores(
                rows.hidden[i : i + batch_size].float(), rows.before[i : i + batch_size], c
            )
            picks.append(c.gather(-1, scores.argmax(-1, keepdim=True))[..., 0])
    return torch.cat(picks)


def acceptance(drafts: torch.Tensor, rows: MaskRows) -> list[float]:
    """Acceptance per position of drafts [A, N-1], each given the ones before it passed."""
    right, alive, rates = drafts == rows.target, torch.ones(len(rows), dtype=torch.bool), []
    for k in range(right.shape[1]):
        tried = int(alive.sum())
        alive &= right[:, k]
        rates.append(int(alive.sum()) / max(tried, 1))
    return rates


@dataclass(slots=True)
class HeadEpoch:
    epoch: int
    loss: float  # mean cross-entropy over the candidates, on the training rows
    acceptance: list[float]  # per position on the held-out rows


def train_draft_head(
    head: DraftHead,
    train: MaskRows,
    held_out: MaskRows | None,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 1024,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[HeadEpoch], None] | None = None,
) -> None:
    """AdamW on the rows whose target is among their candidates (warmup, then cosine);
    `on_batch(done, total)` after each batch, `on_epoch` with held-out acceptance after each
    epoch. `head` must be bound to the base's embeddings (`DraftHead.bind`)."""
    hidden, before = train.hidden.flatten(0, 1), train.before.flatten()
    candidates = train.candidates.flatten(0, 1)
    found = candidates == train.target.flatten()[:, None]
    keep = found.any(1)
    if not bool(keep.any()):
        raise RidsError(
            "no MASK row's right draft is among its likeliest tokens: nothing to learn from "
            "(is the adapter trained for this base and stride?)"
        )
    hidden, before, candidates = hidden[keep], before[keep], candidates[keep]
    label = found[keep].int().argmax(1)
    generator = torch.Generator().manual_seed(seed)
    per_epoch = max(len(label) // batch_size, 1)
    total = epochs * per_epoch
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(total // 20, 1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / total))
    )
    head.train()
    for epoch in range(epochs):
        order, loss_sum = torch.randperm(len(label), generator=generator), 0.0
        for b in range(per_epoch):
            j = order[b * batch_size : (b + 1) * batch_size]
            scores = head.scores(hidden[j].float(), before[j], candidates[j])
            loss = F.cross_entropy(scores, label[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            loss_sum += loss.item()
            if on_batch is not None:
                on_batch(epoch * per_epoch + b + 1, total)
        head.eval()
        rates = acceptance(head_drafts(head, held_out), held_out) if held_out else []
        head.train()
        if on_epoch is not None:
            on_epoch(HeadEpoch(epoch + 1, loss_sum / per_epoch, rates))
    head.eval()
