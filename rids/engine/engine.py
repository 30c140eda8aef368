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

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def step(self) -> list[Sequence]:
        """One forward over the running batch; returns the sequences that finished."""
        seqs = self.scheduler.schedule()
        assert seqs, "step() with nothing admissible: add() refuses requests the cache cannot hold"
        blocks = [seq.next_block(self.mask_token_id) for seq in seqs]
        for seq, block in zip(seqs, blocks, strict=True):
            self.block_manager.allocate(seq, block.end)
        logits = self.runner.run(seqs, blocks, self.block_manager)
        targets, proposals = logits.verify.argmax(-1).tolist(), logits.masks.argmax(-1).tolist()
        v = m = 0
        for seq, block in zip(seqs, blocks, strict=True):
            self.postprocess(
                seq, block, targets[v : v + block.num_verify], proposals[m : m + block.num_masks]
            )
            v += block.num_verify
            m += block.num_masks
        return self.scheduler.release_finished()

    def postprocess(
        self, seq: Sequence, block: StepBlock, targets: list[int], proposals: list[int]
    ) -> None:
        """Greedy verification: `targets` are the base's argmax at the pending token and each
        draft, `proposals` the MASK rows' argmax."""
        k = block.num_drafts
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
                seq.drafts_accepted[i] += int(i < accepted)
        if seq.is_finished:
            return
        drafts = proposals if accepted == k else []
        seq.drafts = self.drafter(seq, drafts) if self.drafter and drafts else drafts
