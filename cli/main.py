"""`rids`: lossless parallel decoding with gated LoRA adapters."""

from __future__ import annotations

import sys

import typer

from rids_cli.chat import chat_command
from rids_cli.common import err_console, show_notes
from rids_cli.corpus import build_corpus_command
from rids_cli.draft_head import train_draft_head_command
from rids_cli.merge import merge_command
from rids_cli.serve import serve_command
from rids_cli.train import train_adapter_command
from rids_cli.verify import verify_lossless_command

app = typer.Typer(
    name="rids",
    help="Lossless parallel decoding (R-ISD) of LLMs with gated LoRA adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.callback()(show_notes)
app.command("verify-lossless")(verify_lossless_command)
app.command("train-adapter")(train_adapter_command)
app.command("merge")(merge_command)
app.command("build-corpus")(build_corpus_command)
app.command("train-draft-head")(train_draft_head_command)
app.command("chat")(chat_command)
app.command("serve")(serve_command)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err_console.print(
            "interrupted (train-adapter: --resume continues from the last checkpoint)"
        )
        sys.exit(130)
