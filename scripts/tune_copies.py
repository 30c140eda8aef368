"""How copies (prompt lookup) should share the drafting with the MASK drafts: TPF by rule.

    python scripts/tune_copies.py [--data out/embedded/data/chats.jsonl] [--num-chats 20]

Runs the embedded default at the fixed N = 4 step, no branches (TPF is then independent of
timings), over the last chats of the adapter's training data (never the held-out sets in
prompts/: they judge, they do not tune), with: no copies; copies at cold starts only; and copies
that also replace the MASK drafts from a suffix match of 2, 3 or 4 tokens (`COPY_OVER_MASK`).
Every run's text is checked against the first's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import rids.engine.drafting as drafting
from rids.embedded import resolve_defaults
from rids.llm import LLM
from rids.outputs import GenerationStats

ROOT = Path(__file__).resolve().parents[1]
RULES = [("no copies", False, 0), ("cold starts only", True, 1 << 30)]
RULES += [(f"replace MASK drafts from a {n}-token match", True, n) for n in (2, 3, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT / "out/embedded/data/chats.jsonl")
    ap.add_argument("--num-chats", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args()
    chats = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    base, adapter = resolve_defaults(None, None)
    llm = LLM(base, adapter, drafting="fixed", branches="off")
    prompts = [llm.encode_chat(c["messages"][:1]) for c in chats[-args.num_chats :]]
    print("| rule | TPF | MASK acceptance/pos | copies passed / steps |")
    print("|---|---|---|---|")
    first = None
    for label, lookup, over in RULES:
        llm.engine.policy.prompt_lookup, drafting.COPY_OVER_MASK = lookup, over
        outs = llm.generate(prompts, max_new_tokens=args.max_new_tokens, stride=4)
        ids = [o.token_ids for o in outs]
        assert first is None or ids == first, f"{label}: the text changed"
        first = ids
        t = GenerationStats.total([o.stats for o in outs])
        acc = " ".join(f"{a:.2f}" for a in t.acceptance)
        print(f"| {label} | {t.tpf:.3f} | {acc} | {t.copies_accepted} / {t.copy_steps} |")


if __name__ == "__main__":
    main()
