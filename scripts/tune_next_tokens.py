"""How MASK drafts should be chosen knowing the token before them: acceptance per position by rule.

    python scripts/tune_next_tokens.py [--data out/embedded/data-human/chats.jsonl]

The chats are split as `rids train-adapter` and `rids train-draft-head` split them (each
document once, the same seeded 5 % held out). The counts are built from the other 95 %; the
adapter's MASK rows (N = 4) are computed teacher-forced on the held-out chats' answers, at every
anchor whose next 4 tokens are answer tokens (drafts before the MASKs all right, the base's own
text after: the condition in which MASK drafts are proposed; `rids.train.draft_head.mask_rows`),
and each rule chooses the three drafts left to right from each row's 16 likeliest tokens: by
the counts (`NextTokenCounts.choose`) and, where the adapter has one, by its draft head (trained
on the same 95 %). Prints acceptance per position, each given the ones before it passed, and the
TPF of a fixed step at those rates (1 + a1 + a1 a2 + a1 a2 a3). The held-out prompt sets in
prompts/ are never used: they judge, they do not tune.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rids.embedded import resolve_defaults
from rids.engine.next_tokens import WEIGHT, NextTokenCounts
from rids.llm import LLM
from rids.train.data import read_documents, split_documents, unique_documents
from rids.train.draft_head import acceptance, collect_mask_rows, head_drafts

ROOT = Path(__file__).resolve().parents[1]
STRIDE = 4
RULES = [("the row's argmax", 0, 0.0)]  # (name, context tokens, weight)
RULES += [(f"counts, {n} context tokens, weight {WEIGHT}", n, WEIGHT) for n in (1, 2, 3, 4)]
RULES += [(f"counts, 3 context tokens, weight {w}", 3, w) for w in (0.25, 1.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "out/embedded/data-human/chats.jsonl")
    ap.add_argument("--adapter", type=Path, help="default: the embedded adapter")
    ap.add_argument("--num-chats", type=int, default=0, help="held-out chats used (0: all)")
    args = ap.parse_args()
    base, adapter = resolve_defaults(None, None if args.adapter is None else str(args.adapter))
    llm = LLM(base, adapter, drafting="fixed", branches="off")
    docs = unique_documents(read_documents([args.data], llm.tokenizer))
    train, held_out = split_documents(docs)
    held_out = held_out[: args.num_chats or None]
    rows = collect_mask_rows(llm.model, llm.mask_token_id, held_out, STRIDE)
    assert rows is not None, "no held-out answer has 4 tokens in a row"
    texts = [held_out[d].ids[: s + 2] for d, s in zip(rows.document, rows.anchor, strict=True)]
    pairs = [(d.ids, d.trainable) for d in train]
    tables = {n: NextTokenCounts.build(pairs, order=n) for n in {n for _, n, _ in RULES if n}}
    print(f"{len(train)} chats counted, {len(held_out)} held out: {len(rows)} anchors\n")
    print("| rule | acceptance/pos | TPF at N = 4 |\n|---|---|---|")
    results = []
    for name, n, weight in RULES:
        if not n:
            drafts = rows.candidates[..., 0]
        else:
            drafts = torch.tensor([
                tables[n].choose(text, c.tolist(), q.tolist(), weight)[0]
                for text, c, q in zip(texts, rows.candidates, rows.log_probs, strict=True)
            ])  # fmt: skip
        results.append((name, acceptance(drafts, rows)))
    if (head := llm.engine.policy.draft_head) is not None:
        results.append(("the adapter's draft head", acceptance(head_drafts(head, rows), rows)))
    for name, rates in results:
        tpf = 1 + rates[0] + rates[0] * rates[1] + rates[0] * rates[1] * rates[2]
        print(f"| {name} | {' '.join(f'{r:.2f}' for r in rates)} | {tpf:.2f} |")


if __name__ == "__main__":
    main()
