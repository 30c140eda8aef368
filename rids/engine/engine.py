"""The R-ISD engine: schedule -> build step blocks -> run -> verify -> advance.

Each sequence contributes `[pending | drafts | MASK branches]` (see `StepBlock`); the drafting
policy decides how many drafts it verifies and proposes (`rids.engine.drafting`). Clean rows
run the base only, so their logits are the base model's; verification commits the longest
accepted draft prefix plus the base's own token after it (`rids.engine.verifier`), and the
MASK rows of the branch that matches give the next drafts (or a copy from the request's text,
`rids.engine.prompt_lookup`, or from the adapter's corpus, `rids.engine.draft_corpus`; MASK
drafts chosen among each row's likeliest tokens knowing the token before each, by the
adapter's draft head in verification, `rids.engine.draft_head`, or else its counts here,
`rids.engine.next_tokens`, for the requests the policy trusts the chooser for). KV of
the pending token and the accepted drafts is kept (an accepted sibling path's is moved where
the drafts' was); everything after is dropped by truncating the page table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rids.engine import cost_model
from rids.engine.draft_head import DraftHead
from rids.engine.drafting import DraftingPolicy, record_acceptance
from rids.engine.model_runner import ModelRunner
from rids.engine.next_tokens import NextTokenCounts
from rids.engine.page_manager import PageManager
from rids.engine.scheduler import Plan, Scheduler
from rids.engine.sequence import Sequence
from rids.engine.step_block import DraftPlan, StepBlock
from rids.engine.step_inputs import StepEntry
from rids.engine.verifier import Verdict, Verifier

# (sequence, MASK proposals, the first one's runner-up) -> (drafts, sibling draft)
Drafter = Callable[[Sequence, list[int], int | None], tuple[list[int], int | None]]


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        pages: PageManager,
        scheduler: Scheduler,
        mask_token_id: int | None,
        policy: DraftingPolicy,
        verifier: Verifier,
    ) -> None:
        self.runner = runner
        self.pages = pages
        self.scheduler = scheduler
        self.mask_token_id = mask_token_id
        self.policy = policy
        self.verifier = verifier
        # seam for other proposers (tests, benchmarks): maps a greedy request's MASK proposals
        # to its drafts and sibling draft (no copies meanwhile: the drafts are the proposer's)
        self.drafter: Drafter | None = None

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def step(self) -> list[Sequence]:
        """One forward over the running batch; returns the sequences that finished."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        seqs = [seq for seq, _ in plan]
        blocks = self.blocks(plan)
        for seq, block in zip(seqs, blocks, strict=True):
            self.pages.allocate(seq, block.end)
        entries = [StepEntry(b, s.page_table) for s, b in zip(seqs, blocks, strict=True)]
        step, logits = self.runner.run(entries)
        sampled = {
            i: (s, s.uniforms())
            for i, (s, b) in enumerate(zip(seqs, blocks, strict=True))
            if not s.sampling.greedy and not b.partial
        }
        head = self.draft_head
        argmax_blocks = [] if head is None else [
            i for i, s in enumerate(seqs) if not self.policy.trusts_chooser(s)
        ]  # fmt: skip
        verdicts = self.verifier.verify(
            blocks, step.inputs, step.dev, logits, sampled, bool(self.policy.siblings),
            self.num_candidates, head=head, argmax_blocks=argmax_blocks,
        )  # fmt: skip
        for seq, block, verdict in zip(seqs, blocks, verdicts, strict=True):
            self.advance(seq, block, verdict)
        return self.scheduler.release_finished()

    def blocks(self, plan: Plan) -> list[StepBlock]:
        """Each scheduled sequence's block: a prefill chunk, or its uncached tokens with the
        drafts and MASK branches the policy chose (within the room the scheduler left)."""
        whole = [i for i, (seq, n) in enumerate(plan) if n >= seq.num_uncached]
        seqs, counts = [plan[i][0] for i in whole], [plan[i][1] for i in whole]
        if self.mask_token_id is None:  # nothing to propose with: AR steps
            chosen = [DraftPlan(len(s.drafts), 0, ()) for s in seqs]
        else:
            chosen = self.policy.plans(seqs, counts, self.scheduler.room)
        plans: list[DraftPlan | None] = [None] * len(plan)
        for i, p in zip(whole, chosen, strict=True):
            plans[i] = p
        return [
            seq.next_block(self.mask_token_id, p or DraftPlan(0, 0, ()), n)
            for (seq, n), p in zip(plan, plans, strict=True)
        ]

    def advance(self, seq: Sequence, block: StepBlock, verdict: Verdict) -> None:
        """Commit the accepted drafts and the token after them, keep their KV, take the next
        drafts (or none: a cold start next)."""
        seq.num_forwards += 1
        if block.partial:  # a prefill chunk: its KV is all it leaves
            seq.num_cached_tokens = block.end
            return
        k, accepted, sibling = block.num_drafts, verdict.accepted, verdict.sibling
        tried_sibling = block.num_sibling > 0 and not accepted  # the first draft failed beside one
        is_prefill, seq.prefilling = seq.prefilling, False
        first = block.start + block.num_committed  # the first draft's KV index
        if sibling:  # the sibling path won: its KV moves to where the main path's was
            self.runner.move_kv(seq.page_table, block.start + block.first_sibling, first, sibling)
            drafts = block.sibling[:sibling]
        else:
            drafts = block.token_ids[block.num_committed : block.num_committed + accepted]
        seq.num_cached_tokens = first + len(drafts)
        self.pages.truncate(seq, seq.num_cached_tokens)
        kept = seq.commit([*drafts, verdict.token])
        self.policy.record_choices(seq, kept[0])  # the base's token where the drafts began
        # a stop token among the accepted drafts ends the text there: cached KV past it is moot
        seq.num_cached_tokens = min(seq.num_cached_tokens, seq.num_tokens - 1)
        if not is_prefill:
            seq.decode_steps += 1
            seq.decode_tokens += len(kept)
            seq.cold_starts += int(k == 0 and block.num_masks > 0)
            if seq.copy is not None:
                seq.copy_steps += int(k > 0)
                seq.copies_accepted += accepted
                self.policy.record_copy(seq, k, accepted)
            else:
                record_acceptance(seq.drafts_verified, seq.drafts_accepted, k, accepted)
            if tried_sibling:
                seq.sibling_steps += 1
                seq.sibling_accepted += sibling
        if seq.copy is None:  # the policy models the MASK drafter
            self.policy.record(seq, k, accepted)
            if tried_sibling:
                self.policy.record_sibling(seq, block.num_sibling, sibling)
        if seq.is_finished:
            return
        new, probs, copy = verdict.drafts, verdict.draft_probs, None
        second, seq.first_choices = verdict.second, verdict.first_choices
        if self.drafter is not None and seq.sampling.greedy:  # an external proposer has no q
            if new:
                new, second = self.drafter(seq, new, second)
        elif (copy := self.policy.copied_drafts(seq, new)) is not None:
            new, probs, second = copy.drafts, None, None
        elif verdict.candidates and verdict.candidate_log_probs:  # greedy MASK drafts, chosen
            assert isinstance(self.policy.chooser, NextTokenCounts)  # knowing what was committed
            chosen, chosen_second = self.policy.chooser.choose(
                seq.token_ids, verdict.candidates, verdict.candidate_log_probs
            )
            seq.first_choices = (chosen[0], new[0])
            if self.policy.trusts_chooser(seq):
                new, second = chosen, chosen_second
        seq.drafts, seq.draft_probs, seq.copy = new, probs, copy
        seq.sibling_draft = second if new and second != new[0] else None

    @property
    def num_candidates(self) -> int:
        """Likeliest tokens per MASK row that verification finds (none for an external
        drafter: its drafts are its own)."""
        return 0 if self.drafter is not None else self.policy.num_candidates

    @property
    def draft_head(self) -> DraftHead | None:
        """The head that chooses MASK drafts in verification, if the policy chooses with one."""
        chooser = None if self.drafter is not None else self.policy.chooser
        return chooser if isinstance(chooser, DraftHead) else None

    def calibrate(self, cache: Path, key: dict) -> None:
        """Give the drafting policy its step-time model: from the on-disk cache, or measured
        now (before any request: never inside an answer). A cache too small to time the
        largest steps gets a partial model, measured again next time; one too small to time
        two sizes gets none (the policy then takes fixed steps)."""
        if self.mask_token_id is None:
            return
        room = self.pages.num_free_pages * self.pages.page_size
        context = min(64, room // 2)
        sizes = tuple(n for n in cost_model.SIZES if context + n <= room)
        if len(sizes) < 2:
            return

        def build() -> cost_model.CostModel:
            return cost_model.measure(lambda c, m: self.time(c, m, context), sizes)

        if sizes != cost_model.SIZES:
            cost_model.logger.info(
                "measuring step times on this device (not cached: this KV cache is too small "
                "to time the largest steps)"
            )
            self.policy.cost = build()
            return
        full = cost_model.device_key(self.runner.device, key)
        self.policy.cost = cost_model.cached(cache, full, build)

    def time(self, clean: int, masks: int, context: int) -> None:
        """One whole step (forward, verification, its host copy) of one sequence: `clean` clean
        tokens (a pending one and drafts) and `masks` MASKs after `context` cached ones, on
        free pages (nothing allocated)."""
        need = self.pages.pages_for(context + clean + masks)
        table = list(self.pages.free_page_ids)[:need]
        k = clean - 1
        block = StepBlock([0] * (clean + masks), context, k, masks, (k,) if masks else ())
        step, logits = self.runner.run([StepEntry(block, table)])
        self.verifier.verify(
            [block], step.inputs, step.dev, logits, {}, bool(self.policy.siblings),
            self.num_candidates, head=self.draft_head,
        )  # fmt: skip
