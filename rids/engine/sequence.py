"""One request: its tokens, its KV pages, its R-ISD state (drafts) and its statistics."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, auto

import torch

from rids.sampling import GREEDY, SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


def count_acceptance(
    verified: list[int], accepted: list[int], num_drafts: int, num_accepted: int
) -> None:
    """Per draft position: count a check for every draft that was checked (those before the
    first rejection, and that one) and a pass for each accepted draft; lists grow as needed."""
    for i in range(min(num_accepted + 1, num_drafts)):
        if i == len(verified):
            verified.append(0)
            accepted.append(0)
        verified[i] += 1
        accepted[i] += int(i < num_accepted)


@dataclass(slots=True)
class StepBlock:
    """A sequence's part of one forward: `[uncached committed | drafts | B_j for j in branches]`.

    The uncached committed tokens are the pending token (or the whole prompt at prefill);
    t = the position of the last of them. Each branch B_j is N-1 MASKs at positions t+j+1 ..
    t+j+N-1 that see the clean tokens up to d_j and, causally, themselves: the drafts that
    follow if exactly j drafts are accepted. Plain R-ISD has the one branch j = len(drafts).
    Tokens take KV slots start .. end-1 in block order; logits are needed at the last
    committed token and each draft (`num_verify` rows: they verify) and at every MASK.
    """

    token_ids: list[int]
    start: int
    num_drafts: int
    num_masks: int
    branches: tuple[int, ...] = ()
    partial: bool = False  # a prefill chunk that stops short of the prompt's end: KV only

    @property
    def num_clean(self) -> int:
        return len(self.token_ids) - self.num_masks

    @property
    def num_committed(self) -> int:
        return self.num_clean - self.num_drafts

    @property
    def num_verify(self) -> int:
        return 0 if self.partial else self.num_drafts + 1

    @property
    def end(self) -> int:
        return self.start + len(self.token_ids)

    @property
    def masks_per_branch(self) -> int:
        return self.num_masks // max(len(self.branches), 1)

    @property
    def positions(self) -> list[int]:
        t = self.start + self.num_committed - 1
        clean = list(range(self.start, self.start + self.num_clean))
        if len(self.branches) <= 1:
            return [*clean, *range(clean[-1] + 1, clean[-1] + 1 + self.num_masks)]
        m = self.masks_per_branch
        return clean + [t + j + k for j in self.branches for k in range(1, m + 1)]

    def branch_rows(self, j: int) -> slice | None:
        """The MASK rows (relative to this block's MASKs) of branch B_j, if the block has it."""
        if j not in self.branches:
            return None
        b, m = self.branches.index(j), self.masks_per_branch
        return slice(b * m, (b + 1) * m)

    def attention_mask(self) -> torch.Tensor | None:
        """[n, n] in-block visibility (None: plain causal, the one-branch case)."""
        if len(self.branches) <= 1:
            return None
        n, c, m = len(self.token_ids), self.num_clean, self.masks_per_branch
        mask = torch.zeros(n, n, dtype=torch.bool)
        mask[:c, :c] = torch.ones(c, c, dtype=torch.bool).tril()
        for b, j in enumerate(self.branches):
            rows = slice(c + b * m, c + (b + 1) * m)
            mask[rows, : self.num_committed + j] = True  # clean prefix up to d_j
            mask[rows, rows] = torch.ones(m, m, dtype=torch.bool).tril()
        return mask


class Sequence:
    def __init__(
        self,
        seq_id: int,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        stride: int,
        stop_token_ids: frozenset[int] = frozenset(),
        sampling: SamplingParams = GREEDY,
    ) -> None:
        self.seq_id = seq_id
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.max_new_tokens = max_new_tokens
        self.stride = stride
        self.stop_token_ids = stop_token_ids
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.keep_kv = False  # a chat session: pages outlive the turn
        self.prefilling = True  # until the first commit (again after a preemption)
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.drafts: list[int] = []  # proposed by the last step's MASK block, verified by the next
        self.draft_probs: torch.Tensor | None = None  # sampling: q of each draft, [len(drafts), V]
        self.draft_confidence: list[float] = []  # q(d_i): how likely each draft is to pass
        self.sampling = sampling
        self.generator: torch.Generator | None = None  # sampling only: greedy draws nothing
        if not sampling.greedy:
            seed = sampling.seed
            self.generator = torch.Generator()
            self.generator.manual_seed(int(torch.randint(2**62, ())) if seed is None else seed)
        # statistics
        self.num_forwards = 0
        self.decode_steps = 0
        self.decode_tokens = 0
        self.cold_starts = 0
        self.num_preemptions = 0
        self.drafts_verified = [0] * (stride - 1)  # per draft position i: times it was checked
        self.drafts_accepted = [0] * (stride - 1)  # ... and times it was accepted

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncached(self) -> int:
        return self.num_tokens - self.num_cached_tokens

    @property
    def max_block_tokens(self) -> int:
        """The most tokens a decode block can hold: the pending token, N-1 drafts and a branch
        of N-1 MASKs for each of the N rejection points."""
        return self.stride * self.stride

    def block_tokens(self, n: int) -> int:
        """An upper bound on the tokens of the next block if it runs `n` uncached tokens."""
        if n < self.num_uncached:
            return n
        k = len(self.drafts)
        return n + k + (k + 1) * (self.stride - 1)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def next_block(
        self,
        mask_token_id: int | None,
        branches: tuple[int, ...] | None = None,
        num_uncached: int | None = None,
    ) -> StepBlock:
        """The block of this sequence's next forward (verify, cold start, prefill or a prefill
        chunk of `num_uncached` tokens).

        `branches`: the j of each MASK branch B_j (default: the one branch after all drafts)."""
        if num_uncached is not None and num_uncached < self.num_uncached:
            end = self.num_cached_tokens + num_uncached
            chunk = self.token_ids[self.num_cached_tokens : end]
            return StepBlock(chunk, self.num_cached_tokens, 0, 0, partial=True)
        tokens = self.token_ids[self.num_cached_tokens :] + self.drafts
        if self.stride == 1:
            return StepBlock(tokens, self.num_cached_tokens, len(self.drafts), 0)
        assert mask_token_id is not None
        branches = (len(self.drafts),) if branches is None else branches
        num_masks = len(branches) * (self.stride - 1)
        tokens += [mask_token_id] * num_masks
        return StepBlock(tokens, self.num_cached_tokens, len(self.drafts), num_masks, branches)

    def commit(self, tokens: list[int]) -> list[int]:
        """Append committed tokens up to a stop token or the token budget; returns those kept."""
        kept = []
        for t in tokens:
            self.token_ids.append(t)
            kept.append(t)
            if t in self.stop_token_ids:
                self.finish("stop")
                break
            if len(self.token_ids) - self.num_prompt_tokens >= self.max_new_tokens:
                self.finish("length")
                break
        return kept

    def uniforms(self) -> list[float]:
        """This step's 2N-1 uniforms: a fixed count, so the stream never depends on the batch."""
        return torch.rand(
            2 * self.stride - 1, generator=self.generator, dtype=torch.float64
        ).tolist()

    def preempt(self) -> None:
        """Back to waiting without KV (its pages were freed). Its drafts stay: the recompute
        block is `[every token | drafts | MASKs]`, the very verify step it would have run, so
        a preemption changes no token (nor a seeded request's uniforms)."""
        self.status = SequenceStatus.WAITING
        self.num_cached_tokens = 0
        self.num_preemptions += 1

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.drafts = []
        self.draft_probs = None
        self.draft_confidence = []
