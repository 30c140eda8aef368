"""Distillation vs data cross-entropy vs a mix, measured with the engine (TPF, acceptance).

    python scripts/compare_targets.py     # tiny Qwen3 fitted to a repetitive corpus, ~1 min

Every run trains the same adapter (rank 16, N = 4, 300 steps) with a different --distill-weight
and seed, then decodes held-out prompts with R-ISD and checks the output against plain AR.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rids.llm import LLM
from rids.outputs import GenerationStats
from rids.tiny import build_tiny_base, fit_tiny_base, repetitive_corpus
from rids.train.trainer import TrainConfig, train_adapter


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = fit_tiny_base(build_tiny_base(root / "base"), repetitive_corpus(), steps=600)
        data = root / "corpus.txt"
        data.write_text("\n\n".join(repetitive_corpus()))
        prompts = [d[:20] for d in repetitive_corpus(seed=1)[:32]]
        reference = [o.token_ids for o in LLM(base).generate(prompts, max_new_tokens=48)]
        kw = dict(drafting="fixed", branches="off")  # TPF of the drafter, not of timings
        print("| distill weight | seed | TPF (N=4) | acceptance per position | lossless |")
        print("|---|---|---|---|---|")
        for weight in (1.0, 0.5, 0.0):
            for seed in (0, 1, 2):
                cfg = TrainConfig(
                    base=str(base), data=[data], output=root / f"a{weight}-{seed}", rank=16,
                    max_steps=300, batch_size=8, seq_len=64, anchors=24, lr=5e-3,
                    distill_weight=weight, seed=seed, eval_every=0, save_every=1000,
                )  # fmt: skip
                llm = LLM(base, train_adapter(cfg), **kw)
                outs = llm.generate(prompts, max_new_tokens=48, stride=4)
                t = GenerationStats.total([o.stats for o in outs])
                same = [o.token_ids for o in outs] == reference
                acc = " ".join(f"{a:.2f}" for a in t.acceptance)
                print(f"| {weight} | {seed} | {t.tpf:.2f} | {acc} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
