"""Streamed text: deltas that add up to the whole decode, stop strings, no re-decoding."""

from __future__ import annotations

import random

import pytest

from rids.detokenizer import Detokenizer
from rids.tiny import build_tokenizer

TEXT = "Héllo wörld! 你好，世界 🎉🎉 it's a test.\n\n1. **Bold** — café naïve 日本語 🤖 the end"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def stream(detok: Detokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Deltas as an engine commits 1-4 ids a step, then the final update."""
    pieces, n = [], 0
    while n < len(ids) and not detok.stopped:
        n = min(len(ids), n + rng.randrange(1, 5))
        pieces.append(detok.update(ids[:n]))
    return [*pieces, detok.update(ids[:n], final=True)]


def test_deltas_add_up_to_the_whole_decode_and_never_split_a_character(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT) // 2  # many characters span several byte-level tokens
    rng = random.Random(0)
    for cut in range(1, len(ids) + 1):  # answers cut anywhere, mid-character included
        pieces = stream(Detokenizer(tok), ids[:cut], rng)
        assert "".join(pieces) == tok.decode(ids[:cut], skip_special_tokens=True), cut
        assert not any(p.endswith("\ufffd") for p in pieces[:-1]), pieces


def test_special_tokens_are_not_shown(tok):
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = [*tok.encode("Hi there", add_special_tokens=False), eos]
    assert "".join(stream(Detokenizer(tok), ids, random.Random(0))) == "Hi there"


def test_only_new_ids_are_decoded(tok, monkeypatch):
    ids = tok.encode(TEXT * 4, add_special_tokens=False)
    detok = Detokenizer(tok)

    def whole_decode(*args, **kwargs):
        raise AssertionError("a non-final update decoded the whole answer again")

    monkeypatch.setattr(tok, "decode", whole_decode)
    text = "".join(detok.update(ids[:n]) for n in range(1, len(ids) + 1))
    assert text == TEXT * 4  # ends on a whole character: nothing left for a final update


@pytest.mark.parametrize("stop", [" test", "🎉", "end", "nowhere"])
def test_a_stop_string_cuts_the_text_and_is_never_shown(tok, stop):
    ids = tok.encode(TEXT, add_special_tokens=False)
    detok = Detokenizer(tok, [stop, ""])
    text = "".join(stream(detok, ids, random.Random(1)))
    found = TEXT.find(stop)
    assert text == (TEXT if found < 0 else TEXT[:found])
    assert detok.stopped == (found >= 0)
    assert detok.update(ids, final=True) == ""  # after a stop: nothing more
