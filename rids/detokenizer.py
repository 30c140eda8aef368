"""Completion text as tokens are committed, for streaming: chat and the server share it."""

from __future__ import annotations

from collections.abc import Sequence


class Detokenizer:
    """Turns the growing list of completion ids into text deltas.

    A delta never ends in half a character (a byte-level token that completes later), and with
    `stop` strings the text is cut before the first stop string, which is never shown; text
    that might be the start of a stop string is held back until it cannot be.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # what has been handed out
        self.stopped = False  # a stop string was found: the answer ends here

    def update(self, ids: list[int], final: bool = False) -> str:
        """The new text after `ids` (all completion ids so far); `final`: nothing follows."""
        if self.stopped:
            return ""
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            full, final, self.stopped = full[: min(hits)], True, True
        if not final:
            full = full.rstrip("\ufffd")  # an incomplete UTF-8 sequence so far
            full = full[: max(len(full) - self.hold, 0)]
        new = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += new
        return new
