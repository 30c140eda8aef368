"""CPU benchmark, all figures from one run: transformers.generate vs rids AR vs rids R-ISD.

    python scripts/bench_cpu.py                       # a 28M-parameter random Qwen3 (built here)
    python scripts/bench_cpu.py --shape smollm2       # random weights at SmolLM2-135M shapes
    python scripts/bench_cpu.py --base B --adapter A  # your own pair

R-ISD speed depends on how often drafts are accepted. A random adapter's drafts are not, so the
script also replaces the MASK proposals by an oracle (the base's own greedy continuation, each
draft corrupted with probability 1 - alpha): those rows are labelled "simulated" and measure what
the engine does at that acceptance rate, not what a trained adapter achieves.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
import transformers

from rids.engine.sequence import Sequence
from rids.llm import LLM
from rids.outputs import GenerationStats
from rids.tiny import build_random_adapter, build_tiny_base
from rids.utils.timing import median_seconds

PROMPTS = [
    "The quick brown fox jumps over",
    "def add(a, b):\n    return",
    "Explain why the sky is blue.",
    "One, two, three, four,",
]


def best_of(repeats: int, fn):
    """Run fn (after one warm-up run) `repeats` times; the fastest (seconds, result)."""
    fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        runs.append((time.perf_counter() - t0, result))
    return min(runs, key=lambda r: r[0])


def hf_generate(base: Path, prompts: list[list[int]], max_new: int, repeats: int):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    config = transformers.GenerationConfig(
        max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False, pad_token_id=0
    )

    @torch.inference_mode()
    def run() -> list[list[int]]:
        outs = []
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, generation_config=config, attention_mask=torch.ones_like(x))
            outs.append(y[0, len(ids) :].tolist())
        return outs

    return best_of(repeats, run)


def oracle(refs: dict, alpha: float, seed: int = 0):
    rng = random.Random(seed)

    def draft(seq: Sequence, proposals: list[int]) -> list[int]:
        ref = refs[tuple(seq.token_ids[: seq.num_prompt_tokens])]
        n = len(seq.completion_ids)
        d = (ref[n : n + len(proposals)] + [0] * len(proposals))[: len(proposals)]
        return [t if rng.random() < alpha else (t + 1) % 256 for t in d]

    return draft


def rids_run(llm: LLM, prompts, max_new: int, stride: int, repeats: int):
    """Best-of-`repeats` seconds, stats and outputs of batch-1 generation over the prompts."""

    def run() -> list:
        outs = []
        for p in prompts:  # batch 1, like the transformers baseline
            outs += llm.generate([p], max_new_tokens=max_new, stride=stride, ignore_eos=True)
        return outs

    seconds, outs = best_of(repeats, run)
    return seconds, GenerationStats.total([o.stats for o in outs]), outs


SHAPES = {
    "small": dict(
        hidden_size=384, num_layers=8, num_heads=6, num_kv_heads=2, head_dim=64,
        intermediate_size=1024, vocab_size=16384, init_std=0.05,
    ),
    "smollm2": dict(
        model_type="llama", hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
        max_position_embeddings=2048, init_std=0.02,
    ),
}  # fmt: skip


def step_cost(llm: LLM, tokens: int, context: int, repeats: int = 10) -> float:
    """Median seconds of one rids forward: a block of `tokens` (1 clean + MASKs) after `context`."""
    return llm.engine.runner.time_step(llm.engine.block_manager, tokens, context, repeats)


def hf_step_cost(base: Path, tokens: int, context: int, repeats: int = 10) -> float:
    """The same for a `transformers` forward over a dynamic cache (no LoRA)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.inference_mode():
        prefix = model(torch.ones(1, context, dtype=torch.long), use_cache=True).past_key_values
        x = torch.ones(1, tokens, dtype=torch.long)

        def forward() -> None:
            if prefix.get_seq_length() > context:
                prefix.crop(-tokens)  # drop the previous call's block
            model(x, past_key_values=prefix, use_cache=True)

        return median_seconds(forward, repeats, warmup=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--strides", default="2,3,4,8")
    ap.add_argument("--alphas", default="0.7,0.9", help="simulated acceptance rates")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (best kept)")
    ap.add_argument("--branches", default="auto", help="MASK branches: off, all, K or auto")
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base or build_tiny_base(Path(tmp) / "base", **SHAPES[args.shape])
        adapter = args.adapter or build_random_adapter(Path(tmp) / "adapter", base, rank=32)
        llm = LLM(base, adapter, branches=args.branches)
        prompts = [llm.encode(p) for p in PROMPTS]
        n_tok = len(prompts) * args.max_new_tokens
        params = sum(p.numel() for p in llm.model.parameters()) / 1e6
        print(f"model: {params:.1f} M parameters, {torch.get_num_threads()} threads, fp32, batch 1")
        hf_s, refs = hf_generate(base, prompts, args.max_new_tokens, args.repeats)
        ar_s, _, ar_outs = rids_run(llm, prompts, args.max_new_tokens, 1, args.repeats)
        assert [o.token_ids for o in ar_outs] == refs, "rids AR differs from transformers"
        refs_by_prompt = {tuple(p): r for p, r in zip(prompts, refs, strict=True)}
        print("| mode | tok/s | TPF | accept/pos | vs rids AR | vs transformers |")
        print("|---|---|---|---|---|---|")

        def row(name: str, seconds: float, stats: GenerationStats | None) -> None:
            tpf = f"{stats.tpf:.2f}" if stats else "1.00"
            acc = " ".join(f"{a:.2f}" for a in stats.acceptance) if stats else "-"
            print(
                f"| {name} | {n_tok / seconds:.1f} | {tpf} | {acc} | "
                f"{ar_s / seconds:.2f}x | {hf_s / seconds:.2f}x |"
            )

        row("transformers.generate", hf_s, None)
        row("rids AR (N=1)", ar_s, None)
        for n in (int(s) for s in args.strides.split(",")):
            s, stats, outs = rids_run(llm, prompts, args.max_new_tokens, n, args.repeats)
            assert [o.token_ids for o in outs] == refs
            row(f"rids R-ISD N={n}, this adapter", s, stats)
            for alpha in (float(a) for a in args.alphas.split(",")):
                llm.engine.drafter = oracle(refs_by_prompt, alpha)
                s, stats, outs = rids_run(llm, prompts, args.max_new_tokens, n, args.repeats)
                llm.engine.drafter = None
                assert [o.token_ids for o in outs] == refs
                row(f"rids R-ISD N={n}, simulated alpha={alpha}", s, stats)
        print(
            "\n| tokens in the step (context 256) | rids ms | ratio to 1 token | transformers ms |"
        )
        print("|---|---|---|---|")
        one = step_cost(llm, 1, 256)
        for t in [1] + [2 * int(n) - 1 for n in args.strides.split(",")]:
            ours = one if t == 1 else step_cost(llm, t, 256)
            theirs = hf_step_cost(base, t, 256)
            print(f"| {t} | {ours * 1e3:.1f} | {ours / one:.2f}x | {theirs * 1e3:.1f} |")


if __name__ == "__main__":
    main()
