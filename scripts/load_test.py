"""Load test of `rids serve` on 127.0.0.1: concurrent streaming clients, each checked.

    python scripts/load_test.py                              # embedded SmolLM2 + its adapter
    python scripts/load_test.py --base B --adapter A --concurrency 1,8,64 --max-tokens 64

For each concurrency C and mode (R-ISD at the adapter's stride, AR), C streaming chat clients
(the official `openai` client) ask different questions at once (the hand-written held-out chat
and adversarial sets in `prompts/`), greedily; every answer must
equal its expected text (computed beforehand with `LLM.generate`), so cross-talk between
streams would show. Reports completion tokens/s, TPF and errors, and checks that every KV page
is free at the end. `--stationary-steps 1,4` also compares stationary batches.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import openai
from rich.console import Console
from rich.table import Table

from rids.embedded import resolve_defaults
from rids.llm import LLM
from rids.serve.app import build_app
from rids.serve.async_engine import AsyncEngine
from rids.serve.local import LocalServer
from rids.train.synthetic import HELD_OUT, read_conversations

MODEL = "rids"


def prompt_set_questions() -> list[str]:
    """The first user turn of each request in the held-out chat set, then the adversarial set."""
    return [
        conversation[0]["content"]
        for path in HELD_OUT.values()
        for conversation in read_conversations(path)
    ]


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


async def ask(client: openai.AsyncOpenAI, question: str, stride: int, max_tokens: int) -> str:
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], temperature=0,
        max_tokens=max_tokens, stream=True, extra_body={"stride": stride},
    )  # fmt: skip
    return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def wave(url: str, questions: list[str], stride: int, max_tokens: int) -> list:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0) as client:
        jobs = [ask(client, q, stride, max_tokens) for q in questions]
        return await asyncio.gather(*jobs, return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base")
    ap.add_argument("--adapter")
    ap.add_argument("--concurrency", type=int_list, default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--stationary-steps", type=int_list, default=[1])
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    args = ap.parse_args()
    base, adapter = resolve_defaults(args.base, args.adapter)
    console = Console()
    pool = prompt_set_questions()  # repeated when a wave is larger than the sets
    questions = [pool[i % len(pool)] for i in range(max(args.concurrency))]
    expected: list[str] = []  # each question's greedy answer, by the first server's engine

    def build(stationary: int) -> LLM:
        """The served LLM, built on its engine's thread like `rids serve`'s (torch work on the
        main thread would slow that thread down); the first one also computes `expected`."""
        llm = LLM(base, adapter, kv_cache_tokens=args.kv_cache_tokens, stationary_steps=stationary)
        if not expected:
            ids = [llm.encode_chat([{"role": "user", "content": q}]) for q in questions]
            outs = llm.generate(ids, max_new_tokens=args.max_tokens, stride=1)
            expected.extend(
                llm.tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs
            )
        return llm

    table = Table(title=f"rids serve load test ({base})")
    for col in ("stationary", "concurrency", "mode", "tokens/s", "TPF", "errors", "mismatches"):
        table.add_column(col, justify="right")
    failures = 0
    for stationary in args.stationary_steps:
        engine = AsyncEngine.load(lambda stationary=stationary: build(stationary))
        llm = engine.llm
        strides = sorted({llm.default_stride, 1}, reverse=True)
        with LocalServer(build_app(engine, MODEL)) as server:
            asyncio.run(wave(server.url, questions[:2], strides[0], 8))  # warm-up
            for c in args.concurrency:
                for stride in strides:
                    before = engine.metrics.totals.copy()
                    t0 = time.perf_counter()
                    results = asyncio.run(wave(server.url, questions[:c], stride, args.max_tokens))
                    seconds = time.perf_counter() - t0
                    errors = [r for r in results if isinstance(r, BaseException)]
                    bad = sum(
                        r != e
                        for r, e in zip(results, expected, strict=False)
                        if not isinstance(r, BaseException)
                    )
                    done = {k: v - before[k] for k, v in engine.metrics.totals.items()}
                    tokens = done["completion_tokens"]
                    tpf = done["decode_tokens"] / max(done["decode_forwards"], 1)
                    failures += len(errors) + bad
                    mode = f"R-ISD N={stride}" if stride > 1 else "AR"
                    table.add_row(
                        str(stationary), str(c), mode, f"{tokens / seconds:.1f}", f"{tpf:.2f}",
                        str(len(errors)), str(bad),
                    )  # fmt: skip
            bm = llm.engine.pages
            time.sleep(0.5)
            if bm.num_free_pages != bm.num_pages:
                console.print(f"[red]{bm.num_pages - bm.num_free_pages} KV pages still in use[/]")
                failures += 1
    console.print(table)
    console.print(
        "tokens/s: completion tokens over the wave's wall time; TPF: decode tokens per "
        "request-forward in that wave"
    )
    if failures:
        raise SystemExit(f"{failures} failures")


if __name__ == "__main__":
    main()
