"""Continuous batching over the paged KV cache: admission, chunked prefill, preemption.

Requests join and leave the running batch between steps. Each step the scheduler

1. plans the running batch: a decoding sequence gets its whole plain block (the pending token,
   its drafts and N-1 MASKs: `step_tokens`, the one formula) while blocks fit
   `max_step_tokens` (one that does not waits a step); prefills (new requests, new chat
   turns, recomputed requests) share what is left of `max_step_tokens`, in arrival order, in
   chunks: a chunk only writes KV, the last one also proposes. What is left after that (tokens
   and KV pages) is the step's `room`: the drafting policy may add MASK branches only within it;
2. makes room: if the plan needs more KV pages than are free, the newest running request is
   preempted (its pages are freed, it goes back to the front of the queue, and is later
   recomputed in one block that also verifies the drafts it kept: no token changes);
3. admits waiting requests, oldest first, while their whole uncached prompt fits in the pages
   left (with `stationary_steps` k > 1, only every k steps: a fixed batch for k steps).
"""

from __future__ import annotations

from collections import deque

from rids.engine.drafting import Room
from rids.engine.page_manager import PageManager
from rids.engine.sequence import Sequence, SequenceStatus
from rids.engine.step_block import DraftPlan
from rids.errors import RidsError

Plan = list[tuple[Sequence, int]]  # each sequence with the uncached tokens it runs this step
IDLE_SESSIONS_HOLD_THE_CACHE = (
    "KV cache exhausted: the pages are held by idle chat sessions; close them or raise "
    "--kv-cache-tokens"
)


class Scheduler:
    def __init__(
        self,
        pages: PageManager,
        max_batch_size: int,
        max_step_tokens: int | None = None,
        stationary_steps: int = 1,
    ) -> None:
        if max_step_tokens is not None and max_step_tokens < 1:
            raise RidsError(f"max_step_tokens must be >= 1, got {max_step_tokens}")
        if stationary_steps < 1:
            raise RidsError(f"stationary_steps must be >= 1, got {stationary_steps}")
        self.pages = pages
        self.max_batch_size = max_batch_size
        self.max_step_tokens = max_step_tokens
        self.stationary_steps = stationary_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.steps_since_admission = stationary_steps
        self.room = Room()

    def add(self, seq: Sequence) -> None:
        """Queue a request (see `check`)."""
        self.check(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def check(
        self, seq: Sequence, new_tokens: str = "--max-new-tokens", stride: str = "--stride"
    ) -> None:
        """Refuse a request that could not run even with the whole cache to itself; the
        message names the request's knobs as the caller calls them (CLI flags, API fields)."""
        bm, block = self.pages, 2 * seq.stride - 1  # a cold start or a plain verify block
        need = bm.pages_for(seq.num_prompt_tokens + seq.max_new_tokens + block)
        if need > bm.num_pages:
            raise RidsError(
                f"KV cache too small for this request: {seq.num_prompt_tokens} prompt tokens + "
                f"{seq.max_new_tokens} new tokens + a stride-{seq.stride} step of {block} "
                f"tokens need {need} pages of {bm.page_size} tokens, the cache has "
                f"{bm.num_pages}; lower {new_tokens} or {stride} (a step's tokens grow with the "
                "stride), or give the engine a larger KV cache (--kv-cache-tokens)"
            )

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> Plan:
        """This step's batch, each sequence with how many uncached tokens it runs; what is
        left for MASK branches is in `room`."""
        plan, budget = self.plan(self.running)
        preempted = False
        while self.pages_needed(plan) > self.pages.num_free_pages:
            if len(self.running) == 1:
                raise RidsError(IDLE_SESSIONS_HOLD_THE_CACHE)
            self.preempt(self.running.pop())
            preempted = True
            plan, budget = self.plan(self.running)
        self.steps_since_admission += 1
        if not preempted and (
            not self.running or self.steps_since_admission >= self.stationary_steps
        ):
            admitted, budget = self.admit(
                budget, self.pages.num_free_pages - self.pages_needed(plan)
            )
            plan += admitted
        if not plan and self.waiting:
            raise RidsError(IDLE_SESSIONS_HOLD_THE_CACHE)
        pages = self.pages
        self.room = Room(
            budget, pages.num_free_pages - self.pages_needed(plan), lambda s, t: pages.new_pages(
                s, s.num_cached_tokens + t
            )
        )  # fmt: skip
        return plan

    def plan(self, seqs: list[Sequence]) -> tuple[Plan, float]:
        """Decoding sequences first (whole blocks, oldest first, while they fit the budget:
        one that does not waits a step; the first always runs), then prefills in chunks;
        returns the plan and the step tokens left."""
        budget = float("inf") if self.max_step_tokens is None else self.max_step_tokens
        plan: Plan = []
        for seq in (s for s in seqs if s.num_uncached <= 1):
            tokens = block_tokens(seq, seq.num_uncached)
            if plan and tokens > budget:
                continue
            plan.append((seq, seq.num_uncached))
            budget -= tokens
        for seq in seqs:
            if seq.num_uncached > 1 and (n := self.chunk(seq, budget)) > 0:
                plan.append((seq, n))
                budget -= block_tokens(seq, n)
        return plan, budget

    @staticmethod
    def chunk(seq: Sequence, budget: float) -> int:
        """Uncached tokens a prefilling sequence runs: all of them if they and their block
        fit in the budget (or there is only one), else a chunk that fills it (0: none left)."""
        whole = block_tokens(seq, seq.num_uncached)
        if whole <= budget or seq.num_uncached == 1:  # one token cannot be split
            return seq.num_uncached
        return max(int(min(budget, seq.num_uncached - 1)), 0)

    def pages_needed(self, plan: Plan) -> int:
        """New KV pages the plan's plain blocks need."""
        return sum(
            self.pages.new_pages(seq, seq.num_cached_tokens + block_tokens(seq, n))
            for seq, n in plan
        )

    def admit(self, budget: float, free_pages: int) -> tuple[Plan, float]:
        plan: Plan = []
        while self.waiting and len(self.running) < self.max_batch_size and budget > 0:
            seq = self.waiting[0]
            need = self.pages_needed([(seq, seq.num_uncached)])  # the whole prompt must fit
            n = self.chunk(seq, budget)
            if need > free_pages or n == 0:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            plan.append((seq, n))
            free_pages -= need
            budget -= block_tokens(seq, n)
            self.steps_since_admission = 0
        return plan, budget

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's pages; it is recomputed when it is admitted again."""
        self.pages.deallocate(seq)
        seq.preempt()
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop these sequences wherever they are, freeing their pages."""
        for seq in seqs:
            if not seq.is_finished:
                seq.finish("abort")
        self.waiting = deque(s for s in self.waiting if not s.is_finished)
        self.release_finished()

    def release_finished(self) -> list[Sequence]:
        """Drop finished sequences from the batch and free their pages (a chat session keeps
        its pages until `close`)."""
        done = [s for s in self.running if s.is_finished]
        for seq in done:
            if not seq.keep_kv:
                self.close(seq)
        self.running = [s for s in self.running if not s.is_finished]
        return done

    def close(self, seq: Sequence) -> None:
        self.pages.deallocate(seq)


def block_tokens(seq: Sequence, n: int) -> int:
    """Tokens of `seq`'s next block if it runs `n` uncached tokens: a prefill chunk, or its
    plain block (n, its drafts, N-1 MASKs): the most any plan without extra branches takes."""
    if n < seq.num_uncached:
        return n
    return DraftPlan.plain(len(seq.drafts), seq.stride).tokens(n)
