"""Which MASK branches each sequence's block carries (branch MASK blocks: no cold starts).

A branch B_j drafts what follows if exactly j drafts are accepted. Plain R-ISD has only
B_k (all k drafts accepted); a rejection then wastes the step's proposals and the next step is
a cold start. Modes: `off` (plain R-ISD), `all` (every rejection point), an integer K (the K
most likely rejection points by the drafts' own confidence, plus B_k), and `auto`: per step,
add the branches that raise expected committed tokens per second under a cost model of step
time vs tokens in the step, measured on this device, and the running acceptance rates (which,
unlike a draft's own confidence, are calibrated by what verification actually accepted).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

from rids.engine.sequence import Sequence, count_acceptance
from rids.errors import RidsError


@dataclass(slots=True)
class CostModel:
    """Seconds of one forward by tokens in it, interpolated linearly between measurements."""

    tokens: list[int]
    seconds: list[float]

    def time(self, n: int) -> float:
        i = min(max(bisect_left(self.tokens, n), 1), len(self.tokens) - 1)
        (t0, t1), (s0, s1) = self.tokens[i - 1 : i + 1], self.seconds[i - 1 : i + 1]
        return s0 + (s1 - s0) * (n - t0) / (t1 - t0)


def parse_branches(mode: str | int) -> str | int:
    if isinstance(mode, int) or str(mode).isdigit():
        k = int(mode)
        if k < 0:
            raise RidsError(f"--branches K must be >= 0, got {k}")
        return k
    if mode not in ("off", "all", "auto"):
        raise RidsError(f"--branches must be off, all, auto or a number, got {mode!r}")
    return mode


def reject_probabilities(confidence: list[float]) -> list[float]:
    """P(exactly j drafts accepted), j = 0..k-1, if draft i passes with probability conf[i]."""
    out, alive = [], 1.0
    for c in confidence:
        out.append(alive * (1 - c))
        alive *= c
    return out


@dataclass
class BranchPolicy:
    mode: str | int = "off"
    cost: CostModel | None = None
    verified: list[int] = field(default_factory=list)  # running stats, per draft position
    accepted: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        count_acceptance(self.verified, self.accepted, num_drafts, num_accepted)

    def acceptance(self, k: int) -> list[float]:
        """Running acceptance rate of draft positions 1..k (Laplace: 0.5 before evidence)."""
        return [
            ((self.accepted[i] if i < len(self.accepted) else 0) + 1)
            / ((self.verified[i] if i < len(self.verified) else 0) + 2)
            for i in range(k)
        ]

    def expected_tokens(self, k: int) -> float:
        """E[tokens committed by a verify step with k drafts] = 1 + a1 + a1 a2 + ..."""
        total, alive = 1.0, 1.0
        for a in self.acceptance(k):
            alive *= a
            total += alive
        return total

    def choose(self, seqs: list[Sequence]) -> list[tuple[int, ...] | None]:
        """Per sequence: the branches of its next block (None: plain R-ISD)."""
        if self.mode == "off":
            return [None] * len(seqs)
        if self.mode == "all":
            return [tuple(range(len(s.drafts) + 1)) if s.stride > 1 else None for s in seqs]
        if self.mode != "auto":
            return [self.top_k(s, int(self.mode)) for s in seqs]
        if self.cost is None:  # not measured yet (no room in the cache for it so far)
            return [None] * len(seqs)
        return self.auto(seqs)

    def top_k(self, seq: Sequence, k: int) -> tuple[int, ...] | None:
        if seq.stride == 1 or not seq.drafts:
            return None
        p = reject_probabilities(seq.draft_confidence)
        chosen = sorted(sorted(range(len(p)), key=lambda j: -p[j])[:k])
        return (*chosen, len(seq.drafts))

    def auto(self, seqs: list[Sequence]) -> list[tuple[int, ...] | None]:
        """Branches that raise expected committed tokens per second for this step's batch.

        A seeded sampled request gets none: these decisions depend on measured timings and on
        every request's acceptance so far, and its text must depend on its seed alone."""
        chosen: dict[int, list[int]] = {}
        shared: list[tuple[float, int, int, int]] = []
        gain, tokens = 0.0, 0
        for i, s in enumerate(seqs):
            if s.sampling.seed is not None and not s.sampling.greedy:
                continue
            gain += self.expected_tokens(len(s.drafts))
            tokens += s.num_tokens - s.num_cached_tokens + len(s.drafts) + s.stride - 1
            shared += self.branch_values(s, i)
        for i, j in self.pick(shared, gain, tokens):
            chosen.setdefault(i, []).append(j)
        return [
            (*sorted(chosen[i]), len(s.drafts)) if i in chosen else None for i, s in enumerate(seqs)
        ]

    def branch_values(self, seq: Sequence, i: int) -> list[tuple[float, int, int, int]]:
        """(expected tokens gained, tokens added, seq index, j) for each possible branch B_j."""
        if seq.stride == 1 or not seq.drafts:
            return []
        saved = self.expected_tokens(seq.stride - 1) - 1  # a verify step instead of a cold start
        rejects = reject_probabilities(self.acceptance(len(seq.drafts)))
        return [(p * saved, seq.stride - 1, i, j) for j, p in enumerate(rejects)]

    def pick(
        self, candidates: list[tuple[float, int, int, int]], gain: float, tokens: int
    ) -> list[tuple[int, int]]:
        """Add the most valuable branches while expected tokens per second still rises."""
        if not candidates:
            return []
        assert self.cost is not None, "branches=auto needs a cost model"
        best, out = gain / self.cost.time(tokens), []
        for value, extra, i, j in sorted(candidates, reverse=True):
            rate = (gain + value) / self.cost.time(tokens + extra)
            if rate <= best:
                break
            best, gain, tokens = rate, gain + value, tokens + extra
            out.append((i, j))
        return out
