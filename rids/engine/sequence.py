"""One request: its tokens, its KV pages, its R-ISD state (drafts) and its statistics."""

from __future__ import annotations

from enum import Enum, auto
from typing import TYPE_CHECKING

import torch

from rids.engine.step_block import DraftPlan, StepBlock
from rids.sampling import GREEDY, SamplingParams

if TYPE_CHECKING:
    from rids.engine.drafting import Copy
    from rids.engine.prompt_lookup import NgramIndex


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


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
        self.page_table: list[int] = []
        self.drafts: list[int] = []  # the last step's MASK proposals or a copy; verified next
        self.draft_probs: torch.Tensor | None = None  # sampling: q of each draft, [len(drafts), V]
        self.sibling_draft: int | None = None  # the first MASK row's second choice (greedy)
        # where a chooser (draft head, counts) ran on the MASK rows of the drafts in hand: its
        # first draft and the row's argmax, whichever became the draft (with the head: also
        # where a copy did), judged by the next commit
        self.first_choices: tuple[int, int] | None = None
        self.copy: Copy | None = None  # the copy (text or corpus) the drafts are; None: MASK's
        self.ngrams: NgramIndex | None = None  # where the text's n-grams occurred (copies)
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
        self.copy_steps = 0  # decode steps that verified copied drafts (not counted above)
        self.copies_accepted = 0  # ... and the copied drafts they accepted
        self.sibling_steps = 0  # decode steps whose first draft failed beside a sibling path
        self.sibling_accepted = 0  # ... and the sibling tokens they accepted
        # the drafting policy's running estimate (recent steps weigh more)
        self.recent_verified: list[float] = []
        self.recent_accepted: list[float] = []
        self.steps_without_drafts = 0
        self.corpus_passed = 0.0  # ... and of its corpus copies: drafts passed
        self.corpus_predicted = 0.0  # ... against the passes the corpus expected
        self.recent_sibling_verified: list[float] = []  # ... and of its sibling paths
        self.recent_sibling_accepted: list[float] = []
        self.chooser_wins = 0.0  # ... and where its chooser and the argmax disagreed: times
        self.argmax_wins = 0.0  # the chooser's first draft was the base's, and the argmax's

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncached(self) -> int:
        return self.num_tokens - self.num_cached_tokens

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def next_block(
        self, mask_token_id: int | None, plan: DraftPlan, num_uncached: int | None = None
    ) -> StepBlock:
        """The block of this sequence's next forward: a prefill chunk of `num_uncached` tokens
        (KV only), or its uncached tokens with `plan`'s drafts and MASK branches."""
        if num_uncached is not None and num_uncached < self.num_uncached:
            end = self.num_cached_tokens + num_uncached
            chunk = self.token_ids[self.num_cached_tokens : end]
            return StepBlock(chunk, self.num_cached_tokens, 0, partial=True)
        k, m, s = plan.num_drafts, plan.masks_per_branch, plan.num_sibling
        tokens = self.token_ids[self.num_cached_tokens :] + self.drafts[:k]
        if s:
            assert self.sibling_draft is not None and s <= k
            tokens += [self.sibling_draft, *self.drafts[1:s]]
        if m:
            assert mask_token_id is not None
            tokens += [mask_token_id] * (m * len(plan.branches))
        return StepBlock(tokens, self.num_cached_tokens, k, m, plan.branches if m else (), s)

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
        a preemption changes no token (nor a seeded request's uniforms). The recompute is a
        prefill: it does not count as a decode step."""
        self.status = SequenceStatus.WAITING
        self.num_cached_tokens = 0
        self.num_preemptions += 1
        self.prefilling = True

    def finish(self, reason: str) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.drafts = []
        self.draft_probs = None
        self.sibling_draft = None
        self.first_choices = None
        self.copy = None
        self.ngrams = None
