"""`rids verify-lossless`: the CI check that R-ISD output equals the base's greedy output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from rids.config import check_stride
from rids.embedded import resolve_defaults
from rids.errors import RidsError
from rids.llm import LLM
from rids.utils.io import atomic_write_text
from rids.verify import CaseResult, read_prompts, report, verify_lossless
from rids_cli.common import Branches, Drafting, console, int_list, user_errors


@user_errors
def verify_lossless_command(
    base: Annotated[
        str | None,
        typer.Option(help="Base model: local folder or hub id (default: the embedded SmolLM2)."),
    ] = None,
    adapter: Annotated[
        str | None,
        typer.Option(
            help="Gated adapter (PEFT folder or hub id); none for a whole-model ISD base. "
            "Default with no --base: the embedded SmolLM2's adapter."
        ),
    ] = None,
    strides: Annotated[str, typer.Option(help="Strides N to check, comma-separated.")] = "2,3,4,8",
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,4",
    prompts: Annotated[
        Path | None, typer.Option(help="Prompts file, one per line (default: built-in set).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 64,
    report_path: Annotated[
        Path | None, typer.Option("--report", help="Write the results as JSON here.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32 (exact on CPU), bfloat16, float16, auto")] = (
        "float32"
    ),
    reference: Annotated[
        str | None,
        typer.Option(help="Compare with this model's greedy output instead of the base's."),
    ] = None,
    drafting: Drafting = "adaptive",
    branches: Branches = "auto",
    ungated: Annotated[
        bool,
        typer.Option(help="Diagnostic: apply the LoRA at every token (not lossless; must fail)."),
    ] = False,
    tie_margin: Annotated[
        float | None,
        typer.Option(
            help="A divergence to the reference's 2nd choice where its top-1/top-2 logit margin "
            "is at most this is a near-tie (rounding), not a failure; 0: strict. Default by "
            "dtype: 1e-3 float32, 3e-2 float16, 0.25 bfloat16 (docs/numerics.md)."
        ),
    ] = None,
) -> None:
    """Check that R-ISD greedy output equals `transformers` greedy generation, token for token."""
    if report_path is not None and not report_path.parent.is_dir():
        raise RidsError(f"--report: folder {report_path.parent} does not exist")
    stride_list = int_list(strides, "--strides")
    batch_list = int_list(batch_sizes, "--batch-sizes")
    prompt_list = read_prompts(prompts)
    base, adapter = resolve_defaults(base, adapter)
    llm = LLM(
        base, adapter, device=device, dtype=dtype, drafting=drafting, branches=branches,
        ungated=ungated,
    )  # fmt: skip
    for n in stride_list:
        check_stride(n)
    for note in filter(None, map(llm.stride_note, stride_list)):
        console.print(f"note: {note}")
    cases = len(stride_list) * len(batch_list)
    results: list[CaseResult] = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("transformers greedy reference", total=cases + 1)
        for result in verify_lossless(
            llm,
            prompt_list,
            stride_list,
            batch_list,
            max_new_tokens,
            on_reference=lambda: bar.update(task, advance=1, description="rids R-ISD"),
            reference=reference,
            tie_margin=tie_margin,
        ):
            results.append(result)
            bar.update(task, advance=1)
    console.print(results_table(results, len(prompt_list), max_new_tokens, ungated))
    console.print(f"MASK token id {llm.mask_token_id} (from {llm.mask_source})")
    if report_path is not None:
        atomic_write_text(report_path, json.dumps(report(results), indent=2) + "\n")
    for r in results:
        if r.divergence is not None:
            console.print(f"N={r.stride} B={r.batch_size}: {r.divergence.describe()}")
    failed = [r for r in results if not r.passed]
    if failed:
        console.print(f"[bold red]MISMATCH[/] in {len(failed)} of {len(results)} cases")
        raise typer.Exit(1)
    ties = sum(not r.identical for r in results)
    if ties:
        console.print(
            f"[bold green]lossless[/] up to rounding: {len(results) - ties} cases token-identical, "
            f"{ties} diverging only at a near-tie of the reference (docs/numerics.md)"
        )
        return
    console.print(f"[bold green]lossless[/]: all {len(results)} cases token-identical")


def results_table(results: list[CaseResult], prompts: int, max_new: int, ungated: bool) -> Table:
    title = f"R-ISD vs transformers greedy: {prompts} prompts, <= {max_new} new tokens"
    table = Table(
        title=title + (" [red](UNGATED)[/]" if ungated else ""),
        caption="accept/pos: acceptance of draft i given drafts < i passed; "
        "divergence: prompt@token expected!=got",
    )
    for col in ("N", "B", "tokens", "TPF", "accept/pos", "cold", "same"):
        table.add_column(col, justify="right", no_wrap=True, min_width=max(len(col), 4))
    table.add_column("divergence", no_wrap=True)
    for r in results:
        d = r.divergence
        table.add_row(
            str(r.stride),
            str(r.batch_size),
            str(r.tokens),
            f"{r.tpf:.2f}",
            " ".join(f"{a:.2f}".lstrip("0") for a in r.acceptance) or "-",
            str(r.cold_starts),
            "[green]yes[/]" if r.identical else "[yellow]tie[/]" if r.passed else "[red]NO[/]",
            ""
            if d is None
            else f"{d.prompt}@{d.position} {d.expected}!={d.got}"
            + ("" if d.margin is None else f" margin {d.margin:.1e}"),
        )
    return table
