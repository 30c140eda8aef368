"""`rids serve` through the official `openai` client, on 127.0.0.1 only.

Greedy answers must equal `LLM.generate` and `transformers` greedy `generate`; streams must not
mix; bad requests get OpenAI-style 4xx bodies and the server keeps serving; every KV page is
free once the clients are done (also after clients that disconnect mid-answer).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from rids.errors import RidsError
from rids.llm import LLM
from rids.serve.app import build_app
from rids.serve.async_engine import AsyncEngine
from rids.serve.local import LocalServer
from tests.conftest import GPU_LIKE_COSTS, hf_greedy

MODEL = "tiny-chat"
QUESTIONS = [f"Count from {w}." for w in ("one", "two", "three", "four", "five", "six")]


class Server(LocalServer):
    def __init__(self, llm: LLM) -> None:
        super().__init__(build_app(AsyncEngine(llm), MODEL, default_max_tokens=32))
        self.llm = llm

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0)

    def post(self, path: str, data: bytes) -> tuple[int, dict]:
        req = urllib.request.Request(
            self.url + path, data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path) as r:
            return r.read().decode()

    def all_pages_free(self, timeout: float = 10) -> bool:
        bm = self.llm.engine.pages
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if bm.num_free_pages == bm.num_pages and self.llm.engine.scheduler.is_finished():
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="module")
def server(demo) -> Iterator[Server]:
    # a small cache: 6 concurrent requests already need preemption
    llm = LLM(demo / "base", demo / "adapter", page_size=4, kv_cache_tokens=512, max_step_tokens=64)
    llm.engine.policy.cost = GPU_LIKE_COSTS  # adaptive drafting, repeatable plans
    with Server(llm) as s:
        yield s


@pytest.fixture(scope="module")
def expected(demo) -> dict[str, list[int]]:
    """Each question's greedy answer ids from `transformers` on the chat-templated prompt."""
    llm = LLM(demo / "base")
    ids = [chat_ids(llm, q) for q in QUESTIONS]
    return dict(zip(QUESTIONS, hf_greedy(demo / "base", ids, 32), strict=True))


def chat_ids(llm: LLM, question: str) -> list[int]:
    return llm.encode_chat([{"role": "user", "content": question}])


def answer_text(llm: LLM, ids: list[int]) -> str:
    return llm.tokenizer.decode(ids, skip_special_tokens=True)


def test_engines_shut_down_whether_or_not_they_started(demo):
    llm = LLM(demo / "base")
    AsyncEngine(llm).shutdown()  # never started: nothing to join
    loaded = AsyncEngine.load(lambda: llm)
    loaded.shutdown()  # its thread built the model, then ends without running
    assert not loaded.thread.is_alive()
    started = AsyncEngine(llm)
    started.start()
    started.shutdown()
    started.shutdown()  # twice is fine
    assert not started.thread.is_alive()


def test_load_builds_the_model_on_the_thread_that_steps_it(demo, expected, monkeypatch):
    """`rids serve` builds its LLM on the engine thread (so every torch call of the server runs
    on one thread: two OpenMP pools on the same cores slow each other); what `build` raises
    reaches the caller; the engine built there answers like any other."""
    threads = []

    def build() -> LLM:
        threads.append(threading.current_thread())
        return LLM(demo / "base", demo / "adapter")

    with pytest.raises(RidsError, match="no such base"):
        AsyncEngine.load(lambda: (_ for _ in ()).throw(RidsError("no such base")))
    engine = AsyncEngine.load(build)
    step = engine.step

    def recorded_step() -> None:
        threads.append(threading.current_thread())
        step()

    monkeypatch.setattr(engine, "step", recorded_step)
    with LocalServer(build_app(engine, MODEL, default_max_tokens=32)) as s:
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="none", max_retries=0)
        q = QUESTIONS[0]
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=32
        )
        assert r.choices[0].message.content == answer_text(engine.llm, expected[q])
    assert len(threads) > 2 and set(threads) == {engine.thread}
    assert engine.thread is not threading.main_thread() and not engine.thread.is_alive()


def test_greedy_chat_equals_generate_and_transformers(server, expected, demo):
    client = server.client()
    llm = server.llm
    direct = LLM(demo / "base", demo / "adapter")
    for q in QUESTIONS[:3]:
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], temperature=0, max_tokens=32
        )
        assert direct.generate([chat_ids(llm, q)], max_new_tokens=32)[0].token_ids == expected[q]
        assert r.choices[0].message.content == answer_text(llm, expected[q])
        assert r.usage.completion_tokens == len(expected[q])
        assert r.usage.prompt_tokens == len(chat_ids(llm, q))
        rids = r.model_extra["rids"]
        assert rids["tokens_per_forward"] > 1.0  # the trained adapter's drafts were accepted
        assert len(rids["acceptance"]) == 3  # stride 4: three draft positions
        assert rids["copies_accepted"] <= 3 * rids["copy_steps"]
        assert rids["sibling_accepted"] <= 3 * rids["sibling_steps"]


def test_stream_pieces_add_up_to_the_whole_answer(server, expected):
    client = server.client()
    q = QUESTIONS[3]
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
            max_tokens=32, stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer_text(server.llm, expected[q])
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == len(expected[q])
    assert len(chunks) > 3  # really streamed, not one piece


