"""Build a tiny Qwen3 chat base and a gated adapter trained for it (seeded, ~15 s on 2 cores).

    python scripts/make_tiny_model.py out/tiny
    # writes out/tiny/base, out/tiny/adapter, out/tiny/chats.jsonl and out/tiny/prompts.txt

The base (1.2 M parameters, random init) is fitted to a toy chat corpus ("Count from seven." ->
"seven eight nine ten one two ..."), so that its greedy answers have structure; the adapter is
trained on the same chats with `rids train-adapter`'s trainer (N = 4). With only ten distinct
questions this is a demonstration, not a held-out evaluation. `--random-adapter` skips the
training: its drafts are then almost never accepted (TPF ~1): lossless, but not faster.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from rids.tiny import build_random_adapter, build_tiny_base, fit_tiny_base, repetitive_corpus
from rids.train.trainer import TrainConfig, train_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--random-adapter", action="store_true", help="skip training")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    chats = [
        [{"role": "user", "content": f"Count from {doc.split()[0]}."},
         {"role": "assistant", "content": doc}]
        for doc in repetitive_corpus(seed=args.seed)
    ]  # fmt: skip
    base = build_tiny_base(args.out / "base", seed=args.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in chats]
    fit_tiny_base(base, texts, steps=600, seed=args.seed)
    data = args.out / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    questions = sorted({c[0]["content"] for c in chats})
    (args.out / "prompts.txt").write_text("".join(q + "\n" for q in questions))
    if args.random_adapter:
        adapter = build_random_adapter(args.out / "adapter", base, seed=args.seed)
    else:
        cfg = TrainConfig(
            base=str(base), data=[data], output=args.out / "adapter",
            rank=16, max_steps=300, batch_size=8, seq_len=64, anchors=24, lr=5e-3,
            seed=args.seed, eval_every=0, save_every=1000,
        )  # fmt: skip
        adapter = train_adapter(cfg)
    print(f"base: {base}\nadapter: {adapter}\nprompts: {args.out / 'prompts.txt'}")


if __name__ == "__main__":
    main()
