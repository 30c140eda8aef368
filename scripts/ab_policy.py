"""A/B of one drafting-policy switch on tuning prompts: tokens per second, request by request.

    python scripts/ab_policy.py --switch siblings            # default vs siblings off
    python scripts/ab_policy.py --switch prompt_lookup --num-prompts 60 --rounds 2
    python scripts/ab_policy.py --aa                         # both halves the default: noise
    python scripts/ab_policy.py --no-corpus                  # text the corpus does not cover
    python scripts/ab_policy.py --batch-size 8               # requests 8 at a time

Tunes on the hand-written training seeds (`prompts/train_seeds.txt`), never on the held-out
sets (they judge: `scripts/bench_cpu.py`). One engine of the embedded default runs each
request twice, with the policy attribute `--switch` as it is and set to False, the order
alternating request by request and round by round, so a machine that drifts shifts both
alike; rids AR runs each request once more for the ratio. One engine, not two: two identical
engines in one process differ by a few percent (an A/A run of two gave 0.975x), more than
most switches are worth. Every output is checked against rids AR's.
"""

from __future__ import annotations

import argparse
import time

from rids.embedded import resolve_defaults
from rids.llm import LLM
from rids.outputs import GenerationStats
from rids.train.synthetic import TRAIN_SEEDS, seed_requests


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--switch", default="siblings", help="a DraftingPolicy attribute")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1, help="requests per generate call")
    ap.add_argument("--aa", action="store_true", help="leave the switch on in both halves")
    ap.add_argument("--no-corpus", action="store_true", help="no corpus copies in either half")
    args = ap.parse_args()
    base, adapter = resolve_defaults(None, None)
    llm, ar = LLM(base, adapter), LLM(base)
    policy = llm.engine.policy
    if args.no_corpus:
        policy.set_draft_sources(None, policy.next_tokens, policy.draft_head)
    if not hasattr(policy, args.switch):
        raise SystemExit(f"DraftingPolicy has no attribute {args.switch!r}")
    setting = {"on": getattr(policy, args.switch), "off": getattr(policy, args.switch) and args.aa}
    prompts = [ar.encode_chat([{"role": "user", "content": q}]) for q in seed_requests(TRAIN_SEEDS)]
    prompts = prompts[: args.num_prompts]
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    for engine in (llm, ar):
        engine.generate(prompts[:1], max_new_tokens=8)  # warm-up
    seconds = {"on": 0.0, "off": 0.0, "AR": 0.0}
    stats: dict[str, list[GenerationStats]] = {"on": [], "off": []}
    tokens = 0
    for r in range(args.rounds):
        for i, batch in enumerate(batches):
            order = ["on", "off", "AR"] if (i + r) % 2 == 0 else ["off", "on", "AR"]
            outs = {}
            for name in order:
                if name != "AR":
                    setattr(policy, args.switch, setting[name])
                t0 = time.perf_counter()
                engine = ar if name == "AR" else llm
                outs[name] = engine.generate(batch, max_new_tokens=args.max_new_tokens)
                seconds[name] += time.perf_counter() - t0
            ids = {name: [o.token_ids for o in out] for name, out in outs.items()}
            assert ids["on"] == ids["off"] == ids["AR"], f"batch {i}: output differs"
            tokens += sum(map(len, ids["AR"]))
            for name in stats:
                stats[name] += [o.stats for o in outs[name]]
    print(
        f"{len(prompts)} training-seed requests, {args.batch_size} at a time, x {args.rounds} "
        f"round(s), {tokens} tokens\n"
    )
    print("| policy | tok/s | TPF | vs rids AR | sibling tokens / steps |")
    print("|---|---|---|---|---|")
    ar_rate = tokens / seconds["AR"]
    for name, label in [("on", "default"), ("off", f"{args.switch} off")]:
        total = GenerationStats.total(stats[name])
        rate = tokens / seconds[name]
        sibling = f"{total.sibling_accepted} / {total.sibling_steps}"
        print(f"| {label} | {rate:.1f} | {total.tpf:.2f} | {rate / ar_rate:.3f}x | {sibling} |")
    print(f"\ndefault / {args.switch} off: {seconds['off'] / seconds['on']:.3f}x")


if __name__ == "__main__":
    main()
