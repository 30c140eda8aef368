"""Per-forward context: what attention and the gated layers read besides the hidden states."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Context:
    num_gated: int  # the last num_gated tokens (the MASKs) have LoRA gate 1, the others 0
    attn: Any  # attention metadata with .attend(layer, q, k, v), built once per forward


_CONTEXT: Context | None = None


def get_context() -> Context:
    assert _CONTEXT is not None, "forward called outside set_context()"
    return _CONTEXT


def set_context(ctx: Context) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def reset_context() -> None:
    global _CONTEXT
    _CONTEXT = None
