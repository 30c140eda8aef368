"""What `LLM.generate` returns: per-request outputs and decoding statistics."""

from __future__ import annotations

from dataclasses import dataclass

from rids.engine.sequence import Sequence


@dataclass(slots=True)
class GenerationStats:
    """Per-request decoding statistics (prefill excluded from TPF, like time-per-output-token)."""

    forwards: int
    decode_steps: int
    decode_tokens: int
    cold_starts: int
    drafts_verified: list[int]  # MASK drafts, per draft position
    drafts_accepted: list[int]
    copy_steps: int = 0  # decode steps that verified drafts copied from the text
    copies_accepted: int = 0
    sibling_steps: int = 0  # decode steps whose first draft failed beside a sibling path
    sibling_accepted: int = 0  # ... and the sibling tokens they accepted instead

    @property
    def tpf(self) -> float:
        """Tokens committed per decode forward."""
        return self.decode_tokens / self.decode_steps if self.decode_steps else 0.0

    @property
    def acceptance(self) -> list[float]:
        """Per draft position i: P(d_i accepted | d_1..d_{i-1} accepted)."""
        return [
            a / v if v else 0.0
            for a, v in zip(self.drafts_accepted, self.drafts_verified, strict=True)
        ]

    @classmethod
    def of(cls, seq: Sequence) -> GenerationStats:
        return cls(
            seq.num_forwards,
            seq.decode_steps,
            seq.decode_tokens,
            seq.cold_starts,
            list(seq.drafts_verified),
            list(seq.drafts_accepted),
            seq.copy_steps,
            seq.copies_accepted,
            seq.sibling_steps,
            seq.sibling_accepted,
        )

    @classmethod
    def total(cls, stats: list[GenerationStats]) -> GenerationStats:
        width = max((len(s.drafts_verified) for s in stats), default=0)

        def add(lists: list[list[int]]) -> list[int]:
            return [sum(x[i] for x in lists if i < len(x)) for i in range(width)]

        return cls(
            sum(s.forwards for s in stats),
            sum(s.decode_steps for s in stats),
            sum(s.decode_tokens for s in stats),
            sum(s.cold_starts for s in stats),
            add([s.drafts_verified for s in stats]),
            add([s.drafts_accepted for s in stats]),
            sum(s.copy_steps for s in stats),
            sum(s.copies_accepted for s in stats),
            sum(s.sibling_steps for s in stats),
            sum(s.sibling_accepted for s in stats),
        )


@dataclass(slots=True)
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    stats: GenerationStats
