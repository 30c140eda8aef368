"""Streamed text: deltas that add up to the whole decode, stop strings, no re-decoding."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers
from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerFast

from rids.detokenizer import Detokenizer
from rids.tiny import build_tokenizer

TEXT = "Héllo wörld! 你好，世界 🎉🎉 it's a test.\n\n1. **Bold** — café naïve 日本語 🤖 the end"


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2 style: `▁` for spaces, characters outside the vocabulary as <0xNN> byte tokens,
    and a decoder that strips the first space (a token's text depends on what is before it)."""
    vocab = {"<unk>": 0, "</s>": 1} | {f"<0x{b:02X}>": 2 + b for b in range(256)}
    for piece in ["▁", *"abcdehilnorst.,!"]:
        vocab[piece] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level", "byte-fallback"])
def tok(request):
    return build_tokenizer() if request.param == "byte-level" else byte_fallback_tokenizer()


def stream(detok: Detokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Deltas as an engine commits 1-4 ids a step, then the final update."""
    pieces, n = [], 0
    while n < len(ids) and not detok.stopped:
        n = min(len(ids), n + rng.randrange(1, 5))
        pieces.append(detok.update(ids[:n]))
    return [*pieces, detok.update(ids[:n], final=True)]


def test_deltas_add_up_to_the_whole_decode_and_never_split_a_character(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # many characters span several byte tokens
    rng = random.Random(0)
    for cut in range(1, len(ids) + 1):  # answers cut anywhere, mid-character included
        pieces = stream(Detokenizer(tok), ids[:cut], rng)
        text, whole = "".join(pieces), tok.decode(ids[:cut], skip_special_tokens=True)
        if whole.endswith("\ufffd") and text != whole:
            # cut inside a character, where a byte-fallback decode turns its whole run of byte
            # tokens into U+FFFD: the characters before the cut, then U+FFFD
            shown = text.rstrip("\ufffd")
            assert text.endswith("\ufffd") and TEXT.startswith(shown), (cut, text)
            assert len(shown) >= len(whole.rstrip("\ufffd")), (cut, text, whole)
        else:
            assert text == whole, cut
        assert not any(p.endswith("\ufffd") for p in pieces[:-1]), pieces


def test_special_tokens_are_not_shown(tok):
    eos = tok.convert_tokens_to_ids(tok.eos_token)
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


def test_byte_tokens_that_are_not_utf8_never_break_the_stream():
    """Random byte-fallback tokens: `tokenizers`' stream raises where a later token rewrites
    text it gave; the detokenizer goes on (a whole decode turns a run of bytes with any invalid
    one into U+FFFD, so no stream can match it there: only that it never fails is asserted)."""
    tok, rng = byte_fallback_tokenizer(), random.Random(0)
    backend, raised = tok.backend_tokenizer, 0
    for _ in range(300):
        ids = [rng.randrange(2, len(tok)) for _ in range(rng.randrange(1, 12))]
        stream(Detokenizer(tok), ids, random.Random(0))
        raw = DecodeStream(skip_special_tokens=True)
        try:
            for i in ids:
                raw.step(backend, i)
        except Exception:
            raised += 1
    assert raised > 0  # the case this guards against did occur
