"""Branch MASK blocks on CPU, all in one run: off vs all vs auto, by stride N and batch size.

    python scripts/bench_branches.py

1. Real drafts: TPF of a trained adapter (the tiny demo of `make_tiny_model.py`, rebuilt here)
   with plain R-ISD (off) and with a branch for every rejection point (all).
2. Timing: a 25 M-parameter random Qwen3 whose drafts come from an oracle accepted with
   probability alpha per draft ("simulated"): tokens/s and TPF for off / all / auto, N = 2..8,
   batch 1..64. `auto` must stay within 5 % of the better of off and all.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_cpu import SHAPES, oracle

from rids.llm import LLM
from rids.outputs import GenerationStats
from rids.tiny import build_random_adapter, build_tiny_base

MODES = ("off", "all", "auto")


def real_tpf(tmp: Path) -> None:
    subprocess.run(
        [sys.executable, "scripts/make_tiny_model.py", str(tmp / "demo")],
        check=True, capture_output=True,
    )  # fmt: skip
    base, adapter = tmp / "demo" / "base", tmp / "demo" / "adapter"
    questions = (tmp / "demo" / "prompts.txt").read_text().splitlines()
    print("| N | TPF off | TPF all | all / off | cold starts off | cold starts all |")
    print("|---|---|---|---|---|---|")
    for n in (2, 3, 4, 8):
        row = {}
        for mode in ("off", "all"):
            llm = LLM(base, adapter, branches=mode, drafting="fixed")
            tok = llm.tokenizer
            prompts = [
                tok.apply_chat_template(
                    [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
                )
                for q in questions
            ]
            outs = llm.generate(prompts, max_new_tokens=64, stride=n)
            row[mode] = GenerationStats.total([o.stats for o in outs])
        off, all_ = row["off"], row["all"]
        print(
            f"| {n} | {off.tpf:.2f} | {all_.tpf:.2f} | {all_.tpf / off.tpf:.2f}x | "
            f"{off.cold_starts} | {all_.cold_starts} |"
        )


def timing(tmp: Path, alpha: float, max_new: int) -> None:
    base = build_tiny_base(tmp / "base", **SHAPES["small"])
    adapter = build_random_adapter(tmp / "adapter", base, rank=32)
    prompts = [
        [
            int(t)
            for t in torch.randint(10, 16000, (24,), generator=torch.Generator().manual_seed(i))
        ]
        for i in range(64)
    ]
    ref_llm = LLM(base)
    refs = {
        tuple(p): o.token_ids
        for p, o in zip(
            prompts, ref_llm.generate(prompts, max_new_tokens=max_new, ignore_eos=True), strict=True
        )
    }
    llms = {m: LLM(base, adapter, branches=m, drafting="fixed") for m in MODES}
    print("\n| N | batch | mode | tok/s | TPF | cold starts | vs better of off/all |")
    print("|---|---|---|---|---|---|---|")
    for n in (2, 3, 4, 8):
        for batch in (1, 4, 16, 64):
            rates = {}
            for mode in MODES:
                llm = llms[mode]
                llm.engine.drafter = oracle(refs, alpha, seed=n * 100 + batch)
                chunk = prompts[:batch]
                llm.generate(chunk[:1], max_new_tokens=8, stride=n, ignore_eos=True)  # warm-up
                t0 = time.perf_counter()
                outs = llm.generate(chunk, max_new_tokens=max_new, stride=n, ignore_eos=True)
                seconds = time.perf_counter() - t0
                assert [o.token_ids for o in outs] == [refs[tuple(p)] for p in chunk]
                stats = GenerationStats.total([o.stats for o in outs])
                rates[mode] = (len(chunk) * max_new / seconds, stats)
            better = max(rates["off"][0], rates["all"][0])
            for mode, (rate, stats) in rates.items():
                print(
                    f"| {n} | {batch} | {mode} | {rate:.0f} | {stats.tpf:.2f} | "
                    f"{stats.cold_starts} | {rate / better:.2f} |"
                )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        real_tpf(Path(tmp))
        timing(Path(tmp), alpha=0.7, max_new=48)


if __name__ == "__main__":
    main()
