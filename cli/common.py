"""What every command shares: consoles, the user-error boundary, option parsing."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from rids.errors import RidsError

# piped output (CI logs) gets room for wide tables instead of the 80-column fallback
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)
F = TypeVar("F", bound=Callable)


def show_notes() -> None:
    """rids' start-up notes (a first conversion of the embedded model, a first measurement of
    step times) on stderr, once per process."""
    logger = logging.getLogger("rids")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(
            console=err_console, show_time=False, show_level=False, show_path=False
        )
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # shown here only, not again by a root handler


def fail(message: str, code: int = 1) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn a RidsError into one line on stderr and exit 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RidsError as e:
            raise fail(str(e)) from None

    return wrapper  # type: ignore[return-value]


def int_list(value: str, what: str) -> list[int]:
    return number_list(value, what, int)


def number_list(value: str, what: str, kind: type = float) -> list:
    try:
        items = [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        name = "integers" if kind is int else "numbers"
        raise RidsError(f"{what} must be comma-separated {name}, got {value!r}") from None
    if not items:
        raise RidsError(f"{what} is empty")
    return items


# engine options several commands share
Drafting = Annotated[
    str,
    typer.Option(
        help="adaptive: per request and step, draft only as much as pays (from the running "
        "acceptance and the device's step times), and copy drafts from the text where it "
        "repeats; fixed: always N-1 MASK drafts (the I-DLM step)."
    ),
]
Branches = Annotated[str, typer.Option(help="MASK branches: off, all, K or auto.")]
KvCacheGib = Annotated[
    float | None,
    typer.Option(help="KV cache size in GiB (default: on a GPU, --memory-fraction of the "
                 "memory free after loading; 1 GiB on a CPU)."),
]  # fmt: skip
MemoryFraction = Annotated[
    float, typer.Option(help="GPU: the share of free memory the KV cache takes.")
]


def format_rates(values: list[float]) -> str:
    """Per-position rates as the CLI prints them: `0.53 0.46 0.40`."""
    return " ".join(f"{v:.2f}" for v in values)


def log_line_due(done: int, total: int, lines: int = 20) -> bool:
    """Whether a long run prints a plain progress line at DONE of TOTAL: about LINES lines a run
    where stdout is a log (rich draws no live bar there), none on a terminal."""
    every = max(1, -(-total // lines))  # rounded up: at most LINES lines
    return not console.is_terminal and (done == total or done % every == 0)
