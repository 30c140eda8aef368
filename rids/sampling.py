"""Sampling parameters and the speculative-sampling rule that keeps R-ISD exact.

Temperature, top-k and top-p are applied identically to the base's distribution p (verify rows)
and the adapter's proposal q (MASK rows). A draft d ~ q is accepted with probability
min(1, p(d) / q(d)); at the first rejection the committed token is drawn from
norm(max(0, p - q)); if every draft passes, the bonus is drawn from p. Committed text then has
exactly the base model's (tempered, truncated) distribution.

All randomness comes from uniforms drawn from the request's own generator, a fixed number per
step, so a seeded request gives the same text alone or inside any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rids.errors import RidsError


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise RidsError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RidsError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RidsError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[rows, vocab] logits -> the distribution a request samples from (fp32)."""
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        probs = nucleus(probs, params.top_p)
    return probs


NUCLEUS_CANDIDATES = 1024  # on a CPU, top_p looks among this many likeliest tokens first


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of likeliest tokens whose mass reaches top_p (the first always
    stays), renormalized. On a CPU a full-vocabulary sort per row dominated sampled steps, so
    the likeliest `NUCLEUS_CANDIDATES` are ranked first, and the whole vocabulary is sorted
    only if some row keeps its last candidate (then its nucleus may reach past them); where
    every row drops it, every later token is dropped too, and the set is the full sort's. A GPU
    sorts fast and must not wait on that check. Ties are ordered as the ranking orders them."""

    def dropped(ranked: torch.Tensor) -> torch.Tensor:
        return ranked.cumsum(-1) - ranked >= top_p  # the mass before a token reaches top_p

    candidates = probs.device.type == "cpu" and probs.shape[-1] > NUCLEUS_CANDIDATES
    if candidates:
        ranked, order = probs.topk(NUCLEUS_CANDIDATES, -1)
    else:
        ranked, order = probs.sort(-1, descending=True)
    drop = dropped(ranked)
    if candidates and not bool(drop[..., -1].all()):  # a nucleus may reach past them
        ranked, order = probs.sort(-1, descending=True)
        drop = dropped(ranked)
    kept = torch.zeros_like(probs).scatter(-1, order, ranked.masked_fill(drop, 0.0))
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw from one row of probabilities with a uniform u in [0, 1) (the reference
    rule, in plain Python: the engine's device rules in `rids.engine.verifier` are tested
    against it)."""
    cdf = probs.double().cumsum(-1)
    return int(
        torch.searchsorted(
            cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device)
        ).clamp(max=probs.shape[-1] - 1)
    )


def speculative_accept(
    drafts: list[int], q: torch.Tensor, p: torch.Tensor, uniforms: list[float]
) -> tuple[int, int]:
    """(drafts accepted, the token committed after them): the reference rule, the definition
    the engine's device rules (`rids.engine.verifier`, `rids.kernels.verify`) are tested
    against.

    q: [k, vocab] proposal rows of the drafts; p: [k + 1, vocab] base rows (last: the bonus);
    uniforms: k + 1 values in [0, 1).
    """
    for i, d in enumerate(drafts):
        if uniforms[i] * float(q[i, d]) >= float(p[i, d]):  # reject w.p. 1 - min(1, p/q)
            residual = (p[i] - q[i]).clamp(min=0)
            row = residual if float(residual.sum()) > 0 else p[i]
            return i, sample(row, uniforms[-1])
    return len(drafts), sample(p[len(drafts)], uniforms[-1])
