"""Prompt lookup: drafts copied from the request's own text.

Where the text's last n tokens (the pending token last) occurred before, in the prompt or the
completion, the tokens that followed them there are proposed as the next drafts (prompt lookup
decoding; vLLM's n-gram proposer). A copy is a draft like any other: the base verifies it, so
the output is unchanged. It complements R-ISD's MASK drafts, which are predicted without seeing
the pending token: a copy sees it, and is right far more often where text repeats (quoting,
summaries, code edits, lists, copying a string), and costs no forward to propose.
"""

from __future__ import annotations

MIN_NGRAM = 2  # shortest suffix looked up
MAX_NGRAM = 4  # longest suffix looked up (the longest match wins, the latest among equals)


class NgramIndex:
    """Where each n-gram (MIN_NGRAM..MAX_NGRAM tokens) of a token list that only grows (a
    sequence's) last occurred, indexed as tokens are appended (O(new tokens) per lookup)."""

    def __init__(self) -> None:
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> position right after it
        self.indexed = 0  # n-grams ending before this position are in `follows`

    def lookup(self, tokens: list[int], num: int) -> tuple[list[int], int]:
        """Up to `num` tokens that followed the latest earlier occurrence of the longest suffix
        of `tokens` that occurred before, and that suffix's length (0: none did)."""
        # n-grams ending at the last token are left out: the suffix itself is not a match
        for end in range(self.indexed + 1, len(tokens)):
            for n in range(MIN_NGRAM, min(MAX_NGRAM, end) + 1):
                self.follows[tuple(tokens[end - n : end])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)
        for n in range(min(MAX_NGRAM, len(tokens)), MIN_NGRAM - 1, -1):
            after = self.follows.get(tuple(tokens[-n:]))
            if after is not None:
                return tokens[after : after + num], n
        return [], 0
