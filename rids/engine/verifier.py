"""Verification on the device: what each sequence commits, and its next drafts, in one copy.

Greedy: the longest draft prefix equal to the base's argmax, then the base's own token there
(the correction, or the bonus when every draft passed); where the first draft fails and the
block has a sibling path whose first token is the base's, the longest prefix of that path
instead, and the base's token after it. Sampled: speculative sampling against
the drafts' proposal distributions (`rids.sampling`). The next drafts come from the MASK rows of
the branch B_j that matches what was accepted (j drafts), if the block has it; otherwise the
next step starts cold (so it does after a sibling path won); with a draft head
(`rids.engine.draft_head`) each is chosen here among its row's likeliest tokens, knowing the
token before it (but for the sequences that the drafting policy no longer trusts it for: the
argmax), and both first drafts are given to the host. The first MASK row's second choice is
the next step's sibling draft. Two rules compute acceptance behind one interface: PyTorch (any
device) and Triton (`rids.kernels.verify`: one program per sequence). Everything stays on the
device until one packed tensor, [accepted, sibling, token, second, head's and argmax's first
drafts, drafts...] per sequence, is copied to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from rids.engine.draft_head import DraftHead
from rids.engine.sequence import Sequence
from rids.engine.step_block import StepBlock
from rids.engine.step_inputs import StepInputs
from rids.sampling import probabilities


@dataclass(slots=True)
class StepLogits:
    """Logits of one forward: `verify` rows (each block's last committed token and drafts, in
    batch order, then each sibling path's rows) and `masks` rows (every MASK row, in batch
    order)."""

    verify: torch.Tensor  # [sum num_verify + sibling rows, vocab]
    masks: torch.Tensor  # [sum num_masks, vocab]
    mask_hidden: torch.Tensor  # [sum num_masks, hidden]: their final hidden states


@dataclass(slots=True)
class Verdict:
    """What a sequence's step decided (host values) and, for sampling, its drafts' q rows."""

    accepted: int  # drafts of the main path
    token: int
    drafts: list[int]
    draft_probs: torch.Tensor | None = None  # [len(drafts), vocab] on the device
    sibling: int = 0  # tokens of the sibling path accepted instead (then accepted is 0)
    second: int | None = None  # the first next draft's runner-up (greedy MASK drafts)
    # greedy MASK drafts, when asked: each row's likeliest tokens and their log-probabilities
    candidates: list[list[int]] | None = None
    candidate_log_probs: list[list[float]] | None = None
    first_choices: tuple[int, int] | None = None  # a head chose: its first draft, the argmax


class TorchRule:
    """Acceptance in PyTorch ops (any device)."""

    @staticmethod
    def greedy(
        verify: torch.Tensor, start: torch.Tensor, num_drafts: torch.Tensor, drafts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        targets = verify.argmax(-1)  # [rows]
        width = drafts.shape[1]
        steps = torch.arange(width + 1, device=verify.device)
        rows = (start[:, None] + steps).clamp(max=max(targets.shape[0] - 1, 0))
        t = targets[rows]  # [S, width + 1]
        match = (t[:, :width] == drafts) & (steps[:width] < num_drafts[:, None])
        accepted = match.long().cumprod(1).sum(1)
        return accepted, t.gather(1, accepted[:, None])[:, 0]

    @staticmethod
    def sampled(
        p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence: p [k + 1, V], q [k, V], drafts [k], u [k + 1] (fp64; the last draws
        the token). Draft i passes unless u_i q(d_i) >= p(d_i); the token comes from
        norm(max(0, p - q)) at the first rejection, else from p (the bonus)."""
        k = drafts.shape[0]
        if k:
            idx = torch.arange(k, device=p.device)
            reject = u[:k] * q[idx, drafts].double() >= p[idx, drafts].double()
            accepted = (~reject).long().cumprod(0).sum()
        else:
            accepted = torch.zeros((), dtype=torch.long, device=p.device)
        row = p.index_select(0, accepted[None])[0]
        if k:
            rejected = accepted < k
            q_row = q.index_select(0, accepted.clamp(max=k - 1)[None])[0]
            residual = (row - q_row).clamp(min=0)
            use = rejected & (residual.sum() > 0)
            row = torch.where(use, residual, row)
        return accepted, inverse_cdf(row[None], u[-1:])[0]


