"""CPU benchmark, every figure from one run: rids' default vs rids AR vs transformers vs llama.cpp.

    python scripts/bench_cpu.py                     # embedded default: held-out chat, adversarial
    python scripts/bench_cpu.py --sets heldout --num-prompts 20 --max-new-tokens 64
    python scripts/bench_cpu.py --base B --adapter A --sets heldout
    python scripts/bench_cpu.py --shape smollm2     # random weights, oracle drafts (simulated)
    python scripts/bench_cpu.py --sets '' --batch-sizes 4,16,32   # batched held-out only
    python scripts/bench_cpu.py --compare-adapter OLD   # also the default with another adapter
    python scripts/bench_cpu.py --dtype bfloat16    # every rids mode and transformers in bf16

Prompt sets (prompts/): `heldout` is 60 hand-written chat requests that neither training nor
tuning ever saw; `adversarial` is text nothing can draft (random strings to copy, words to spell
with dashes, ...). Every request goes through the chat template, greedy, batch 1, and stops at
EOS or --max-new-tokens; after a warm-up, request by request, every mode runs in turn (so a
machine that speeds up or slows down during the run shifts every mode alike; the set is the
repeat). Every rids mode is checked token for token against rids AR, and rids AR against
`transformers.generate` (a near-tie flip is reported, not hidden: docs/numerics.md); with
`--dtype bfloat16` the shape-dependent rounding is large enough for rids modes to flip at
near-ties too, so there they are counted, not asserted.

Modes: `transformers.generate`; rids AR (the base alone, no adapter loaded); rids default
(adaptive drafting, N = 4, branches auto, drafts copied from the text where it repeats and
from the adapter's corpus of the base's answers, sibling paths where they pay: what `rids chat`
runs), the same without the draft head (the counts choose), without the next-token counts,
without the per-request trust in the chooser (every request keeps the chooser's drafts),
without the corpus copies, without any copies, and without sibling paths (`--ablations`); rids
fixed N = 2, 3, 4 (the I-DLM step, MASK drafts only, no branches: TPF and acceptance measure
the drafter); acceptance per position is the MASK drafts' (copies are counted apart);
llama.cpp on the same GGUF when `llama-cpp-python` is installed (4-bit weights: not the same
arithmetic). The step-cost table is the drafting policy's own model (one whole step: forward,
verification, its host copy, by tokens in it); the last table times `rids chat --prompt Q` as
a user would, a fresh process each, default vs `--ar`. `--batch-sizes` adds batched runs of
the held-out set (default vs rids AR at each batch size); `--default-strides 4,6` runs the
default at other strides too (the ablations stay at N = 4); `--compare-adapter` adds the
default and fixed N = 4 with another adapter for the same base (the previous release, say),
in the same interleaving.

With `--shape`, a random base and adapter at those shapes stand in and the MASK proposals are
replaced by an oracle (the base's own greedy continuation, each draft right with probability
alpha): rows labelled "simulated" measure the engine at that acceptance, not a drafter.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from rids.embedded import resolve_defaults
from rids.engine.cost_model import CostModel
from rids.engine.sequence import Sequence
from rids.llm import LLM, parse_dtype
from rids.outputs import GenerationStats
from rids.tiny import build_random_adapter, build_tiny_base
from rids.train.synthetic import HELD_OUT as SETS
from rids.train.synthetic import read_conversations

# the default without one of its parts: --ablations keys and what each mode leaves out
ABLATIONS = {
    "head": "the draft head",
    "trust": "the per-request trust in the chooser",
    "counts": "next-token counts",
    "corpus": "corpus copies",
    "copies": "copies",
    "sibling": "sibling paths",
}
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


# a mode: one request's prompt ids -> (completion ids, or a token count where the ids are not
# rids' tokens; rids' statistics, or None)
Run = Callable[[list[int]], tuple[list[int] | int, GenerationStats | None]]


@dataclass
class Mode:
    label: str
    run: Run
    seconds: float = 0.0
    outputs: list = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return sum(o if isinstance(o, int) else len(o) for o, _ in self.outputs)

    @property
    def stats(self) -> GenerationStats | None:
        stats = [s for _, s in self.outputs if s is not None]
        return GenerationStats.total(stats) if stats else None


def hf_mode(base: Path, max_new: int, dtype: torch.dtype) -> Mode:
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    config = transformers.GenerationConfig(
        max_new_tokens=max_new, do_sample=False, pad_token_id=0,
        eos_token_id=model.generation_config.eos_token_id,
    )  # fmt: skip

    @torch.inference_mode()
    def run(ids: list[int]) -> tuple[list[int], None]:
        x = torch.tensor([ids])
        y = model.generate(x, generation_config=config, attention_mask=torch.ones_like(x))
        return y[0, len(ids) :].tolist(), None

    return Mode("transformers.generate", run)


def rids_mode(label: str, llm: LLM, max_new: int, stride: int, drafter=None) -> Mode:
    """Batch 1, like the other modes: each prompt alone (`drafter`: the engine's, meanwhile)."""

    def run(ids: list[int]) -> tuple[list[int], GenerationStats]:
        llm.engine.drafter = drafter
        try:
            out = llm.generate([ids], max_new_tokens=max_new, stride=stride)[0]
        finally:
            llm.engine.drafter = None
        return out.token_ids, out.stats

    return Mode(label, run)


def llama_cpp_mode(max_new: int) -> Mode | None:
    """llama.cpp on the embedded GGUF (4-bit weights), batch 1, greedy (it reports a token
    count); None if `llama-cpp-python` is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from rids.embedded import smollm2_gguf

    model = Llama(
        model_path=str(smollm2_gguf()), n_ctx=2048, n_threads=torch.get_num_threads(),
        verbose=False,
    )  # fmt: skip

    def run(ids: list[int]) -> tuple[int, None]:
        model.reset()
        out = model.create_completion(prompt=ids, max_tokens=max_new, temperature=0.0)
        return out["usage"]["completion_tokens"], None

    label = f"llama.cpp (same GGUF, 4-bit, {torch.get_num_threads()} threads)"
    return Mode(label, run)


def interleaved(modes: list[Mode], prompts: list[list[int]]) -> None:
    """Each mode warms up on the first two prompts; then request by request, every mode in
    turn (a machine that speeds up or slows down during the run shifts every mode alike)."""
    for mode in modes:
        for ids in prompts[:2]:
            mode.run(ids)
    for ids in prompts:
        for mode in modes:
            t0 = time.perf_counter()
            out = mode.run(ids)
            mode.seconds += time.perf_counter() - t0
            mode.outputs.append(out)


def oracle(refs: dict, alpha: float, seed: int = 0):
    """A drafter for `engine.drafter`: the base's own continuation (`refs`, by prompt), each
    draft right with probability `alpha`, else a token that differs from it."""
    rng = random.Random(seed)

    def draft(seq: Sequence, proposals: list[int], second: int | None):
        ref = refs[tuple(seq.token_ids[: seq.num_prompt_tokens])]
        n = len(seq.completion_ids)
        d = (ref[n : n + len(proposals)] + [0] * len(proposals))[: len(proposals)]
        return [t if rng.random() < alpha else (t + 1) % 256 for t in d], None

    return draft


def print_step_costs(cost: CostModel) -> None:
    """The step-time model the drafting policy uses (measured at engine start or cached)."""
    sizes = [n for n in (1, 2, 3, 4, 5, 7, 10, 16) if n <= cost.tokens[-1]]
    one = cost.time(1)
    print("\n| tokens in the step | " + " | ".join(map(str, sizes)) + " |")
    print("|---" * (len(sizes) + 1) + "|")
    for name, seconds in [
        ("1 clean + MASKs, ms", lambda n: cost.time(1, n - 1)),
        ("all clean (drafts verified), ms", lambda n: cost.time(n)),
    ]:
        print(f"| {name} | " + " | ".join(f"{seconds(n) * 1e3:.1f}" for n in sizes) + " |")
    print("| 1 clean + MASKs, x a 1-token step | " + " | ".join(
        f"{cost.time(1, n - 1) / one:.2f}" for n in sizes) + " |")  # fmt: skip


def row(name: str, rate: float, ar_rate: float, hf_rate: float, stats=None) -> str:
    """One table row; rates in tokens per second."""
    tpf = f"{stats.tpf:.2f}" if stats else "1.00"
    acc = " ".join(f"{a:.2f}" for a in stats.acceptance) if stats else "-"
    if stats and stats.copy_steps:
        acc += f"; copies: {stats.copies_accepted} passed in {stats.copy_steps} steps"
    if stats and stats.sibling_steps:
        acc += f"; sibling paths: {stats.sibling_accepted} passed in {stats.sibling_steps} steps"
    vs_hf = f"{rate / hf_rate:.2f}x" if hf_rate else "-"
    return f"| {name} | {rate:.1f} | {tpf} | {acc} | {rate / ar_rate:.2f}x | {vs_hf} |"


def bench_set(name, prompts, args, base, llm, ar_llm, alphas) -> None:
    print(f"\n### {name}: {len(prompts)} requests, <= {args.max_new_tokens} new tokens\n")
    max_new = args.max_new_tokens
    ar = rids_mode("rids AR (no adapter)", ar_llm, max_new, 1)
    hf = hf_mode(base, max_new, args.torch_dtype) if args.hf else None
    refs: dict[tuple[int, ...], list[int]] = {}  # the oracle's: AR's text, filled as AR runs

    def ar_run(ids: list[int]):
        out = ar.run(ids)
        refs[tuple(ids)] = out[0]
        return out

    modes = [Mode(ar.label, ar_run), *([hf] if hf else [])]
    engines = [
        (f"rids default (adaptive, N={n}, branches auto)", llm["default"], n)
        for n in args.default_strides
    ]
    engines += [(f"rids default without {ABLATIONS[a]}", llm[a], 4) for a in args.ablations]
    engines += [(f"rids fixed N={n}, no branches", llm["fixed"], n) for n in args.strides]
    if args.compare_adapter:  # another adapter for the same base, side by side
        name = args.compare_adapter.name
        engines += [(f"rids default, adapter {name}", llm["compare"], 4)]
        engines += [(f"rids fixed N=4, no branches, adapter {name}", llm["compare fixed"], 4)]
    for label, engine_llm, n in engines:
        for alpha in alphas or [None]:
            drafter = oracle(refs, alpha) if alpha is not None else None
            suffix = f", simulated alpha={alpha}" if alpha is not None else ""
            modes.append(rids_mode(label + suffix, engine_llm, max_new, n, drafter))
    cpp = llama_cpp_mode(max_new) if args.base is None and args.shape is None else None
    interleaved(modes + ([cpp] if cpp else []), prompts)
    ar_mode, ar_ids = modes[0], [o for o, _ in modes[0].outputs]
    flips, exact = False, args.torch_dtype == torch.float32
    for mode in modes[1:]:
        ids = [o for o, _ in mode.outputs]
        diff = sum(a != b for a, b in zip(ar_ids, ids, strict=True))
        if mode is hf or (diff and not exact):  # rounding: docs/numerics.md
            flips |= mode is not hf and diff > 0
            why = "near-ties" if exact else f"{args.dtype} rounding, not checked one by one"
            if diff:
                print(f"note: {mode.label} and rids AR differ on {diff} request(s) ({why})\n")
        else:
            assert not diff, f"{mode.label}: output differs from rids AR"
    print("| mode | tok/s | TPF | accept/pos | vs rids AR | vs transformers |")
    print("|---|---|---|---|---|---|")
    ar_rate = ar_mode.tokens / ar_mode.seconds
    hf_rate = hf.tokens / hf.seconds if hf else 0.0
    for mode in ([hf] if hf else []) + [ar_mode] + modes[1 + bool(hf) :] + ([cpp] if cpp else []):
        stats = None if mode is ar_mode else mode.stats
        print(row(mode.label, mode.tokens / mode.seconds, ar_rate, hf_rate, stats))
    if cpp is None and args.base is None and args.shape is None:
        print("| llama.cpp: not installed (`pip install llama-cpp-python`) | | | | | |")
    same = "every rids mode token-identical to it"
    if flips:
        same = "the rids modes differ from it where noted above"
    print(f"\n{ar_mode.tokens} tokens of rids AR; {same}.")


def chat_processes(
    base: Path, adapter: Path, questions: list[str], max_new: int, dtype: str
) -> None:
    """What a stopwatch says for `rids chat --prompt Q`, a fresh process per question (imports,
    loading, the step-time model, the answer), the default and `--ar` alternating, their answers
    checked to be the same text; one more default process first, from an empty step-time cache."""
    print("\n### `rids chat --prompt Q`, a fresh process each: wall seconds\n")
    cmd = [sys.executable, "-m", "rids_cli", "chat", "--max-new-tokens", str(max_new)]
    cmd += ["--base", str(base), "--adapter", str(adapter), "--dtype", dtype]

    def chat(question: str, flags: list[str], env: dict | None = None) -> tuple[float, str]:
        t0 = time.perf_counter()
        done = subprocess.run([*cmd, *flags, "--prompt", question], env=env, capture_output=True,
                              text=True)  # fmt: skip
        if done.returncode:
            raise SystemExit(f"rids chat {' '.join(flags)} failed:\n{done.stderr}")
        answer = done.stdout.rstrip().rpartition("\n")[0]  # without the status line
        return time.perf_counter() - t0, answer

    with tempfile.TemporaryDirectory() as cold:
        cold_s, _ = chat(questions[0], [], {**os.environ, "RIDS_CACHE": cold})
    seconds: dict[str, list[float]] = {"default": [], "--ar": []}
    differ, exact = 0, parse_dtype(dtype, "cpu") == torch.float32
    for question in questions:
        (default_s, text), (ar_s, ar_text) = chat(question, []), chat(question, ["--ar"])
        assert text == ar_text or not exact, f"rids chat and --ar answered differently: {question}"
        differ += text != ar_text
        seconds["default"].append(default_s)
        seconds["--ar"].append(ar_s)
    ar = sum(seconds["--ar"]) / len(questions)
    print("| engine | mean s | vs --ar |")
    print("|---|---|---|")
    for label, runs in seconds.items():
        mean = sum(runs) / len(runs)
        print(f"| {label} | {mean:.2f} | {mean / ar:.2f}x |")
    print(f"| default, empty step-time cache (first question) | {cold_s:.2f} | |")
    print(f"\n{len(questions)} single-turn held-out questions, <= {max_new} new tokens each.")
    if differ:
        print(f"They answered differently {differ} time(s) ({dtype} rounding: docs/numerics.md).")


def batched(
    prompts: list[list[int]], sizes: list[int], llm: LLM, ar_llm: LLM, max_new: int
) -> None:
    """Throughput at batch B: the requests B at a time, two batches per size, the default and
    rids AR alternating which goes first. Where a batch already keeps the device busy, a
    drafted token costs more of a step and drafting has less to gain."""
    print(f"\n### Batched: {len(prompts)} held-out requests B at a time, <= {max_new} new tokens\n")
    print("| batch | rids AR tok/s | default tok/s | default TPF | default vs rids AR |")
    print("|---|---|---|---|---|")
    for engine in (llm, ar_llm):
        engine.generate(prompts[:2], max_new_tokens=8)  # warm-up
    for size in sizes:
        seconds, tokens, stats = {llm: 0.0, ar_llm: 0.0}, 0, []
        for rep in range(2):
            batch = [prompts[(rep * size + i) % len(prompts)] for i in range(size)]
            outs = {}
            for engine in (llm, ar_llm) if rep % 2 == 0 else (ar_llm, llm):
                t0 = time.perf_counter()
                outs[engine] = engine.generate(batch, max_new_tokens=max_new)
                seconds[engine] += time.perf_counter() - t0
            ids = [o.token_ids for o in outs[ar_llm]]
            assert [o.token_ids for o in outs[llm]] == ids, f"batch {size}: output differs"
            tokens += sum(map(len, ids))
            stats += [o.stats for o in outs[llm]]
        ar_rate, rate = tokens / seconds[ar_llm], tokens / seconds[llm]
        tpf = GenerationStats.total(stats).tpf
        print(f"| {size} | {ar_rate:.1f} | {rate:.1f} | {tpf:.2f} | {rate / ar_rate:.2f}x |")
    print("\nEvery batch token-identical to rids AR.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path)
    ap.add_argument("--adapter", type=Path)
    ap.add_argument("--shape", choices=sorted(SHAPES), help="random weights at these shapes")
    ap.add_argument("--sets", default="heldout,adversarial", help="batch-1 sets ('' for none)")
    ap.add_argument("--num-prompts", type=int, default=0, help="first n of each set (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--strides", default="2,3,4", help="fixed strides to run")
    ap.add_argument(
        "--default-strides", default="4", help="strides of the default to run (ablations: N=4)"
    )
    ap.add_argument("--alphas", default="0.7,0.9", help="--shape: simulated acceptance rates")
    ap.add_argument("--no-hf", dest="hf", action="store_false", help="skip transformers")
    ap.add_argument(
        "--ablations", default=",".join(ABLATIONS), help="default-without-X modes to run ('': none)"
    )
    ap.add_argument("--batch-sizes", default="", help="also batched held-out runs, e.g. 4,16,32")
    ap.add_argument(
        "--compare-adapter", type=Path, help="also the default and fixed N=4 with this adapter"
    )
    ap.add_argument("--dtype", default="float32", help="of every rids mode and transformers")
    args = ap.parse_args()
    args.torch_dtype = parse_dtype(args.dtype, "cpu")
    args.ablations = [a for a in args.ablations.split(",") if a]
    if unknown := set(args.ablations) - set(ABLATIONS):
        ap.error(f"unknown --ablations {sorted(unknown)}: choose from {','.join(ABLATIONS)}")
    args.strides = [int(n) for n in args.strides.split(",") if n]
    args.default_strides = [int(n) for n in args.default_strides.split(",") if n]
    if not args.default_strides or min(args.default_strides) < 2:
        ap.error("--default-strides needs strides >= 2, e.g. 4 or 4,6")
    sets = [n for n in args.sets.split(",") if n]
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        alphas: list[float] = []
        if args.shape is None:
            base, adapter = (Path(p) if p else None for p in resolve_defaults(
                None if args.base is None else str(args.base),
                None if args.adapter is None else str(args.adapter),
            ))  # fmt: skip
            if adapter is None:
                raise SystemExit("no adapter: pass --adapter (or install from a clone)")
        else:
            base = build_tiny_base(Path(tmp) / "base", **SHAPES[args.shape])
            adapter = build_random_adapter(Path(tmp) / "adapter", base, rank=32)
            alphas = [float(a) for a in args.alphas.split(",") if a]
        dtype = args.dtype
        ar_llm = LLM(base, dtype=dtype)
        llm = {
            "default": LLM(base, adapter, dtype=dtype),
            **{a: LLM(base, adapter, dtype=dtype) for a in args.ablations},
            "fixed": LLM(base, adapter, dtype=dtype, drafting="fixed", branches="off"),
        }
        if args.compare_adapter:
            other = args.compare_adapter
            llm["compare"] = LLM(base, other, dtype=dtype)
            llm["compare fixed"] = LLM(base, other, dtype=dtype, drafting="fixed", branches="off")
        for name in args.ablations:
            policy = llm[name].engine.policy
            if name == "head":
                policy.set_draft_sources(policy.corpus, policy.next_tokens, None)
            elif name == "counts":
                policy.set_draft_sources(policy.corpus, None, policy.draft_head)
            elif name == "corpus":
                policy.set_draft_sources(None, policy.next_tokens, policy.draft_head)
            elif name == "trust":  # every request keeps its chooser's drafts
                policy.trusts_chooser = lambda seq: True
            elif name == "copies":
                policy.prompt_lookup = False
            else:
                policy.siblings = False
        params = sum(p.numel() for p in ar_llm.model.parameters()) / 1e6
        print(
            f"model: {base.name} ({params:.1f} M parameters), adapter: {adapter.name}, "
            f"{torch.get_num_threads()} threads, {dtype}, greedy, batch 1"
        )
        if (cost := llm["default"].engine.policy.cost) is not None:
            print_step_costs(cost)
        for name in sets:
            conversations = read_conversations(SETS[name])
            if args.num_prompts:
                conversations = conversations[: args.num_prompts]
            prompts = [ar_llm.encode_chat(c) for c in conversations]
            bench_set(name, prompts, args, base, llm, ar_llm, alphas)
        if args.batch_sizes:
            sizes = [int(n) for n in args.batch_sizes.split(",")]
            held_out = [ar_llm.encode_chat(c) for c in read_conversations(SETS["heldout"])]
            batched(held_out, sizes, llm["default"], ar_llm, args.max_new_tokens)
        if args.shape is None and "heldout" in sets:
            single_turn = [c for c in read_conversations(SETS["heldout"]) if len(c) == 1][:6]
            questions = [c[-1]["content"] for c in single_turn]
            chat_processes(base, adapter, questions, args.max_new_tokens, dtype)


if __name__ == "__main__":
    main()
