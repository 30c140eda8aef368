"""CPU benchmark, all figures from one run: transformers.generate vs rids AR vs rids R-ISD.

    python scripts/bench_cpu.py                       # SmolLM2-135M-Instruct + its rids adapter
    python scripts/bench_cpu.py --shape small         # a 28M-parameter random Qwen3 (built here)
    python scripts/bench_cpu.py --shape smollm2       # random weights at SmolLM2-135M shapes
    python scripts/bench_cpu.py --base B --adapter A  # your own pair

On the embedded default (or with --chat) the prompts are held-out chat requests in the chat
template and every mode stops at EOS (the same tokens everywhere: decoding is lossless);
otherwise fixed prompts run for exactly --max-new-tokens. llama.cpp (`llama-cpp-python`, 4-bit
GGUF) joins the embedded run when it is installed. The bound column is 0.9 x TPF / (cost of the
N-step block relative to a 1-token step): the speedup over rids AR that the measured TPF and
block cost allow.

R-ISD speed depends on how often drafts are accepted. A random adapter's drafts are not, so the
script also replaces the MASK proposals by an oracle (the base's own greedy continuation, each
draft corrupted with probability 1 - alpha): those rows are labelled "simulated" and measure what
the engine does at that acceptance rate, not what a trained adapter achieves.
"""

from __future__ import annotations

import argparse
import functools
import random
import tempfile
import time
from pathlib import Path

import torch
import transformers

from rids.embedded import resolve_defaults
from rids.engine.sequence import Sequence
from rids.llm import LLM
from rids.outputs import GenerationStats
from rids.tiny import build_random_adapter, build_tiny_base
from rids.train.synthetic import read_conversations
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


def hf_generate(base: Path, prompts: list[list[int]], max_new: int, repeats: int, eos: bool):
    """Best-of-`repeats` seconds and outputs of batch-1 `transformers` greedy generation
    (`eos`: stop at the model's EOS, else run exactly `max_new` tokens)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    config = transformers.GenerationConfig(
        max_new_tokens=max_new,
        min_new_tokens=0 if eos else max_new,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=0,
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


def llama_cpp_tokens_per_second(prompts: list[list[int]], max_new: int) -> float | None:
    """llama.cpp on the embedded GGUF (4-bit weights), batch 1, greedy; None if not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from rids.embedded import smollm2_gguf

    model = Llama(
        model_path=str(smollm2_gguf()), n_ctx=2048, n_threads=torch.get_num_threads(),
        verbose=False,
    )  # fmt: skip
    tokens, t0 = 0, time.perf_counter()
    for ids in prompts:
        out = model.create_completion(prompt=ids, max_tokens=max_new, temperature=0.0)
        tokens += out["usage"]["completion_tokens"]
    return tokens / (time.perf_counter() - t0)


def oracle(refs: dict, alpha: float, seed: int = 0):
    rng = random.Random(seed)

    def draft(seq: Sequence, proposals: list[int]) -> list[int]:
        ref = refs[tuple(seq.token_ids[: seq.num_prompt_tokens])]
        n = len(seq.completion_ids)
        d = (ref[n : n + len(proposals)] + [0] * len(proposals))[: len(proposals)]
        return [t if rng.random() < alpha else (t + 1) % 256 for t in d]

    return draft


