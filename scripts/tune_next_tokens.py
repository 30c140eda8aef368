"""How MASK drafts should be chosen with next-token counts: acceptance per position by rule.

    python scripts/tune_next_tokens.py [--data out/embedded/data-human/chats.jsonl]

The chats are split as `rids train-adapter` splits them (the same seeded 5 % held out). The
counts are built from the other 95 %; the adapter's MASK rows (N = 4) are computed
teacher-forced on the held-out chats' answers, at every anchor whose next 4 tokens are answer
tokens (drafts before the MASKs all right, the base's own text after: the condition in which
MASK drafts are proposed), and each rule chooses the three drafts left to right from each
row's 16 likeliest tokens (`NextTokenCounts.choose`). Prints acceptance per position, each
given the ones before it passed, and the TPF of a fixed step at those rates
(1 + a1 + a1 a2 + a1 a2 a3). The held-out prompt sets in prompts/ are never used: they judge,
they do not tune.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rids.embedded import resolve_defaults
from rids.engine.next_tokens import TOP_K, WEIGHT, NextTokenCounts
from rids.llm import LLM
from rids.train.attention import CausalAttention, MaskBlockAttention
from rids.train.data import read_documents, split_documents
from rids.train.objective import block_layout, run
from rids.utils.context import Context

ROOT = Path(__file__).resolve().parents[1]
STRIDE = 4
RULES = [("the row's argmax", 0, 0.0)]  # (name, context tokens, weight)
RULES += [(f"counts, {n} context tokens, weight {WEIGHT}", n, WEIGHT) for n in (1, 2, 3, 4)]
RULES += [(f"counts, 3 context tokens, weight {w}", 3, w) for w in (0.25, 1.0)]


@torch.no_grad()
def mask_candidates(llm: LLM, ids: list[int], targets: list[bool]):
    """Per anchor s (x_{s+1}..x_{s+N} answer tokens): the truth x_{s+2}..x_{s+N}, the text up
    to x_{s+1}, and each MASK row's TOP_K likeliest tokens with their log-probabilities."""
    anchors = [s for s in range(len(ids) - STRIDE) if all(targets[s + 1 : s + STRIDE + 1])]
    if not anchors:
        return []
    x = torch.tensor(ids)[None]
    layout = block_layout(torch.tensor(anchors)[None], len(ids), STRIDE)
    clean = CausalAttention(1)
    run(llm.model, x, torch.arange(len(ids))[None], Context(num_gated=0, attn=clean))
    num_q = layout.positions.numel()
    masks = torch.full_like(layout.positions, llm.mask_token_id)
    attn = MaskBlockAttention(clean, layout.mask)
    out = run(llm.model, masks, layout.positions, Context(num_gated=num_q, attn=attn))
    top = torch.log_softmax(llm.model.compute_logits(out, num_q).float(), -1).topk(TOP_K, -1)
    shape = (len(anchors), STRIDE - 1, TOP_K)
    cand, logq = top.indices.view(shape).tolist(), top.values.view(shape).tolist()
    return [
        (ids[s + 2 : s + STRIDE + 1], ids[: s + 2], c, q)
        for s, c, q in zip(anchors, cand, logq, strict=True)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "out/embedded/data-human/chats.jsonl")
    ap.add_argument("--adapter", type=Path, help="default: the embedded adapter")
    ap.add_argument("--num-chats", type=int, default=0, help="held-out chats used (0: all)")
    args = ap.parse_args()
    base, adapter = resolve_defaults(None, None if args.adapter is None else str(args.adapter))
    llm = LLM(base, adapter, drafting="fixed", branches="off")
    train, held_out = split_documents(read_documents([args.data], llm.tokenizer))
    held_out = held_out[: args.num_chats or None]
    anchors = [a for d in held_out for a in mask_candidates(llm, d.ids, d.trainable)]
    pairs = [(d.ids, d.trainable) for d in train]
    tables = {n: NextTokenCounts.build(pairs, order=n) for n in {n for _, n, _ in RULES if n}}
    print(f"{len(train)} chats counted, {len(held_out)} held out: {len(anchors)} anchors\n")
    print("| rule | acceptance/pos | TPF at N = 4 |\n|---|---|---|")
    for name, n, weight in RULES:
        passed, tried = [0] * (STRIDE - 1), [0] * (STRIDE - 1)
        for truth, text, cand, logq in anchors:
            drafts = tables[n].choose(text, cand, logq, weight)[0] if n else [c[0] for c in cand]
            for k, (draft, right) in enumerate(zip(drafts, truth, strict=True)):
                tried[k] += 1
                if draft != right:
                    break
                passed[k] += 1
        rates = [p / max(t, 1) for p, t in zip(passed, tried, strict=True)]
        tpf = 1 + rates[0] + rates[0] * rates[1] + rates[0] * rates[1] * rates[2]
        print(f"| {name} | {' '.join(f'{r:.2f}' for r in rates)} | {tpf:.2f} |")


if __name__ == "__main__":
    main()