class TritonRule:
    """Acceptance in the Triton kernels of `rids.kernels.verify` (one program per sequence)."""

    def __init__(self, kernels: ModuleType) -> None:
        self.kernels = kernels

    def greedy(self, verify, start, num_drafts, drafts):
        return self.kernels.greedy_verify(verify, start, num_drafts, drafts)

    def sampled(self, p, q, drafts, u):
        k = drafts.shape[0]
        device = p.device
        zero = torch.zeros(1, dtype=torch.long, device=device)
        num = torch.full((1,), k, dtype=torch.long, device=device)
        width = max(k, 1)
        padded = torch.full((1, width), -1, dtype=torch.long, device=device)
        padded[0, :k] = drafts
        us = torch.zeros(1, width + 1, dtype=torch.float64, device=device)
        us[0, :k], us[0, width] = u[:k], u[-1]
        q = q if k else p[:1]  # no drafts: q is never read
        accepted, token = self.kernels.sampled_verify(p, q, zero, zero, num, padded, us)
        return accepted[0], token[0]


def inverse_cdf(rows: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One draw per row of (unnormalized) probabilities, with uniforms u [rows] (fp64)."""
    cdf = rows.double().cumsum(-1)
    target = (u * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target)[:, 0].clamp(max=rows.shape[-1] - 1)


@dataclass(slots=True)
class SampledStep:
    """A sampled sequence's results on the device."""

    accepted: torch.Tensor  # []
    token: torch.Tensor  # []
    drafts: torch.Tensor  # [m] drawn from the rows of the branch that matches
    q_rows: torch.Tensor  # [m, vocab]: their proposal distributions (the next step's q)


class Verifier:
    def __init__(self, kernels: ModuleType | None = None) -> None:
        self.rule = TorchRule() if kernels is None else TritonRule(kernels)

    def verify(
        self,
        blocks: list[StepBlock],
        inputs: StepInputs,
        dev: dict[str, torch.Tensor],
        logits: StepLogits,
        sampled: dict[int, tuple[Sequence, list[float]]],
        runner_ups: bool = False,
        num_candidates: int = 0,
        head: DraftHead | None = None,
        argmax_blocks: list[int] | None = None,
    ) -> list[Verdict]:
        """Per block (a prefill chunk's verdict is ignored); `dev`: the step's metadata on the
        device; `sampled`: by block index, each sampled sequence and its 2N-1 uniforms;
        `runner_ups`: find each first next draft's runner-up (for sibling paths);
        `num_candidates`: each greedy next draft's row's likeliest tokens, this many: chosen
        among here by `head` (but for `argmax_blocks`: the argmax; the verdicts carry both
        first drafts), else given to the host."""
        if not logits.verify.shape[0]:  # prefill chunks only: nothing to verify
            return [Verdict(0, 0, []) for _ in blocks]
        device = logits.verify.device
        drafts, branch_of = dev["drafts"], dev["branch_of"]
        masks_per_branch = dev["masks_per_branch"]
        if inputs.has_siblings:  # both paths in one call; the sibling's wins where d_1 failed
            n = drafts.shape[0]
            both_accepted, both_token = self.rule.greedy(
                logits.verify,
                torch.cat([dev["verify_start"], dev["sibling_start"]]),
                torch.cat([dev["num_drafts"], dev["num_sibling"]]),
                torch.cat([drafts, dev["sibling"]]),
            )
            accepted, token = both_accepted[:n], both_token[:n]
            sibling = torch.where(accepted == 0, both_accepted[n:], 0)
            token = torch.where(sibling > 0, both_token[n:], token)
        else:
            accepted, token = self.rule.greedy(
                logits.verify, dev["verify_start"], dev["num_drafts"], drafts
            )
            sibling = torch.zeros_like(accepted)
        draws = {
            i: self.sample(seq, blocks[i], inputs, logits, i, drafts[i], u, branch_of[i])
            for i, (seq, u) in sampled.items()
        }
        for i, d in draws.items():  # sampled blocks carry no sibling path
            accepted[i], token[i], sibling[i] = d.accepted, d.token, 0
        # the next drafts: the MASK rows of branch B_accepted, when the block has it (none
        # after a sibling path: no branch follows it)
        branch = branch_of.gather(1, accepted[:, None])[:, 0]
        steps = torch.arange(inputs.max_masks, device=device)
        valid = (
            (branch[:, None] >= 0) & (sibling[:, None] == 0) & (steps < masks_per_branch[:, None])
        )
        num_rows = logits.masks.shape[0]
        num_candidates = min(num_candidates, logits.masks.shape[1]) if num_rows else 0
        if num_rows:
            first = dev["mask_start"] + branch.clamp(min=0) * masks_per_branch
            rows = (first[:, None] + steps).clamp(max=num_rows - 1)
        choices = None  # the head's and the argmax's first drafts, where a head chooses
        if num_candidates:  # on the rows that propose only (a branch's, where the block has one)
            picked = logits.masks.index_select(0, rows.flatten())
            top = picked.topk(max(num_candidates, 2), -1)
            top_ids = top.indices.view(*rows.shape, -1)  # [S, M, K]
            if head is None:
                log_probs = top.values.float() - picked.float().logsumexp(-1, keepdim=True)
                log_probs = log_probs.view(*rows.shape, -1)
                proposals, best_two = top_ids[..., 0], top_ids[:, 0, :2]
            else:  # chosen now, knowing the token just committed: nothing more to the host
                hidden = logits.mask_hidden.index_select(0, rows.flatten())
                proposals, runner_up = head.choose(
                    hidden.view(*rows.shape, -1), token, top_ids[..., :num_candidates]
                )
                choices = torch.stack([proposals[:, 0], top_ids[:, 0, 0]], 1)
                if argmax_blocks:
                    keep = torch.ones(len(blocks), dtype=torch.bool)
                    keep[argmax_blocks] = False
                    trusted = keep.to(device, non_blocking=True)
                    proposals = torch.where(trusted[:, None], proposals, top_ids[..., 0])
                    runner_up = torch.where(trusted, runner_up, top_ids[:, 0, 1])
                best_two = torch.stack([proposals[:, 0], runner_up], 1)
                num_candidates = 0
        elif num_rows:
            proposals = logits.masks.argmax(-1)[rows]
            if runner_ups:
                best_two = logits.masks.index_select(0, rows[:, 0]).topk(2, -1).indices
        else:
            proposals = torch.zeros_like(valid, dtype=torch.long)
        if runner_ups and num_rows:
            # the runner-up of the first draft (the first of the two that is not the argmax)
            second = torch.where(best_two[:, 0] == proposals[:, 0], best_two[:, 1], best_two[:, 0])
        else:
            second = torch.full_like(accepted, -1)
        for i, d in draws.items():
            proposals[i, : d.drafts.shape[0]] = d.drafts
        proposals = torch.where(valid, proposals, -1)
        second = torch.where(valid[:, 0], second, -1)
        if choices is None:
            choices = torch.full((accepted.shape[0], 2), -1, device=device)
        else:
            choices = torch.where(valid[:, :1], choices, -1)
        parts = [torch.stack([accepted, sibling, token, second], 1), choices, proposals]
        if num_candidates:
            parts.append(top_ids[..., :num_candidates].flatten(1))
            scores = log_probs[..., :num_candidates].tolist()
        packed = torch.cat(parts, 1).tolist()
        verdicts = []
        for i, (a, s, t, r, chosen, argmax, *rest) in enumerate(packed):
            new = [x for x in rest[: proposals.shape[1]] if x >= 0]
            if i in draws:
                verdicts.append(Verdict(a, t, new, draws[i].q_rows if new else None))
                continue
            verdict = Verdict(a, t, new, None, s, r if r >= 0 else None)
            if chosen >= 0:
                verdict.first_choices = (chosen, argmax)
            if num_candidates and new:
                ids, k = rest[proposals.shape[1] :], num_candidates
                verdict.candidates = [ids[j * k : (j + 1) * k] for j in range(len(new))]
                verdict.candidate_log_probs = scores[i][: len(new)]
            verdicts.append(verdict)
        return verdicts

    def sample(
        self,
        seq: Sequence,
        block: StepBlock,
        inputs: StepInputs,
        logits: StepLogits,
        i: int,
        drafts: torch.Tensor,
        u: list[float],
        branch_of: torch.Tensor,
    ) -> SampledStep:
        """Speculative sampling for one sequence, then its next drafts drawn from q."""
        n, k = seq.stride, block.num_drafts
        device = logits.verify.device
        u_dev = torch.tensor(u, dtype=torch.float64).to(device, non_blocking=True)
        start = inputs.verify_rows[i].start
        p = probabilities(logits.verify[start : start + k + 1], seq.sampling)
        q = seq.draft_probs[:k] if k else p[:0]
        accepted, token = self.rule.sampled(
            p, q, drafts[:k], torch.cat([u_dev[:k], u_dev[n - 1 : n]])
        )
        m = block.masks_per_branch
        if not m:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return SampledStep(accepted, token, empty, p[:0])
        # index_select, not [accepted]: indexing with a 0-dim tensor reads it on the host
        branch = branch_of.index_select(0, accepted[None])[0]
        first = inputs.mask_rows[i].start + branch.clamp(min=0) * m
        rows = first + torch.arange(m, device=device)
        q_rows = probabilities(logits.masks.index_select(0, rows), seq.sampling)
        return SampledStep(accepted, token, inverse_cdf(q_rows, u_dev[n : n + m]), q_rows)
