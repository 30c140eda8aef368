"""`rids train-adapter`: train a gated adapter for a frozen base."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rids.train.lora import ALL_LINEAR
from rids.train.trainer import EvalReport, StepReport, TrainConfig, load_state, train_adapter
from rids_cli.common import (
    console,
    format_rates,
    int_list,
    log_line_due,
    number_list,
    user_errors,
)


def resumed_options(ctx: typer.Context, output: Path) -> dict:
    """The checkpoint's run options that this command line did not set explicitly."""
    state = load_state(output)
    if state is None:
        return {}

    def given(key: str) -> bool:
        source = ctx.get_parameter_source("stride" if key == "strides" else key)
        return source is not None and source.name == "COMMANDLINE"

    return {
        key: tuple(value) if key == "target_modules" else value
        for key, value in state["options"].items()
        if not given(key)
    }


@user_errors
def train_adapter_command(
    ctx: typer.Context,
    base: Annotated[str, typer.Option(help="Base model: local folder or hub id.")],
    data: Annotated[
        list[Path], typer.Option(help="Text (.txt), .jsonl, or HF dataset folder; repeatable.")
    ],
    output: Annotated[Path, typer.Option(help="Folder for the adapter (PEFT format).")],
    rank: Annotated[
        int | None,
        typer.Option(
            help="LoRA rank r (default 128; with --init-adapter its rank, a higher one grows it)."
        ),
    ] = None,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha (default: rank).")] = None,
    target_modules: Annotated[
        str, typer.Option(help="Comma-separated projections, or all-linear.")
    ] = "all-linear",
    stride: Annotated[
        str, typer.Option(help="Stride N, or a curriculum like 2,3,4 (equal parts of the run).")
    ] = "4",
    lr: Annotated[float, typer.Option(help="Peak learning rate (warmup, then cosine).")] = 2e-4,
    batch_size: Annotated[int, typer.Option(help="Sequences per step (per process).")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 1000,
    epochs: Annotated[
        float | None, typer.Option(help="Instead of --max-steps: passes over the data.")
    ] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per training sequence.")] = 256,
    anchors: Annotated[int, typer.Option(help="MASK blocks per sequence per step.")] = 32,
    distill_weight: Annotated[
        float, typer.Option(help="1: match the base's distribution; 0: the data token.")
    ] = 1.0,
    position_weights: Annotated[
        str | None,
        typer.Option(
            help="Loss weight per MASK position (N-1 of them), e.g. 2,0.8,0.3 (default: equal): "
            "the first draft gates every later one."
        ),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16, auto.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seeds data order, anchors and init.")] = 0,
    eval_every: Annotated[int, typer.Option(help="Steps between engine evaluations.")] = 100,
    eval_prompts: Annotated[
        int, typer.Option(help="Held-out documents each evaluation decodes.")
    ] = 8,
    eval_tokens: Annotated[int, typer.Option(help="Tokens each evaluation prompt decodes.")] = 48,
    save_every: Annotated[
        int | None,
        typer.Option(help="Steps between checkpoints (default: a tenth of the run, 1..100)."),
    ] = None,
    init_adapter: Annotated[
        str | None, typer.Option(help="Start from this PEFT adapter instead of a fresh one.")
    ] = None,
    mask_token: Annotated[
        str | None,
        typer.Option(help="MASK token (string or id) for bases without one, e.g. <empty_output>."),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(help="Continue from OUTPUT/checkpoint, with the options it was started with."),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an adapter already in --output.")
    ] = False,
    deterministic: Annotated[
        bool, typer.Option(help="Deterministic kernels: a resumed run repeats the same curve.")
    ] = True,
) -> None:
    """Train a gated LoRA adapter so that MASK positions draft what the base would say."""
    targets = ALL_LINEAR if target_modules == "all-linear" else tuple(target_modules.split(","))
    weights = (
        None if position_weights is None else number_list(position_weights, "--position-weights")
    )
    options = dict(
        base=base, data=data, rank=rank, alpha=alpha, target_modules=targets,
        strides=int_list(stride, "--stride"), lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, max_steps=max_steps, seq_len=seq_len, anchors=anchors,
        distill_weight=distill_weight, dtype=dtype, seed=seed, init_adapter=init_adapter,
        epochs=epochs, mask_token=mask_token,
        position_weights=weights,
    )  # fmt: skip
    if resume:  # options not given on this command line are the checkpoint's
        options |= resumed_options(ctx, output)
    cfg = TrainConfig(
        output=output, device=device, eval_every=eval_every, eval_prompts=eval_prompts,
        eval_tokens=eval_tokens, save_every=save_every,
        resume=resume, overwrite=overwrite, deterministic=deterministic, **options,
    )  # fmt: skip
    main_process = os.environ.get("RANK", "0") == "0"
    progress = Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not main_process,
    )

    with progress:
        task = progress.add_task("train", total=None, status="loading")

        def on_step(r: StepReport) -> None:
            status = (
                f"N={r.stride} loss {r.loss:.3f} (ce {r.ce:.3f}, kl {r.kl:.3f}) "
                f"agree {r.agree:.2f} lr {r.lr:.1e} {r.tokens_per_s:,.0f} tok/s"
            )
            progress.update(task, completed=r.step, total=cfg.max_steps, status=status)
            if main_process and log_line_due(r.step, cfg.max_steps):
                progress.console.print(f"step {r.step}/{cfg.max_steps}: {status}")

        def on_eval(r: EvalReport) -> None:
            if r.error is not None:
                progress.console.print(
                    f"[yellow]warning:[/] step {r.step}: evaluation failed, training goes on: "
                    f"{r.error}"
                )
                return
            acc = format_rates(r.acceptance)
            progress.console.print(
                f"step {r.step}: R-ISD N={r.stride} on held-out prompts: "
                f"TPF {r.tpf:.2f}, acceptance per position {acc}"
            )

        path = train_adapter(cfg, on_step=on_step, on_eval=on_eval)
    if main_process:
        console.print(f"adapter written to {path}")
