"""A sequence's part of one R-ISD forward (its *block*), and the one formula for its size.

    [ uncached committed | d_1 .. d_k | d_1' d_2 .. d_s | B_j for j in branches ]
                                          sibling path       B_j = m MASKs, gate 1

The uncached committed tokens are the pending token (or a prompt, or a prefill chunk); t is the
position of the last of them. The block verifies k drafts (logits at the last committed token
and at each draft: k + 1 verify rows) and proposes m drafts per branch: branch B_j's MASKs sit
at positions t+j+1 .. t+j+m, see the clean tokens up to d_j and, causally, each other, and draft
what follows if exactly j drafts are accepted. Plain R-ISD has the one branch j = k right after
the drafts; m = 0 (no branches) is a plain AR step that also verifies its k drafts.

The sibling path (s <= k tokens, clean, base only) is a second candidate for the same positions
t+1 .. t+s: the first MASK row's second choice d_1' followed by the main path's d_2 .. d_s. It
sees the committed tokens and, causally, itself, and is verified where d_1 fails: its rows'
logits check d_2 .. d_s and give the token after it. Tokens take KV slots start .. end-1 in
block order (an accepted sibling path's KV is moved into place afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass


def step_tokens(
    num_uncached: int, num_drafts: int, masks_per_branch: int, branches: int, num_sibling: int = 0
) -> int:
    """Tokens in a block: the one formula the scheduler, the drafting policy and the block share."""
    return num_uncached + num_drafts + num_sibling + masks_per_branch * branches


@dataclass(frozen=True, slots=True)
class DraftPlan:
    """What a sequence's next block does: verify `num_drafts` of its drafts (and a sibling path
    of `num_sibling` <= num_drafts tokens) and propose `masks_per_branch` drafts in each branch
    B_j, j in `branches` (each j <= num_drafts)."""

    num_drafts: int
    masks_per_branch: int
    branches: tuple[int, ...]
    num_sibling: int = 0

    @classmethod
    def plain(cls, num_drafts: int, stride: int) -> DraftPlan:
        """Plain R-ISD: verify every draft, propose N-1 after all of them."""
        m = stride - 1
        return cls(num_drafts, m, (num_drafts,) if m else ())

    def tokens(self, num_uncached: int) -> int:
        m, b = self.masks_per_branch, len(self.branches)
        return step_tokens(num_uncached, self.num_drafts, m, b, self.num_sibling)


@dataclass(slots=True)
class StepBlock:
    token_ids: list[int]
    start: int  # position (and sequence-relative KV slot) of the first token
    num_drafts: int
    masks_per_branch: int = 0
    branches: tuple[int, ...] = ()
    num_sibling: int = 0  # clean tokens of the sibling path, after the drafts
    partial: bool = False  # a prefill chunk that stops short of the prompt's end: KV only

    @property
    def num_masks(self) -> int:
        return self.masks_per_branch * len(self.branches)

    @property
    def num_clean(self) -> int:
        return len(self.token_ids) - self.num_masks

    @property
    def num_committed(self) -> int:
        return self.num_clean - self.num_drafts - self.num_sibling

    @property
    def first_sibling(self) -> int:
        """Block index of the sibling path's first token."""
        return self.num_committed + self.num_drafts

    @property
    def sibling(self) -> list[int]:
        """The sibling path's tokens (empty when the block has none)."""
        return self.token_ids[self.first_sibling : self.first_sibling + self.num_sibling]

    @property
    def num_verify(self) -> int:
        return 0 if self.partial else self.num_drafts + 1

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def positions(self) -> list[int]:
        t = self.start + self.num_committed - 1
        main = list(range(self.start, self.start + self.first_sibling))
        sibling = list(range(t + 1, t + 1 + self.num_sibling))
        m = self.masks_per_branch
        return main + sibling + [t + j + i for j in self.branches for i in range(1, m + 1)]

    def visibility(self) -> list[tuple[int, int, int]]:
        """Per token, in block order: (prefix, lo, hi) in block indices: it sees the cache,
        block tokens [0, prefix) and block tokens lo..hi (an empty range when lo > hi)."""
        c, m, f = self.num_clean, self.masks_per_branch, self.first_sibling
        rows = [(i + 1, 0, -1) for i in range(f)]  # committed and drafts: causal
        rows += [(self.num_committed, f, f + i) for i in range(self.num_sibling)]
        for b, j in enumerate(self.branches):
            first = c + b * m
            prefix = self.num_committed + j  # committed tokens and d_1 .. d_j
            rows += [(prefix, first, first + i) for i in range(m)]
        return rows

    @property
    def is_causal(self) -> bool:
        """Whether plain causal visibility over the block is exact (one branch after all
        clean tokens, no sibling path): then attention needs no custom mask."""
        one = len(self.branches) <= 1 and all(j == self.num_drafts for j in self.branches)
        return one and not self.num_sibling
