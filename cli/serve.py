"""`rids serve`: an OpenAI-compatible server with continuous batching."""

from __future__ import annotations

import socket
from typing import Annotated

import typer

from rids.embedded import resolve_defaults
from rids.errors import RidsError
from rids.llm import LLM
from rids_cli.common import Branches, Drafting, KvCacheGib, MemoryFraction, err_console, user_errors


@user_errors
def serve_command(
    base: Annotated[
        str | None, typer.Option(help="Base model (default: the embedded SmolLM2 + adapter).")
    ] = None,
    adapter: Annotated[str | None, typer.Option(help="Gated adapter.")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    served_model_name: Annotated[
        str | None, typer.Option(help="The `model` clients send (default: the base's name).")
    ] = None,
    max_tokens: Annotated[
        int, typer.Option(help="Completion tokens when a request does not say.")
    ] = 256,
    max_batch_size: Annotated[int, typer.Option(help="Requests decoded together.")] = 64,
    max_step_tokens: Annotated[
        int, typer.Option(help="Tokens per forward; longer prompts are prefilled in chunks.")
    ] = 512,
    kv_cache_tokens: Annotated[
        int | None, typer.Option(help="KV cache size in tokens (overrides --kv-cache-gib).")
    ] = None,
    kv_cache_gib: KvCacheGib = None,
    memory_fraction: MemoryFraction = 0.85,
    stationary_steps: Annotated[
        int, typer.Option(help="Admit new requests only every k steps (1: every step).")
    ] = 1,
    drafting: Drafting = "adaptive",
    branches: Branches = "auto",
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16, float16, auto.")] = None,
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics."""
    import uvicorn  # the server's stack is imported by this command only

    from rids.serve.app import build_app
    from rids.serve.async_engine import AsyncEngine

    check_port(host, port)  # before the model loads: a taken port fails in a second
    base, adapter = resolve_defaults(base, adapter)
    engine = AsyncEngine.load(  # built on the thread that steps it: full speed on a CPU
        lambda: LLM(
            base,
            adapter,
            device=device,
            dtype=dtype,
            kv_cache_tokens=kv_cache_tokens,
            kv_cache_gib=kv_cache_gib,
            memory_fraction=memory_fraction,
            max_batch_size=max_batch_size,
            max_step_tokens=max_step_tokens,
            stationary_steps=stationary_steps,
            drafting=drafting,
            branches=branches,
        )
    )
    llm = engine.llm
    name = served_model_name or llm.base_path.name
    mode = f"R-ISD, stride {llm.default_stride}" if llm.default_stride > 1 else "AR (no adapter)"
    err_console.print(f"rids serve: {name} ({mode}) on http://{host}:{port}/v1")
    uvicorn.run(build_app(engine, name, max_tokens), host=host, port=port)


def check_port(host: str, port: int) -> None:
    """One line, not uvicorn's traceback, when the address cannot be listened on."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise RidsError(
            f"cannot listen on {host}:{port} ({e.strerror}); pass another --port or stop what "
            "uses this one"
        ) from None
