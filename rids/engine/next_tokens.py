"""Next-token counts: how often the base wrote each token after the same 1..3 tokens in its
earlier answers, and the MASK drafts chosen with them.

A MASK row proposes x_{s+2}, x_{s+3}, .. without seeing x_{s+1}, the token the same forward
verifies (the bonus, or a branch's correction): its distribution q mixes the continuations of
every x_{s+1} the base might write. Once the step is verified that token is known, so each next
draft is chosen, left to right, among its MASK row's TOP_K likeliest tokens by

    log q(x) + WEIGHT * log p(x | the last ORDER tokens: the text, then the drafts before it)

where p is an n-gram estimate of the base's answers smoothed towards q, order by order
(p_0 = q, p_o = (c(context_o x) + PRIOR p_{o-1}) / (c(context_o) + PRIOR)). Only the proposals
change; verification decides what is committed, so the output does not (greedy requests only:
a sampled draft must be drawn from the q it is verified against).

Stored beside the adapter (`next_tokens.safetensors`, built by `rids build-corpus` from the same
answers as the corpus): the sorted 32-bit hashes of every (n-gram, next token) pair and of every
n-gram as a context, and their counts, in about 3 bytes an entry. A hash collision only costs a
worse draft.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from rids.engine.draft_corpus import followed_by, suffix_keys
from rids.errors import RidsError
from rids.utils.io import atomic_path

FILENAME = "next_tokens.safetensors"
ORDER = 3  # context tokens of the longest n-gram (scripts/tune_next_tokens.py)
TOP_K = 16  # candidates per MASK row
WEIGHT = 0.5  # of the n-gram log-probability against the MASK row's (likewise)
PRIOR = 1.0  # pseudo-counts of the lower-order estimate behind an n-gram's counts


def short_keys(keys: np.ndarray) -> np.ndarray:
    """61-bit n-gram hashes (int64) cut to the 32 bits the table stores."""
    return (keys & 0xFFFFFFFF).astype(np.uint32).view(np.int32)


@dataclass(frozen=True, eq=False)
class NextTokenCounts:
    keys: np.ndarray  # [E] int32, sorted: short hashes of (n-gram, next token) and of n-grams
    counts: np.ndarray  # [E] int32
    order: int = ORDER  # context tokens of the longest n-gram counted

    def __len__(self) -> int:
        return self.keys.size

    def count(self, keys: np.ndarray) -> np.ndarray:
        """The count stored under each of `keys` (int64 61-bit hashes; 0 where absent)."""
        if not len(self):
            return np.zeros(keys.shape)
        short = short_keys(keys)
        at = np.minimum(np.searchsorted(self.keys, short), len(self) - 1)
        return np.where(self.keys[at] == short, self.counts[at], 0).astype(np.float64)

    def choose(
        self,
        text: list[int],
        candidates: list[list[int]],
        log_probs: list[list[float]],
        weight: float = WEIGHT,
    ) -> tuple[list[int], int | None]:
        """The next drafts after `text`, one per MASK row from its candidates (likeliest first,
        with their log-probabilities under the row), and the first draft's runner-up."""
        order, context, drafts, runner_up = self.order, text[-self.order :], [], None
        for ids, lq in zip(candidates, log_probs, strict=True):
            x, log_q = np.asarray(ids, dtype=np.int64), np.asarray(lq, dtype=np.float64)
            grams = list(suffix_keys(context, len(context), order))  # the last 1, 2, .. tokens
            contexts = np.array([followed_by(h, -1) for h in grams], dtype=np.int64)
            found = self.count(np.concatenate([contexts, *(followed_by(h, x) for h in grams)]))
            totals, counts = found[: len(grams)], found[len(grams) :].reshape(len(grams), len(ids))
            p = np.exp(log_q)
            for total, c in zip(totals, counts, strict=True):
                p = (c + PRIOR * p) / (total + PRIOR)
            with np.errstate(divide="ignore"):  # p underflows to 0 only where q did
                score = log_q + weight * np.log(p)
            best = int(score.argmax())
            drafts.append(ids[best])
            if len(drafts) == 1 and len(ids) > 1:  # the first draft's runner-up only
                score[best] = -np.inf
                runner_up = ids[int(score.argmax())]
            context = [*context, drafts[-1]][-order:]
        return drafts, runner_up

    def save(self, path: Path) -> Path:
        """About 3 bytes an entry: each key's low 16 bits (its high 16 bits are implied by how
        many sorted keys share them) and its count as a byte (larger counts stored apart)."""
        high = (self.keys >> 16).astype(np.int64) + (1 << 15)  # 0..65535, sorted as the keys
        big = np.flatnonzero(self.counts >= 255).astype(np.int32)
        packed = {
            "keys_per_high": np.bincount(high, minlength=1 << 16).astype(np.int32),
            "low": (self.keys & 0xFFFF).astype(np.uint16),
            "counts": np.minimum(self.counts, 255).astype(np.uint8),
            "big_at": big,
            "big_counts": self.counts[big],
        }
        with atomic_path(path) as tmp:
            save_file(packed, tmp, {"order": str(self.order)})
        return path

    @classmethod
    def load(cls, path: Path) -> NextTokenCounts:
        try:
            with safe_open(path, "np") as f:
                order = (f.metadata() or {}).get("order")
                t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except SafetensorError as e:
            raise RidsError(f"{path} is corrupt ({e}); rebuild it or delete it") from None
        except OSError as e:
            raise RidsError(f"cannot read {path}: {e.strerror}") from None
        if order is None or not order.isdigit() or int(order) < 1:
            raise RidsError(f"{path} is corrupt (no context length); rebuild it or delete it")
        dtypes = {"keys_per_high": np.int32, "low": np.uint16, "counts": np.uint8,
                  "big_at": np.int32, "big_counts": np.int32}  # fmt: skip
        corrupt = RidsError(f"{path} is corrupt (not next-token counts); rebuild it or delete it")
        if any(k not in t or t[k].dtype != d or t[k].ndim != 1 for k, d in dtypes.items()):
            raise corrupt
        per_high, low, small = t["keys_per_high"], t["low"], t["counts"]
        size = low.size
        if not (
            per_high.size == 1 << 16 and per_high.min(initial=0) >= 0
            and per_high.sum() == size == small.size
            and t["big_at"].size == t["big_counts"].size
            and (t["big_at"].size == 0 or 0 <= t["big_at"].min() <= t["big_at"].max() < size)
        ):  # fmt: skip
            raise corrupt
        high = np.repeat(np.arange(1 << 16, dtype=np.int64) - (1 << 15), per_high)
        keys = ((high << 16) + low).astype(np.int32)
        if not bool((keys[1:] > keys[:-1]).all()):
            raise corrupt
        counts = small.astype(np.int32)
        counts[t["big_at"]] = t["big_counts"]
        return cls(keys, counts, int(order))

    @classmethod
    def build(
        cls,
        documents: Iterable[tuple[list[int], list[bool]]],
        order: int = ORDER,
        min_count: int = 1,
    ) -> NextTokenCounts:
        """The counts of (token ids, is-a-target) documents: every target token (an answer's)
        counts once after each of the 1..`order` tokens before it, and once for each of them
        as a context. Pairs and contexts seen fewer than `min_count` times are left out (a
        smaller table: an unseen pair counts 0, an unseen context defers to a shorter one)."""
        tally: Counter[int] = Counter()
        for ids, target in documents:
            for end in range(1, len(ids)):
                if target[end]:
                    for h in suffix_keys(ids, end, order):
                        tally[followed_by(h, -1)] += 1
                        tally[followed_by(h, ids[end])] += 1
        kept = {k: n for k, n in tally.items() if n >= min_count}
        keys = short_keys(np.fromiter(kept, dtype=np.int64, count=len(kept)))
        counts = np.fromiter(kept.values(), dtype=np.int64, count=len(kept))
        unique, where = np.unique(keys, return_inverse=True)  # 32-bit collisions add up
        total = np.bincount(where, weights=counts, minlength=unique.size)
        return cls(unique, np.minimum(total, np.iinfo(np.int32).max).astype(np.int32), order)
