"""The R-ISD engine: one forward per step for the whole batch, then verification.

Each sequence contributes `[pending | drafts | MASK x (N-1)]` (see `StepBlock`). Clean rows run
the base only, so their logits are the base model's. Greedy: the longest draft prefix equal to
their argmax is committed, plus the base's own token after it (the correction or the bonus).
Sampling: speculative sampling against the drafts' proposal distributions (`rids.sampling`).
If every draft passed, the MASK rows give the next drafts; otherwise they were conditioned on a
wrong draft and the next step is a cold start. KV of the pending token and the accepted drafts
is kept; everything after is dropped by truncating the block table.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from rids.engine.block_manager import BlockManager
from rids.engine.branches import BranchPolicy
from rids.engine.model_runner import ModelRunner, StepLogits
from rids.engine.scheduler import Scheduler
from rids.engine.sequence import Sequence, StepBlock, count_acceptance
from rids.sampling import probabilities, sample, speculative_accept

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
        branches: BranchPolicy | None = None,
        kernels: ModuleType | None = None,
    ) -> None:
        self.runner = runner
        self.block_manager = block_manager
        self.scheduler = scheduler
        self.mask_token_id = mask_token_id
        self.branches = branches or BranchPolicy()
        self.kernels = kernels  # fused verification (rids.kernels.verify); None: PyTorch
        # seam for other proposers (tests use an oracle): maps the MASK proposals to the drafts
        self.drafter: Drafter | None = None

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

    def step(self) -> list[Sequence]:
        """One forward over the running batch; returns the sequences that finished."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        seqs = [seq for seq, _ in plan]
        policy = self.branches
        if policy.mode == "auto" and policy.cost is None and any(s.drafts for s in seqs):
            policy.cost = self.runner.measure_costs(self.block_manager)  # once, on this device
        branch_sets = policy.choose(seqs)
        blocks = [
            seq.next_block(self.mask_token_id, br, n)
            for (seq, n), br in zip(plan, branch_sets, strict=True)
        ]
        for seq, block in zip(seqs, blocks, strict=True):
            self.block_manager.allocate(seq, block.end)
        logits = self.runner.run(seqs, blocks, self.block_manager)
        verdicts = self.verify(seqs, blocks, logits)
        proposals = logits.masks.argmax(-1).tolist()
        # the drafts' own confidence: only the K-branch budget ranks rejection points by it
        uses_confidence = isinstance(policy.mode, int)
        confidence = logits.masks.float().softmax(-1).amax(-1).tolist() if uses_confidence else []
        m = 0
        for seq, block, (accepted, token, u) in zip(seqs, blocks, verdicts, strict=True):
            if block.partial:  # a prefill chunk: its KV is all it leaves
                seq.num_forwards += 1
                seq.num_cached_tokens = block.end
                continue
            k, n = block.num_drafts, seq.stride
            rows = block.branch_rows(accepted)
            drafts: list[int] = []
            q = None
            conf: list[float] = []
            if rows is not None:  # the branch that matches what was accepted
                rows = slice(m + rows.start, m + rows.stop)
                if seq.sampling.greedy:
                    drafts, conf = proposals[rows], confidence[rows] if uses_confidence else []
                else:
                    q = probabilities(logits.masks[rows], seq.sampling)
                    drafts = [sample(q[j], u[n + j]) for j in range(len(q))]
                    conf = [float(q[j, d]) for j, d in enumerate(drafts)]
            self.branches.record(k, accepted)
            self.advance(seq, block, accepted, token, drafts, q, conf)
            m += block.num_masks
        return self.scheduler.release_finished()

    def verify(
        self, seqs: list[Sequence], blocks: list[StepBlock], logits: StepLogits
    ) -> list[tuple[int, int, list[float]]]:
        """Per sequence: drafts accepted, the token committed after them, and the step's
        uniforms (sampled requests only; a prefill chunk draws none and commits nothing)."""
        rows, v = [], 0
        for block in blocks:
            rows.append(slice(v, v + block.num_verify))
            v += block.num_verify
        out: list[tuple[int, int, list[float]]] = [(0, 0, [])] * len(seqs)
        live = [i for i, b in enumerate(blocks) if not b.partial]
        greedy = [i for i in live if seqs[i].sampling.greedy]
        sampled = [i for i in live if not seqs[i].sampling.greedy]
        if greedy:
            found = self.verify_greedy([seqs[i] for i in greedy], [rows[i] for i in greedy], logits)
            for i, (n, token) in zip(greedy, found, strict=True):
                out[i] = (n, token, [])
        if sampled:
            uniforms = [seqs[i].uniforms() for i in sampled]
            found = self.verify_sampled(
                [seqs[i] for i in sampled], [rows[i] for i in sampled], logits, uniforms
            )
            for i, (n, token), u in zip(sampled, found, uniforms, strict=True):
                out[i] = (n, token, u)
        return out

    def verify_greedy(
        self, seqs: list[Sequence], rows: list[slice], logits: StepLogits
    ) -> list[tuple[int, int]]:
        drafts = [seq.drafts for seq in seqs]
        if self.kernels is not None:
            index = torch.cat([torch.arange(r.start, r.stop) for r in rows])
            rows_logits = logits.verify[index.to(logits.verify.device)]
            return list(zip(*self.kernels.greedy_verify(rows_logits, drafts), strict=True))
        targets = logits.verify.argmax(-1).tolist()
        found = []
        for d, r in zip(drafts, rows, strict=True):
            n = accept_greedy(d, targets[r])
            found.append((n, targets[r][n]))
        return found

    def verify_sampled(
        self,
        seqs: list[Sequence],
        rows: list[slice],
        logits: StepLogits,
        uniforms: list[list[float]],
    ) -> list[tuple[int, int]]:
        p = [probabilities(logits.verify[r], s.sampling) for s, r in zip(seqs, rows, strict=True)]
        drafts = [seq.drafts for seq in seqs]
        # k uniforms for the drafts, then the N-th for the token after them
        us = [[*u[: len(s.drafts)], u[s.stride - 1]] for s, u in zip(seqs, uniforms, strict=True)]
        if self.kernels is not None:
            qs = [s.draft_probs for s in seqs if s.drafts]
            q = torch.cat(qs) if qs else p[0][:0]
            return list(zip(*self.kernels.sampled_verify(torch.cat(p), q, drafts, us), strict=True))
        return [
            speculative_accept(s.drafts, s.draft_probs, pi, u)
            for s, pi, u in zip(seqs, p, us, strict=True)
        ]

    def advance(
        self,
        seq: Sequence,
        block: StepBlock,
        accepted: int,
        token: int,
        drafts: list[int],
        draft_probs: torch.Tensor | None,
        confidence: list[float],
    ) -> None:
        """Commit the accepted drafts and `token`, keep their KV, and take the next drafts."""
        k = block.num_drafts
        is_prefill, seq.prefilling = seq.prefilling, False
        seq.num_forwards += 1
        seq.num_cached_tokens = block.start + block.num_committed + accepted
        self.block_manager.truncate(seq, seq.num_cached_tokens)
        kept = seq.commit([*seq.drafts[:accepted], token])
        if not is_prefill:
            seq.decode_steps += 1
            seq.decode_tokens += len(kept)
            seq.cold_starts += int(k == 0 and block.num_masks > 0)
            count_acceptance(seq.drafts_verified, seq.drafts_accepted, k, accepted)
        if seq.is_finished:
            return
        if drafts and self.drafter is not None:  # greedy only: an external proposer has no q
            drafts, draft_probs = self.drafter(seq, drafts), None
        seq.drafts, seq.draft_probs, seq.draft_confidence = drafts, draft_probs, confidence
