"""The OpenAI-compatible HTTP server: FastAPI routes over an `AsyncEngine`.

`/v1/chat/completions` and `/v1/completions` (streamed as server-sent events or whole),
`/v1/models`, `/health` and `/metrics` (Prometheus text). A request's `model` is the served
name, "default" (as SGLang clients send) or absent. Bad requests get a 4xx with an OpenAI-style
error body; a client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from rids.detokenizer import Detokenizer
from rids.engine.sequence import Sequence
from rids.errors import RidsError
from rids.outputs import GenerationStats
from rids.sampling import SamplingParams
from rids.serve.async_engine import AsyncEngine
from rids.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    Envelope,
    error_body,
    rids_fields,
    usage,
)

# what SGLang-style clients (and the I-DLM documentation) send for "the served model"
DEFAULT_MODEL = "default"


def error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse(error_body(message, **extra), status_code=status)


def build_app(engine: AsyncEngine, model_name: str, default_max_tokens: int = 256) -> FastAPI:
    llm = engine.llm

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="rids", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg")))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @app.exception_handler(RidsError)
    async def rids_error(request: Request, exc: RidsError) -> JSONResponse:
        return error(400, str(exc))

    @app.get("/health")
    async def health() -> Response:
        if not engine.healthy:
            return error(503, "the engine thread has stopped", kind="server_error")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "rids"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        if llm.tokenizer is None or not llm.tokenizer.chat_template:
            raise RidsError(f"{model_name} has no chat template; use /v1/completions")
        ids = llm.encode_chat([m.text() for m in body.messages])
        return await complete(body, ids, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await complete(body, llm.encode(body.prompt), request, chat=False)

    async def complete(
        body: ChatCompletionRequest | CompletionRequest,
        ids: list[int],
        request: Request,
        chat: bool,
    ) -> Response:
        if body.model not in (None, DEFAULT_MODEL, model_name):
            return error(
                404, f"The model `{body.model}` does not exist; this server has `{model_name}`",
                code="model_not_found",
            )  # fmt: skip
        room = llm.config.max_position_embeddings - len(ids)
        seq = llm.make_sequence(
            ids,
            max_new_tokens=body.token_limit or max(min(default_max_tokens, room), 1),
            stride=body.stride,
            ignore_eos=body.ignore_eos,
            stop_token_ids=body.stop_token_ids,
            sampling=SamplingParams(body.temperature, body.top_k, body.top_p, body.seed),
        )
        llm.engine.scheduler.check(seq, new_tokens="max_tokens", stride="stride")
        envelope = Envelope(chat, model_name)
        text = Detokenizer(llm.tokenizer, body.stop_strings)
        if body.stream:
            chunks = stream(seq, text, envelope, body.include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        task = asyncio.ensure_future(collect(seq, text))
        watcher = asyncio.ensure_future(cancel_on_disconnect(request, task))
        try:
            ids = await task
        except asyncio.CancelledError:
            return Response(status_code=499)
        finally:
            watcher.cancel()
        return JSONResponse(envelope.response(text.text, *finish(seq, text, ids)))

    async def collect(seq: Sequence, text: Detokenizer) -> list[int]:
        """The completion ids this answer used (up to its stop string)."""
        ids: list[int] = []
        async with aclosing(engine.generate(seq)) as updates:
            async for new in updates:
                ids += new
                text.update(ids)
                if text.stopped:
                    break
        text.update(ids, final=True)
        return ids

    async def stream(
        seq: Sequence, text: Detokenizer, envelope: Envelope, include_usage: bool
    ) -> AsyncIterator[str]:
        if envelope.chat:
            yield sse(envelope.role_chunk())
        ids: list[int] = []
        try:
            async with aclosing(engine.generate(seq)) as updates:
                async for new in updates:
                    ids += new
                    if delta := text.update(ids):
                        yield sse(envelope.chunk(delta))
                    if text.stopped:
                        break
        except RidsError as e:
            yield sse(error_body(str(e)))
            return
        if delta := text.update(ids, final=True):
            yield sse(envelope.chunk(delta))
        reason, extra = finish(seq, text, ids)
        yield sse(envelope.chunk(None, reason, rids=extra["rids"]))
        if include_usage:
            yield sse(envelope.usage_chunk({"usage": extra["usage"]}))
        yield "data: [DONE]\n\n"

    def finish(seq: Sequence, text: Detokenizer, ids: list[int]) -> tuple[str, dict]:
        """Finish reason, usage (the ids the answer used: the engine may run a step past a
        stop string before its cancellation lands) and rids' statistics."""
        reason = "stop" if text.stopped or seq.finish_reason == "stop" else "length"
        return reason, {
            "usage": usage(seq.num_prompt_tokens, len(ids)),
            "rids": rids_fields(GenerationStats.of(seq)),
        }

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def cancel_on_disconnect(request: Request, task: asyncio.Future) -> None:
    while not task.done():
        if await request.is_disconnected():
            task.cancel()
            return
        await asyncio.sleep(0.2)
