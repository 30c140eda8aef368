"""`rids merge`: fold an adapter into its base, or combine adapters for one base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rids.errors import RidsError
from rids.llm import LLM
from rids.merge import combine_adapters, fold_adapter
from rids_cli.common import console, user_errors


@user_errors
def merge_command(
    base: Annotated[str, typer.Option(help="Base model: local folder or hub id.")],
    adapter: Annotated[list[str], typer.Option(help="Adapter; give two or more to combine.")],
    output: Annotated[Path, typer.Option(help="Output folder.")],
    weights: Annotated[
        str | None, typer.Option(help="Combining: comma-separated weights (default: all 1).")
    ] = None,
    method: Annotated[
        str, typer.Option(help="Combining: cat (exact, ranks add up) or svd (to --rank).")
    ] = "cat",
    rank: Annotated[int | None, typer.Option(help="Combining with svd: target rank.")] = None,
) -> None:
    """One adapter: fold it into the base (a standalone checkpoint, plain ISD, NOT lossless).
    Several: combine them into one adapter."""
    if len(adapter) == 1:
        path = fold_adapter(base, adapter[0], output)
        console.print(
            f"merged checkpoint written to {path}: it runs in plain ISD mode (`--base {path}`, "
            "no adapter); its output is no longer the base model's"
        )
        return
    try:
        w = [float(x) for x in weights.split(",")] if weights else [1.0] * len(adapter)
    except ValueError:
        raise RidsError(f"--weights must be comma-separated numbers, got {weights!r}") from None
    path = combine_adapters(LLM(base), adapter, w, output, method, rank)
    console.print(f"combined adapter ({method}) written to {path}")
