"""Completion text as tokens are committed, for streaming: chat and the server share it."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Turns the growing list of completion ids into text deltas.

    Only the new ids are decoded each time (`tokenizers`' `DecodeStream`, which keeps the
    context a token's text depends on), so a long answer costs linear time, not quadratic. A
    delta never ends in half a character (a byte-level token that completes later; a final
    update shows it as U+FFFD, as a whole decode does), and with `stop` strings the text is cut
    before the first stop string, which is never shown; text that might be the start of a stop
    string is held back until it cannot be.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer  # a fast (Rust-backed) one: every AutoTokenizer rids loads
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.decoded = ""  # the text of ids[:complete]
        self.complete = 0  # ids after this are fed to the stream but not yet whole characters
        self.fed = 0
        self.text = ""  # what has been handed out
        self.stopped = False  # a stop string was found: the answer ends here

    def update(self, ids: list[int], final: bool = False) -> str:
        """The new text after `ids` (all completion ids so far); `final`: nothing follows."""
        if self.stopped:
            return ""
        if len(ids) > self.fed:
            chunk = self.stream.step(self.tokenizer.backend_tokenizer, ids[self.fed :])
            self.fed = len(ids)
            if chunk is not None:
                self.decoded += chunk
                self.complete = self.fed
        full = self.decoded
        if final and self.complete < self.fed:  # ends in part of a character
            full += self.tokenizer.decode(ids[self.complete :], skip_special_tokens=True)
        # a stop string starts after the text handed out (the hold keeps back any that might)
        hits = [i for i in (full.find(s, len(self.text)) for s in self.stop) if i >= 0]
        if hits:
            full, final, self.stopped = full[: min(hits)], True, True
        if not final:
            full = full[: max(len(full) - self.hold, 0)]
        new = full[len(self.text) :]
        self.text += new
        return new
