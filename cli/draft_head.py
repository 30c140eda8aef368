"""`rids train-draft-head`: a draft head for an adapter, from the base's own answers."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rids.adapter import load_adapter
from rids.engine.draft_head import FILENAME, INNER, DraftHead
from rids.errors import RidsError
from rids.llm import LLM
from rids.train.data import read_documents, split_documents, unique_documents
from rids.train.draft_head import (
    HeadEpoch,
    MaskRows,
    acceptance,
    collect_mask_rows,
    train_draft_head,
)
from rids_cli.common import console, format_rates, log_line_due, user_errors


@user_errors
def train_draft_head_command(
    base: Annotated[str, typer.Option(help="Base model: local folder or hub id.")],
    adapter: Annotated[Path, typer.Option(help="Adapter folder the head is written into.")],
    data: Annotated[
        list[Path],
        typer.Option(help="Chats answered greedily by the base (.jsonl, ...); repeatable."),
    ],
    epochs: Annotated[int, typer.Option(help="Passes over the MASK rows.")] = 3,
    lr: Annotated[float, typer.Option(help="Peak learning rate (warmup, then cosine).")] = 1e-3,
    inner: Annotated[int, typer.Option(help="Width of the head's MLP.")] = INNER,
    max_documents: Annotated[
        int,
        typer.Option(
            help="Train on at most this many documents (0: all), a random choice (--seed) "
            "across the --data files; the held-out 5 % stays as it is."
        ),
    ] = 0,
    anchor_share: Annotated[
        float,
        typer.Option(
            help="Share of each training answer's anchors to compute MASK rows at (random; "
            "time and memory go with it); held-out answers use every anchor."
        ),
    ] = 1.0,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the batch order and --max-documents.")] = 0,
) -> None:
    """Train the adapter's draft head: it chooses each MASK draft among its row's likeliest
    tokens knowing the token before it (every draft is verified: output unchanged). The
    adapter's MASK rows are computed teacher-forced on the answers, once; 5 % of the documents
    (seeded) are held out to report acceptance per position before and after."""
    if not (adapter / "adapter_config.json").is_file():
        raise RidsError(f"{adapter} is not an adapter folder: it has no adapter_config.json")
    if epochs < 1:
        raise RidsError(f"--epochs must be >= 1, got {epochs}")
    if inner < 1:
        raise RidsError(f"--inner must be >= 1, got {inner}")
    if max_documents < 0:
        raise RidsError(f"--max-documents must be >= 0, got {max_documents}")
    if not 0 < anchor_share <= 1:
        raise RidsError(f"--anchor-share must be in (0, 1], got {anchor_share}")
    with console.status("loading the base and the adapter"):
        # no KV cache to speak of (the rows run in training's layout), no draft head (the one
        # beside the adapter, if any, is about to be replaced)
        llm = LLM(base, device=device, drafting="fixed", branches="off", kv_cache_tokens=256)
        llm.set_adapter(load_adapter(adapter, llm.model, draft_head=False))
    if llm.mask_token_id is None or llm.tokenizer is None:
        raise RidsError(f"{adapter} has no MASK token (or the base no tokenizer) to train with")
    with console.status("reading the data"):
        read = read_documents(data, llm.tokenizer)
    docs = unique_documents(read)
    train_docs, held_docs = split_documents(docs)
    if 0 < max_documents < len(train_docs):
        train_docs = random.Random(seed).sample(train_docs, max_documents)
    stride, model = llm.default_stride, llm.model
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} {task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )
    with progress:

        def rows_of(part: list, name: str, share: float) -> MaskRows | None:
            task = progress.add_task(f"MASK rows of {name} documents", total=len(part), status="")

            def done(i: int) -> None:
                progress.update(task, completed=i + 1)
                if log_line_due(i + 1, len(part)):
                    console.print(f"MASK rows of {i + 1}/{len(part)} {name} documents")

            return collect_mask_rows(model, llm.mask_token_id, part, stride, done, share)

        held = rows_of(held_docs, "held-out", 1.0)  # every anchor: comparable across shares
        train = rows_of(train_docs, "training", anchor_share)
        if train is None:
            raise RidsError(
                f"no answer in the data has {stride} target tokens in a row to train on"
            )
        if held is not None:
            argmax = format_rates(acceptance(held.candidates[..., 0], held))
            progress.console.print(f"held-out acceptance per position, argmax: {argmax}")
        torch.manual_seed(seed)  # the head's first weights
        # trained on the CPU, where the rows are; a tied base's one table is copied once
        embed, unembed = model.model.embed_tokens.weight, model.lm_head.weight
        embed_cpu = embed.float().cpu()
        tied = unembed.data_ptr() == embed.data_ptr()
        head = DraftHead(model.config.hidden_size, inner).bind(
            embed_cpu, embed_cpu if tied else unembed.float().cpu()
        )
        task = progress.add_task("training the head", total=None, status="")

        def on_batch(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        def on_epoch(e: HeadEpoch) -> None:
            held_note = (
                f", held-out acceptance {format_rates(e.acceptance)}" if e.acceptance else ""
            )
            progress.console.print(f"epoch {e.epoch}: loss {e.loss:.3f}{held_note}")

        train_draft_head(
            head, train, held, epochs, lr, seed=seed, on_batch=on_batch, on_epoch=on_epoch
        )
    path = head.save(adapter / FILENAME)
    console.print(f"draft head written to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