def rids_run(llm: LLM, prompts, max_new: int, stride: int, repeats: int, eos: bool):
    """Best-of-`repeats` seconds, stats and outputs of batch-1 generation over the prompts."""

    def run() -> list:
        outs = []
        for p in prompts:  # batch 1, like the transformers baseline
            outs += llm.generate([p], max_new_tokens=max_new, stride=stride, ignore_eos=not eos)
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
    return median_seconds(lambda: llm.engine.time(tokens, context), repeats)


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
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random weights at these shapes")
    ap.add_argument("--chat", action="store_true", help="held-out chat prompts, stop at EOS")
    ap.add_argument("--num-prompts", type=int, default=8, help="chat prompts")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--strides", default="2,3,4,8")
    ap.add_argument("--alphas", default="0.7,0.9", help="simulated acceptance rates ('' none)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (best kept)")
    ap.add_argument("--branches", default="auto", help="MASK branches: off, all, K or auto")
    args = ap.parse_args()
    torch.manual_seed(0)
    strides = [int(n) for n in args.strides.split(",")]
    alphas = [float(a) for a in args.alphas.split(",") if a]
    with tempfile.TemporaryDirectory() as tmp:
        embedded = args.base is None and args.shape is None
        if embedded:
            base, adapter = (Path(p) if p else None for p in resolve_defaults(None, None))
            if adapter is None:
                raise SystemExit("this install has no embedded adapter (adapters/ folder)")
            alphas = []
        else:
            shape = SHAPES[args.shape or "small"]
            base = args.base or build_tiny_base(Path(tmp) / "base", **shape)
            adapter = args.adapter or build_random_adapter(Path(tmp) / "adapter", base, rank=32)
        llm = LLM(base, adapter, branches=args.branches)
        chat = embedded or args.chat
        if chat:
            held_out = Path(__file__).resolve().parents[1] / "prompts" / "heldout_chat.jsonl"
            conversations = read_conversations(held_out)[: args.num_prompts]
            prompts = [llm.encode_chat(c) for c in conversations]
        else:
            prompts = [llm.encode(p) for p in PROMPTS]
        params = sum(p.numel() for p in llm.model.parameters()) / 1e6
        print(
            f"model: {base.name} ({params:.1f} M parameters), {torch.get_num_threads()} threads, "
            f"fp32, batch 1, {len(prompts)} prompts, <= {args.max_new_tokens} new tokens"
        )
        hf_s, refs = hf_generate(base, prompts, args.max_new_tokens, args.repeats, eos=chat)
        n_tok = sum(len(r) for r in refs)
        run = functools.partial(
            rids_run, llm, prompts, args.max_new_tokens, repeats=args.repeats, eos=chat
        )
        ar_s, _, ar_outs = run(1)
        assert [o.token_ids for o in ar_outs] == refs, "rids AR differs from transformers"
        refs_by_prompt = {tuple(p): r for p, r in zip(prompts, refs, strict=True)}
        context = 256
        one = step_cost(llm, 1, context)
        cost = {n: step_cost(llm, 2 * n - 1, context) / one for n in strides}
        print(f"{n_tok} tokens generated per mode (identical in every mode)\n")
        cols = "mode | tok/s | TPF | accept/pos | vs rids AR | vs transformers | block cost | bound"
        print(f"| {cols} |")
        print("|---|---|---|---|---|---|---|---|")

        def row(name: str, seconds: float, stats: GenerationStats | None, n: int = 1) -> None:
            tpf = f"{stats.tpf:.2f}" if stats else "1.00"
            acc = " ".join(f"{a:.2f}" for a in stats.acceptance) if stats else "-"
            bound = f"{0.9 * stats.tpf / cost[n]:.2f}x" if stats else "-"
            block = f"{cost[n]:.2f}x" if stats else "-"
            print(
                f"| {name} | {n_tok / seconds:.1f} | {tpf} | {acc} | {ar_s / seconds:.2f}x | "
                f"{hf_s / seconds:.2f}x | {block} | {bound} |"
            )

        row("transformers.generate", hf_s, None)
        row("rids AR (N=1)", ar_s, None)
        speedups = {1: (hf_s / ar_s, 1.0)}
        for n in strides:
            s, stats, outs = run(n)
            assert [o.token_ids for o in outs] == refs
            speedups[n] = (hf_s / s, ar_s / s)
            row(f"rids R-ISD N={n}, this adapter", s, stats, n)
            for alpha in alphas:
                llm.engine.drafter = oracle(refs_by_prompt, alpha)
                s, stats, outs = run(n)
                llm.engine.drafter = None
                assert [o.token_ids for o in outs] == refs
                row(f"rids R-ISD N={n}, simulated alpha={alpha}", s, stats, n)
        if chat and (llama := llama_cpp_tokens_per_second(prompts, args.max_new_tokens)):
            name = f"llama.cpp (4-bit GGUF, {torch.get_num_threads()} threads)"
            vs_ar, vs_hf = llama * ar_s / n_tok, llama * hf_s / n_tok
            print(f"| {name} | {llama:.1f} | 1.00 | - | {vs_ar:.2f}x | {vs_hf:.2f}x | - | - |")
        print(
            "\nblock cost: one forward over the N-step block (2N-1 tokens) relative to a 1-token "
            f"step, context {context}, measured in this run; bound = 0.9 x TPF / block cost"
        )
        ns = sorted(speedups)
        print("\n```mermaid\nxychart-beta")
        lines = "top: vs transformers, bottom: vs rids AR"
        print(f'    title "{base.name}: speedup vs stride N ({lines})"')
        print(f'    x-axis "stride N" [{", ".join(map(str, ns))}]')
        print('    y-axis "speedup (x)"')
        for i in range(2):
            print(f"    line [{', '.join(f'{speedups[n][i]:.2f}' for n in ns)}]")
        print("```")


if __name__ == "__main__":
    main()
