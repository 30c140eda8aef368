"""`rids chat`: streaming, multi-turn KV reuse (still lossless), interrupts, the pty form."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from rids.chat import ChatSession
from rids.errors import RidsError
from rids.llm import LLM
from rids_cli.main import app


def fresh_answer(llm: LLM, messages: list[dict], max_new: int) -> list[int]:
    return llm.generate([llm.encode_chat(messages)], max_new_tokens=max_new, stride=4)[0].token_ids


def test_turns_reuse_kv_and_equal_fresh_generation(demo):
    llm = LLM(demo / "base", demo / "adapter", page_size=4, branches="off", drafting="fixed")
    session = ChatSession(llm, system="Count.", stride=4, max_new_tokens=40)
    first = "".join(session.ask("Count from seven."))
    first_prompt = session.seq.num_prompt_tokens
    second = "".join(session.ask("Count from two."))
    assert first.startswith("seven eight") and second  # (one-turn training: turn 2 is odd)
    # the second turn reused the first turn's KV (prompt and answer), prefilling only the rest
    assert session.reused[0] == 0 and session.reused[1] > first_prompt + 10
    assert session.seq.completion_ids == fresh_answer(llm, session.messages[:-1], 40)
    assert session.total.tpf > 1.3  # measured 1.44 (turn 2 is off-distribution for this model)
    session.reset()
    bm = llm.engine.pages
    assert bm.num_free_pages == bm.num_pages


def test_an_interrupted_answer_keeps_what_was_committed(demo):
    llm = LLM(demo / "base", demo / "adapter", page_size=4, branches="off", drafting="fixed")
    session = ChatSession(llm, stride=4, max_new_tokens=40)
    stream = session.ask("Count from five.")
    first = next(stream)
    stream.close()  # what Ctrl-C does to the loop
    assert session.messages[-1] == {"role": "assistant", "content": first}
    full = llm.tokenizer.decode(
        fresh_answer(llm, session.messages[:1], 40), skip_special_tokens=True
    )
    assert first and full.startswith(first) and session.seq.finish_reason == "abort"
    "".join(session.ask("Count from nine."))  # the conversation goes on from the partial answer
    assert session.seq.completion_ids == fresh_answer(llm, session.messages[:-1], 40)


def test_non_interactive_chat_prints_the_answer_and_stats(demo):
    llm = LLM(demo / "base", demo / "adapter")
    ids = fresh_answer(llm, [{"role": "user", "content": "Count from three."}], 40)
    want = llm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    args = ["chat", "--base", str(demo / "base"), "--adapter", str(demo / "adapter")]
    args += ["--prompt", "Count from three.", "--max-new-tokens", "40"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()  # (stderr may carry a first start's notes)
    assert lines[0].strip() == want and want.startswith("three four")
    assert "TPF" in lines[1] and "acceptance" in lines[1]


def test_a_first_start_says_it_measures_step_times(demo, monkeypatch, tmp_path):
    monkeypatch.setenv("RIDS_CACHE", str(tmp_path))
    args = ["chat", "--base", str(demo / "base"), "--adapter", str(demo / "adapter")]
    args += ["--prompt", "Count from three.", "--max-new-tokens", "8"]
    first, second = (CliRunner().invoke(app, args) for _ in range(2))
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert first.stderr.count("measuring step times") == 1
    assert "measuring step times" not in second.stderr  # the cache answers
    assert first.stdout.splitlines()[0] == second.stdout.splitlines()[0]


def read_until(fd: int, marker: bytes, timeout: float = 60.0) -> bytes:
    out, end = b"", time.monotonic() + timeout
    while marker not in out and time.monotonic() < end:
        if select.select([fd], [], [], 0.2)[0]:
            try:
                out += os.read(fd, 4096)
            except OSError:
                break
    return out


def test_interactive_chat_in_a_pty(demo):
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rids_cli", "chat", "--base", str(demo / "base"),
         "--adapter", str(demo / "adapter"), "--max-new-tokens", "24"],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True,
    )  # fmt: skip
    os.close(slave)
    try:
        assert b"/reset" in read_until(master, b"> ")
        os.write(master, b"Count from four.\n")
        answer = read_until(master, b"> ")  # the next prompt: the answer and its status are out
        assert b"four five six" in answer and b"TPF" in answer
        os.write(master, b"one " * 700 + b"\n")  # past the context: refused, the REPL goes on
        refused = read_until(master, b"> ")
        assert b"context holds" in refused and b"shorten it" in refused, refused
        os.write(master, b"/stats\n")
        assert b"1 answers" in read_until(master, b"answers")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        os.close(master)


def test_a_first_message_past_the_context_is_told_to_shorten_not_to_trim(demo):
    llm = LLM(demo / "base", demo / "adapter")
    session = ChatSession(llm, system="Be brief.")
    with pytest.raises(RidsError, match="shorten it") as refused:
        next(session.ask("one " * llm.config.max_position_embeddings))
    assert "/trim" not in str(refused.value)  # there is nothing to trim
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_a_turn_past_the_context_is_refused_and_trim_makes_room(demo):
    llm = LLM(demo / "base", demo / "adapter", page_size=4, branches="off")
    limit = llm.config.max_position_embeddings
    session = ChatSession(llm, stride=4, max_new_tokens=40)
    "".join(session.ask("Count from two."))
    before = list(session.messages)
    with pytest.raises(RidsError, match="shorten it"):  # too long even alone
        next(session.ask("one " * limit))
    assert session.messages == before  # the refused message did not join the history
    words = limit  # the longest message that fits alone, not after the first exchange
    while len(llm.encode_chat([{"role": "user", "content": "one " * words}])) >= limit - 5:
        words -= 1
    fits_alone = "one " * words
    with pytest.raises(RidsError, match="/trim drops the oldest exchange"):
        next(session.ask(fits_alone))
    assert session.messages == before
    # a message that fits with less room than max_new_tokens: the answer stops at the context
    words = limit
    while len(llm.encode_chat([*before, {"role": "user", "content": "one " * words}])) > limit - 20:
        words -= 1
    filler = "one " * words
    "".join(session.ask(filler))
    assert len(session.seq.token_ids) <= limit and session.seq.finish_reason == "length"
    assert session.trim() and session.messages[0]["content"] == filler
    assert session.trim() and not session.trim() and session.messages == []
