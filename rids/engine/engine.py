"""The R-ISD engine: one forward per step for the whole batch, then greedy verification.

Each sequence contributes `[pending | drafts | MASK x (N-1)]` (see `StepBlock`). Clean rows run
the base only, so their logits are the base model's: the longest draft prefix that equals their
argmax is committed, plus one token from the base (the correction or the bonus). If every draft
passed, the MASK rows' argmax are the next drafts; otherwise they were conditioned on a wrong
draft and the next step is a cold start. KV of the pending token and the accepted drafts is kept;
everything after is dropped by truncating the block table.
"""

from __future__ import annotations

from collections.abc import Callable

from rids.engine.block_manager import BlockManager
from rids.engine.model_runner import ModelRunner
from rids.engine.scheduler import Scheduler
from rids.engine.sequence import Sequence, StepBlock

Drafter = Callable[[Sequence, list[int]], list[int]]


def accept_greedy(drafts: list[int], targets: list[int]) -> int:
    """Number of leading drafts equal to the base's argmax at their slot."""
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n


class Engine:
    def __init__(
        self,
        runner: ModelRunner,
        block_manager: BlockManager,
        scheduler: Scheduler,
        mask_token_id: int | None,
    ) -> None:
        self.runner = runner
        self.block_manager = block_manager
        self.scheduler = scheduler
        self.mask_token_id = mask_token_id
        # seam for other proposers (tests use an oracle): maps the MASK proposals to the drafts
        self.drafter: Drafter | None = None
        self.num_forwards = 0

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def step(self) -> list[Sequence]:
        """One forward over the running batch; returns the sequences that finished."""
        seqs = self.scheduler.schedule()
        blocks = [seq.next_block(self.mask_token_id) for seq in seqs]
        for seq, block in zip(seqs, blocks, strict=True):
            self.block_manager.allocate(seq, block.end)
        best = self.runner.run(seqs, blocks, self.block_manager).argmax(-1).tolist()
        self.num_forwards += 1
        row = 0
        for seq, block in zip(seqs, blocks, strict=True):
            self.postprocess(seq, block, best[row : row + block.num_logits])
            row += block.num_logits
        return self.scheduler.release_finished()

    def postprocess(self, seq: Sequence, block: StepBlock, best: list[int]) -> None:
        k = block.num_drafts
        targets, proposals = best[: k + 1], best[k + 1 :]
        accepted = accept_greedy(seq.drafts, targets)
        is_prefill = seq.num_forwards == 0
        seq.num_forwards += 1
        seq.num_cached_tokens = block.start + block.num_committed + accepted
        self.block_manager.truncate(seq, seq.num_cached_tokens)
        kept = seq.commit([*seq.drafts[:accepted], targets[accepted]])
        if not is_prefill:
            seq.decode_steps += 1
            seq.decode_tokens += len(kept)
            seq.cold_starts += int(k == 0 and block.num_masks > 0)
            for i in range(min(accepted + 1, k)):
                seq.drafts_verified[i] += 1
                seq.drafts_accepted[i] += i < accepted
        if seq.is_finished:
            return
        drafts = proposals if accepted == k else []
        seq.drafts = self.drafter(seq, drafts) if self.drafter and drafts else drafts