def test_completions_accept_text_and_token_ids(server, expected):
    client = server.client()
    q = QUESTIONS[4]
    ids = chat_ids(server.llm, q)
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=32)
    text = server.llm.tokenizer.decode(ids)
    by_text = client.completions.create(model=MODEL, prompt=text, temperature=0, max_tokens=32)
    want = answer_text(server.llm, expected[q])
    assert by_ids.choices[0].text == want and by_text.choices[0].text == want
    streamed = client.completions.create(
        model=MODEL, prompt=ids, temperature=0, max_tokens=32, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want


def test_stop_strings_cut_the_answer(server, expected):
    want = answer_text(server.llm, expected[QUESTIONS[0]])
    words = want.split()
    assert len(words) > 3, want
    stop = f" {words[3]}"
    r = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTIONS[0]}], temperature=0,
        max_tokens=32, stop=[stop],
    )  # fmt: skip
    assert r.choices[0].message.content == want[: want.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_sampled_requests_run_and_seeds_repeat(server):
    client = server.client()

    def ask() -> str:
        r = client.completions.create(
            model=MODEL, prompt="Count from two.", temperature=0.9, seed=7, max_tokens=16
        )
        return r.choices[0].text

    assert ask() == ask()


def test_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list()] == [MODEL]
    assert json.loads(server.get("/health")) == {"status": "ok"}
    metrics = server.get("/metrics")
    for name in (
        "rids_requests_total", "rids_generation_tokens_total", "rids_tokens_per_forward",
        "rids_drafts_accepted_total", "rids_kv_cache_usage", "rids_requests_running",
        "rids_copy_steps_total", "rids_copies_accepted_total", "rids_sibling_steps_total",
        "rids_sibling_accepted_total",
    ):  # fmt: skip
        assert name in metrics, name
    tpf = next(line for line in metrics.splitlines() if line.startswith("rids_tokens_per_forward"))
    assert float(tpf.split()[-1]) > 1.0


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "nope", "prompt": "hi"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "n": 2}, 400, "n"),
        ({"model": MODEL, "prompt": "hi " * 600}, 400, "context"),
        ({"model": MODEL, "prompt": "hi", "stride": 99}, 400, "stride"),
        ({"model": MODEL, "prompt": []}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, needle):
    code, reply = server.post("/v1/completions", json.dumps(body).encode())
    assert code == status
    assert needle in reply["error"]["message"] and reply["error"]["type"]


def test_a_request_too_big_for_the_cache_names_the_request_fields(server):
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 500, "stride": 32}
    code, reply = server.post("/v1/completions", json.dumps(body).encode())
    message = reply["error"]["message"]
    assert code == 400 and "KV cache too small" in message, message
    assert "lower max_tokens or stride" in message and "stride-32 step of 63 tokens" in message
    assert "--max-new-tokens" not in message


def test_serve_on_a_taken_port_is_one_line(demo):
    import socket

    from typer.testing import CliRunner

    from rids_cli.main import app

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(
            app, ["serve", "--base", str(demo / "base"), "--port", str(port)]
        )
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on 127.0.0.1:{port}" in lines[0], result.output


@pytest.mark.parametrize("model", ["default", None])
def test_default_or_no_model_means_the_served_one(server, expected, model):
    """What the I-DLM documentation's own curl sends: `"model": "default"` (or none at all)."""
    body = {
        "messages": [{"role": "user", "content": QUESTIONS[0]}],
        "max_tokens": 32,
        "temperature": 0,
    }
    code, reply = server.post(
        "/v1/chat/completions", json.dumps(body | ({"model": model} if model else {})).encode()
    )
    assert code == 200, reply
    assert reply["model"] == MODEL
    assert reply["choices"][0]["message"]["content"] == answer_text(
        server.llm, expected[QUESTIONS[0]]
    )


def test_malformed_json_is_a_400_and_the_server_keeps_serving(server):
    code, reply = server.post("/v1/chat/completions", b'{"model": "tiny-chat", "messages": [')
    assert code == 400 and "error" in reply
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=MODEL, messages=[])
    r = server.client().completions.create(model=MODEL, prompt="Count from one.", max_tokens=4)
    assert r.usage.completion_tokens >= 1


def test_a_client_that_disconnects_frees_its_pages(server):
    client = server.client()
    stream = client.completions.create(
        model=MODEL, prompt="Count from one.", max_tokens=400, stream=True,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    next(iter(stream))
    stream.close()
    assert server.all_pages_free()
    aborted = 'rids_requests_total{finish_reason="abort"}'
    assert any(line.startswith(aborted) for line in server.get("/metrics").splitlines())


def test_concurrent_streams_do_not_mix(server, expected):
    """A short load test: 24 concurrent streaming clients, each checked against its answer."""

    async def one(client: openai.AsyncOpenAI, q: str, stride: int) -> tuple[str, str]:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
            max_tokens=32, stream=True, extra_body={"stride": stride},
        )  # fmt: skip
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        return q, "".join(parts)

    async def main() -> list:
        async with server.async_client() as client:
            jobs = [one(client, QUESTIONS[i % 6], (1, 2, 4)[i % 3]) for i in range(24)]
            return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:3]
    for q, text in results:
        assert text == answer_text(server.llm, expected[q])
    assert server.all_pages_free()
    assert server.llm.engine.scheduler.num_preemptions > 0  # the small cache was under pressure


def test_serve_command_help_lists_the_server_options(tmp_path: Path):
    from typer.testing import CliRunner

    from rids_cli.main import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--port", "--max-step-tokens", "--stationary-steps", "--served-model-name"):
        assert option in result.output
