"""`rids build-corpus`: tables of the base's own answers, that corpus drafts copy from and MASK
drafts are chosen with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from rids.engine.draft_corpus import FILENAME, LENGTH, MAX_NGRAM, DraftCorpus
from rids.engine.next_tokens import FILENAME as NEXT_TOKENS
from rids.engine.next_tokens import NextTokenCounts
from rids.errors import RidsError
from rids.llm import load_tokenizer
from rids.train.data import read_documents, unique_documents
from rids.utils.hub import resolve_path
from rids_cli.common import console, user_errors


@user_errors
def build_corpus_command(
    base: Annotated[str, typer.Option(help="Base model (its tokenizer): local folder or hub id.")],
    adapter: Annotated[Path, typer.Option(help="Adapter folder the corpus is written into.")],
    data: Annotated[
        list[Path],
        typer.Option(help="Chats answered greedily by the base (.jsonl, ...); repeatable."),
    ],
    length: Annotated[int, typer.Option(help="Drafts stored per n-gram.")] = LENGTH,
    max_ngram: Annotated[int, typer.Option(help="Longest n-gram looked up.")] = MAX_NGRAM,
    min_count: Annotated[
        int,
        typer.Option(help="Next-token counts: leave out what was seen fewer times (smaller)."),
    ] = 1,
) -> None:
    """Index what the base wrote in its answers, so that requests copy drafts from it where
    they say what it has said before, and count what it wrote after each 1-3 tokens, to choose
    MASK drafts knowing the token just committed (every draft is verified: output unchanged).
    A document found more than once in the data is indexed once."""
    if not (adapter / "adapter_config.json").is_file():
        raise RidsError(f"{adapter} is not an adapter folder: it has no adapter_config.json")
    if length < 1:
        raise RidsError(f"--length must be >= 1, got {length}")
    if not 1 <= max_ngram <= MAX_NGRAM:
        raise RidsError(
            f"--max-ngram must be 1..{MAX_NGRAM} (lookups go no further), got {max_ngram}"
        )
    if min_count < 1:
        raise RidsError(f"--min-count must be >= 1, got {min_count}")
    tokenizer = load_tokenizer(resolve_path(base, "base"))
    if tokenizer is None:
        raise RidsError(f"base {base} has no tokenizer to read the data with")
    with console.status("reading the data"):
        read = read_documents(data, tokenizer)
    docs = unique_documents(read)
    if len(docs) < len(read):
        console.print(f"{len(read) - len(docs):,} repeated documents indexed once")
    pairs = [(d.ids, d.trainable) for d in docs]
    with console.status(f"indexing {sum(len(d.ids) for d in docs):,} tokens"):
        corpus = DraftCorpus.build(pairs, length=length, max_ngram=max_ngram)
        counts = NextTokenCounts.build(pairs, min_count=min_count)
    for table, path, what in (
        (corpus, corpus.save(adapter / FILENAME), "n-grams"),
        (counts, counts.save(adapter / NEXT_TOKENS), "next-token counts"),
    ):
        size = path.stat().st_size / 2**20
        console.print(f"{len(table):,} {what} written to {path} ({size:.1f} MiB)")
