"""Corpus drafts: what the base itself wrote after the same words, in answers it gave before.

A table, built once from the base's own greedy answers (an adapter's training chats), maps each
n-gram (1..MAX_NGRAM tokens) that recurs in them to the continuation that most often followed
it there (each next token the likeliest given the ones before) and, per continuation length,
the share of occurrences it matched (shrunk towards zero where the n-gram is rare). After a
step, the request's last tokens are looked up (the longest n-gram in the table wins) and the
continuation becomes the next drafts, verified by the base like any other draft (retrieval
drafting, as in REST). It sees the pending token, which a MASK draft does not, and is right
most often in the phrases a chat model repeats across answers ("Here are some", list openings,
sign-offs), where the MASK drafter is not sure.

The table is stored beside the adapter (`draft_corpus.safetensors`): sorted 61-bit n-gram
hashes, their continuations and the shares, loaded without parsing and searched with one
`searchsorted` per lookup.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rids.errors import RidsError
from rids.utils.io import atomic_path

FILENAME = "draft_corpus.safetensors"
MAX_NGRAM = 8  # longest suffix looked up
LENGTH = 3  # continuation tokens stored per n-gram (the default stride's drafts)
MIN_SUPPORT = 2  # occurrences an n-gram needs to enter the table
MIN_EXPECTED = 0.5  # expected accepted tokens a continuation needs to enter the table
_MOD = (1 << 61) - 1  # a Mersenne prime: hashes fit int64
_BASE = 1_000_003


def suffix_keys(tokens: list[int], end: int, max_n: int = MAX_NGRAM) -> Iterator[int]:
    """Hashes of the n-grams ending right before `end`, for n = 1, 2, ... (at most max_n)."""
    h, power = 0, 1
    for n in range(1, min(max_n, end) + 1):
        h = (h + (tokens[end - n] + 1) * power) % _MOD
        power = power * _BASE % _MOD
        yield h


def followed_by(key: int, token: int | np.ndarray) -> int | np.ndarray:
    """The hash of the n-gram hashed `key` followed by `token` (int64 tokens: each; -1: by
    nothing, a key of its own)."""
    return (key * _BASE % _MOD + token + 1) % _MOD


@dataclass(frozen=True, eq=False)
class DraftCorpus:
    keys: torch.Tensor  # [E] int64, sorted: n-gram hashes
    tokens: torch.Tensor  # [E, LENGTH] int32: each n-gram's continuation
    expected: torch.Tensor  # [E, LENGTH] float32: cumulative expected accepted tokens

    def __len__(self) -> int:
        return self.keys.numel()

    def lookup(self, tokens: list[int], num: int) -> tuple[list[int], list[float]]:
        """Up to `num` drafts to follow `tokens` and, for each i, how many of the first i are
        expected to pass (([], []): no n-gram of the text's end is in the table). Where the
        longest n-gram found was left out for agreeing with its suffix, the expectation is the
        suffix's (an estimate from more occurrences, of the same drafts)."""
        num = min(num, self.tokens.shape[1])
        if not len(self) or num < 1:
            return [], []
        keys = torch.tensor(list(suffix_keys(tokens, len(tokens))), dtype=torch.int64)
        at = torch.searchsorted(self.keys, keys).clamp_(max=len(self) - 1)
        hits = (self.keys[at] == keys).nonzero()
        if not len(hits):
            return [], []
        row = int(at[hits[-1, 0]])  # the longest n-gram found
        return self.tokens[row, :num].tolist(), self.expected[row, :num].tolist()

    def save(self, path: Path) -> Path:
        tensors = {"keys": self.keys, "tokens": self.tokens, "expected": self.expected}
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        return path

    @classmethod
    def load(cls, path: Path, vocab_size: int) -> DraftCorpus:
        """The table at `path`, checked for a base of `vocab_size` tokens."""
        try:
            t = load_file(path)
        except SafetensorError as e:
            raise RidsError(f"{path} is corrupt ({e}); rebuild it or delete it") from None
        except OSError as e:
            raise RidsError(f"cannot read {path}: {e.strerror}") from None
        keys, tokens, expected = (t.get(k) for k in ("keys", "tokens", "expected"))
        whole = (
            keys is not None and keys.dtype == torch.int64 and keys.dim() == 1
            and tokens is not None and tokens.dtype == torch.int32 and tokens.dim() == 2
            and expected is not None and expected.dtype == torch.float32
            and tokens.shape == expected.shape and tokens.shape[0] == keys.numel()
        )  # fmt: skip
        if not whole:
            raise RidsError(f"{path} is corrupt (not a draft corpus); rebuild it or delete it")
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < vocab_size:
            raise RidsError(
                f"{path} holds token ids outside this base's vocabulary ({vocab_size}): it was "
                "built for another tokenizer; rebuild it with `rids build-corpus --base` this base"
            )
        return cls(keys, tokens, expected)

    @classmethod
    def build(
        cls,
        documents: Iterable[tuple[list[int], list[bool]]],
        length: int = LENGTH,
        max_ngram: int = MAX_NGRAM,
        min_support: int = MIN_SUPPORT,
        min_expected: float = MIN_EXPECTED,
    ) -> DraftCorpus:
        """The table of (token ids, is-a-target) documents: every position whose next token is
        a target (an answer's) and that has `length` tokens after it counts once for each
        n-gram ending there."""
        follows: dict[int, Counter[tuple[int, ...]]] = defaultdict(Counter)
        shorter: dict[int, int | None] = {}  # n-gram -> the one a token shorter (its suffix)
        for ids, target in documents:
            for end in range(1, len(ids) - length + 1):
                if target[end]:
                    after, parent = tuple(ids[end : end + length]), None
                    for key in suffix_keys(ids, end, max_ngram):
                        follows[key][after] += 1
                        shorter[key], parent = parent, key
        chains: dict[int, list[int]] = {}  # n-gram -> the chain a lookup of it finds
        rows = []
        # in insertion order, each n-gram comes after its suffix (suffix_keys yields n = 1, 2, ..)
        for key in follows:
            parent = shorter[key]
            found = chains.get(parent) if parent is not None else None
            counts = follows[key]
            total = sum(counts.values())
            if total >= min_support:
                chain, passes = likeliest_chain(counts, length)
                expected = [p / (total + 1) for p in accumulate(passes)]
                # kept where it finds what the shorter n-gram does not (a longer n-gram that
                # agrees with its suffix adds nothing but a surer estimate)
                if expected[-1] >= min_expected and chain != found:
                    rows.append((key, chain, expected))
                    found = chain
            if found is not None:
                chains[key] = found
        rows.sort()
        return cls(
            torch.tensor([r[0] for r in rows], dtype=torch.int64),
            torch.tensor([r[1] for r in rows], dtype=torch.int32).reshape(-1, length),
            torch.tensor([r[2] for r in rows], dtype=torch.float32).reshape(-1, length),
        )


def likeliest_chain(counts: Counter[tuple[int, ...]], length: int) -> tuple[list[int], list[int]]:
    """Token by token the likeliest continuation given the ones chosen before it, and how many
    occurrences match its first 1..length tokens."""
    chain, passes, pool = [], [], list(counts.items())
    for i in range(length):
        tally: Counter[int] = Counter()
        for after, c in pool:
            tally[after[i]] += c
        token, c = tally.most_common(1)[0]
        chain.append(token)
        passes.append(c)
        pool = [(a, n) for a, n in pool if a[i] == token]
    return chain, passes
