"""The OpenAI wire format: request bodies (validated) and response bodies (plain dicts).

Unknown request fields are ignored, as OpenAI-compatible servers do; rids adds `top_k`,
`stride`, `ignore_eos` and `stop_token_ids` (the `openai` client sends them in `extra_body`),
and every response carries a `rids` object: forwards, tokens per forward, acceptance per draft
position.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from rids.outputs import GenerationStats


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None or "default": the one model this server has
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    stride: int | None = Field(None, ge=1)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None

    @property
    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] = Field(min_length=1)

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens


def error_body(message: str, kind: str = "invalid_request_error", **extra: Any) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None, **extra}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def rids_fields(stats: GenerationStats) -> dict[str, Any]:
    return {
        "forwards": stats.forwards,
        "decode_forwards": stats.decode_steps,
        "tokens_per_forward": round(stats.tpf, 4),
        "acceptance": [round(a, 4) for a in stats.acceptance],
        "cold_starts": stats.cold_starts,
        "copy_steps": stats.copy_steps,
        "copies_accepted": stats.copies_accepted,
        "sibling_steps": stats.sibling_steps,
        "sibling_accepted": stats.sibling_accepted,
    }


class Envelope:
    """Ids, timestamps and the model name shared by one response's body or chunks."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.id = new_id("chatcmpl" if chat else "cmpl")
        self.created = int(time.time())

    def body(self, kind: str, choices: list[dict], **extra: Any) -> dict:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }

    def choice(self, text: str | None, finish_reason: str | None, delta: bool) -> dict:
        if not self.chat:
            return {
                "index": 0,
                "text": text or "",
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        key = "delta" if delta else "message"
        message = {} if text is None else {"role": "assistant", "content": text}
        if delta and text is not None:
            message = {"content": text}
        return {"index": 0, key: message, "logprobs": None, "finish_reason": finish_reason}

    def response(self, text: str, finish_reason: str, extra: dict) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return self.body(kind, [self.choice(text, finish_reason, delta=False)], **extra)

    def chunk(self, text: str | None, finish_reason: str | None = None, **extra: Any) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self.body(kind, [self.choice(text, finish_reason, delta=True)], **extra)

    def role_chunk(self) -> dict:
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return self.body("chat.completion.chunk", [{**choice, "finish_reason": None}])

    def usage_chunk(self, extra: dict) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self.body(kind, [], **extra)
