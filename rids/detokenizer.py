"""Completion text as tokens are committed, for streaming: chat and the server share it."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Turns the growing list of completion ids into text deltas.

    Each update decodes only the new ids (`tokenizers`' `DecodeStream`, which keeps the
    context a token's text depends on), not the whole answer again. A delta never ends in half
    a character (a byte-level token that completes later; the final update decodes the whole
    answer once, so a cut character shows as U+FFFD, as in a whole decode), and with `stop`
    strings the text is cut before the first stop string, which is never shown; text that might
    be the start of a stop string is held back until it cannot be.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer  # a fast (Rust-backed) one: every AutoTokenizer rids loads
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.decoded = ""  # the text of ids[:num_whole_ids]
        self.num_whole_ids = 0  # the ids after these are not whole characters yet
        self.num_fed_ids = 0  # the ids given to the stream
        self.text = ""  # what has been handed out
        self.stopped = False  # a stop string was found: the answer ends here

    def update(self, ids: list[int], final: bool = False) -> str:
        """The new text after `ids` (all completion ids so far); `final`: nothing follows."""
        if self.stopped:
            return ""
        if len(ids) > self.num_fed_ids:
            self.decoded += self.step(ids)
        full = self.decoded
        if final and self.num_whole_ids < len(ids):  # ends in part of a character
            whole = self.decode(ids)
            full = (
                whole if whole.startswith(full) else full + self.decode(ids[self.num_whole_ids :])
            )
        # a stop string starts after the text handed out (the hold keeps back any that might)
        hits = [i for i in (full.find(s, len(self.text)) for s in self.stop) if i >= 0]
        if hits:
            full, final, self.stopped = full[: min(hits)], True, True
        if not final:
            full = full[: max(len(full) - self.hold, 0)]
        new = full[len(self.text) :]
        self.text += new
        return new

    def step(self, ids: list[int]) -> str:
        """The text the ids after the fed ones complete ("" while a character is unfinished)."""
        new, self.num_fed_ids = ids[self.num_fed_ids :], len(ids)
        try:
            chunk = self.stream.step(self.tokenizer.backend_tokenizer, new)
        except Exception:  # tokenizers raises a bare Exception
            # the decoder rewrote text it had given (byte-fallback tokens that are not UTF-8):
            # the unfinished ids decode on their own, and the stream starts afresh after them
            chunk = self.decode(ids[self.num_whole_ids :])
            self.stream = DecodeStream(skip_special_tokens=True)
        if chunk is None:
            return ""
        self.num_whole_ids = len(ids)
        return chunk

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
