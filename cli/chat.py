"""`rids chat`: streaming multi-turn chat with a live tokens/s, TPF and acceptance line."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer
from rich.console import Group
from rich.live import Live
from rich.text import Text

from rids.chat import ChatSession
from rids.embedded import resolve_defaults
from rids.errors import RidsError
from rids.llm import LLM
from rids.outputs import GenerationStats
from rids.sampling import SamplingParams
from rids_cli.common import Branches, Drafting, console, err_console, format_rates, user_errors

HELP = (
    "/reset clears the conversation, /trim drops its oldest exchange, /stats shows totals, "
    "/exit quits; Ctrl-C stops an answer."
)


@user_errors
def chat_command(
    base: Annotated[
        str | None, typer.Option(help="Base model (default: embedded SmolLM2).")
    ] = None,
    adapter: Annotated[str | None, typer.Option(help="Gated adapter.")] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Answer this one message and exit (stdin works too).")
    ] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    stride: Annotated[int | None, typer.Option(help="Stride N (default: the trained one).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer, at most.")] = 256,
    temperature: Annotated[float, typer.Option(help="0: greedy (lossless).")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sampling: keep the k likeliest tokens.")] = 0,
    top_p: Annotated[float, typer.Option(help="Sampling: nucleus mass.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    ar: Annotated[bool, typer.Option(help="Base-only AR decoding, for comparison.")] = False,
    drafting: Drafting = "adaptive",
    branches: Branches = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16, auto.")] = None,
) -> None:
    """Chat with a model; R-ISD commits several tokens per forward, exactly as the base would."""
    with err_console.status("loading the model"):
        base, adapter = resolve_defaults(base, adapter)
        llm = LLM(
            base, None if ar else adapter, device=device, dtype=dtype, drafting=drafting,
            branches=branches,
        )  # fmt: skip
    session = ChatSession(
        llm,
        system=system,
        stride=1 if ar else stride,
        max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature, top_k, top_p, seed),
    )
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
    if prompt is not None:
        answer(session, prompt)
        return
    console.print(f"[dim]rids chat: {llm.base_path.name}. {HELP}[/]")
    while True:
        try:
            text = console.input("[bold]> [/]").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            session.reset()
            console.print("[dim]conversation cleared[/]")
        elif text == "/trim":
            trimmed = session.trim()
            console.print(f"[dim]{'oldest exchange dropped' if trimmed else 'nothing to drop'}[/]")
        elif text == "/stats":
            t = session.total
            console.print(f"[dim]{len(session.turns)} answers, {status(t)}[/]")
        elif text:
            try:
                answer(session, text)
            except RidsError as e:  # this turn only: the conversation stays
                err_console.print(f"[bold red]error:[/] {e}")


def answer(session: ChatSession, text: str) -> None:
    """Stream one answer; on a terminal a live status line follows it as tokens commit."""
    t0 = time.perf_counter()
    shown = Text()
    try:
        if console.is_terminal:
            with Live(
                shown, console=console, refresh_per_second=8, vertical_overflow="visible"
            ) as live:
                for chunk in session.ask(text):
                    shown.append(chunk)
                    stats = GenerationStats.of(session.seq)
                    line = Text(live_status(stats, t0), style="dim")
                    live.update(Group(shown, line))
                live.update(shown)
        else:
            for chunk in session.ask(text):
                console.print(chunk, end="", markup=False, highlight=False, soft_wrap=True)
            console.print()
    except KeyboardInterrupt:
        console.print("[dim](stopped)[/]")
    console.print(f"[dim]{live_status(session.turns[-1], t0)}[/]")


def live_status(stats: GenerationStats, t0: float) -> str:
    return f"{(stats.decode_tokens + 1) / (time.perf_counter() - t0):.1f} tok/s, {status(stats)}"


def status(stats: GenerationStats) -> str:
    acc = format_rates(stats.acceptance) or "-"
    copies = (
        f", copied {stats.copies_accepted} in {stats.copy_steps} steps" if stats.copy_steps else ""
    )
    sibling = (
        f", sibling paths {stats.sibling_accepted} in {stats.sibling_steps} steps"
        if stats.sibling_steps
        else ""
    )
    return (
        f"TPF {stats.tpf:.2f}, acceptance {acc}, cold starts {stats.cold_starts}{copies}{sibling}"
    )
