"""The draft head: each MASK draft chosen knowing the token before it.

A MASK row proposes x_{s+2} in the forward that computes x_{s+1}, so its distribution mixes the
continuations of every x_{s+1} the base might write. Once verification knows x_{s+1}, the head
moves the row's final hidden state h by a small MLP of h and that token's embedding e,

    h' = h + W2 silu(W1 [rms(h) g_h; rms(e) g_e] + b1) + b2

and the draft is the likeliest of the row's TOP_K tokens under h' and the base's LM head. The
next row is conditioned on the draft just chosen, and so on, left to right (EAGLE's feature and
token, on top of a MASK row). W2 and b2 start at zero: an untrained head keeps each row's
argmax (where the adapter leaves the LM head alone, as rids' adapters do). It runs on the
device inside verification, batched over the sequences, for greedy requests only (a sampled
draft must be drawn from the q it is verified against); only the proposals change,
verification decides what is committed.

Stored beside the adapter (`draft_head.safetensors`, trained by `rids train-draft-head` on the
adapter's own MASK rows over the base's answers, `rids.train.draft_head`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rids.errors import RidsError
from rids.utils.io import atomic_path

FILENAME = "draft_head.safetensors"
INNER = 512  # width of the MLP (the one setting tried: docs/training.md)
EPS = 1e-6


class DraftHead(nn.Module):
    def __init__(self, hidden_size: int, inner: int = INNER) -> None:
        super().__init__()
        self.norm_hidden = nn.RMSNorm(hidden_size, eps=EPS)
        self.norm_token = nn.RMSNorm(hidden_size, eps=EPS)
        self.up = nn.Linear(2 * hidden_size, inner)
        self.down = nn.Linear(inner, hidden_size)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        # the base's token embedding and LM head (set by `bind`; not the head's parameters)
        self.embed: torch.Tensor | None = None
        self.unembed: torch.Tensor | None = None

    def bind(self, embed: torch.Tensor, unembed: torch.Tensor) -> DraftHead:
        """Read token embeddings from `embed` [vocab, hidden] and score with `unembed` (the
        base's own tensors, read only: not parameters of the head)."""
        self.embed, self.unembed = embed.detach(), unembed.detach()
        return self

    def forward(self, hidden: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        """h' for MASK rows' final hidden states [.., hidden] and the tokens before their
        drafts [..]."""
        assert self.embed is not None
        e = self.embed[before].to(hidden.dtype)
        x = torch.cat([self.norm_hidden(hidden), self.norm_token(e)], -1)
        return hidden + self.down(F.silu(self.up(x)))

    def scores(
        self, hidden: torch.Tensor, before: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """Logits [.., K] of each row's `candidates` [.., K] under h'."""
        assert self.unembed is not None
        moved = self(hidden, before)
        weights = self.unembed[candidates].to(moved.dtype)
        return (weights @ moved[..., None])[..., 0]

    @torch.no_grad()
    def choose(
        self, hidden: torch.Tensor, token: torch.Tensor, candidates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The drafts [S, M] of S sequences' M MASK rows (final hidden states [S, M, hidden],
        likeliest tokens [S, M, K]), left to right after each one's `token` [S], and the first
        draft's runner-up [S]."""
        drafts, before, second = [], token, token
        for m in range(candidates.shape[1]):
            scores = self.scores(hidden[:, m], before, candidates[:, m])
            best = scores.topk(min(2, scores.shape[-1]), -1).indices
            picked = candidates[:, m].gather(1, best)
            if m == 0:
                second = picked[:, -1]
            drafts.append(picked[:, 0])
            before = picked[:, 0]
        return torch.stack(drafts, 1), second

    def save(self, path: Path) -> Path:
        """Its parameters in bfloat16 (a draft needs no more precision), written atomically."""
        tensors = {
            k: v.detach().to(torch.bfloat16).contiguous() for k, v in self.state_dict().items()
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp)
        return path

    @classmethod
    def load(cls, path: Path, hidden_size: int) -> DraftHead:
        """A head saved by `save`, checked against the base's hidden size."""
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise unusable(path, f"is corrupt ({e})") from None
        up = tensors.get("up.weight")
        if up is None or up.ndim != 2:
            raise unusable(path, "is corrupt (not a draft head)")
        if up.shape[1] != 2 * hidden_size:
            trained = up.shape[1] // 2
            raise unusable(
                path, f"was trained for hidden size {trained}, the base has {hidden_size}"
            )
        head = cls(hidden_size, up.shape[0])
        try:
            head.load_state_dict({k: v.float() for k, v in tensors.items()})
        except RuntimeError:
            raise unusable(path, "is corrupt (wrong tensors)") from None
        return head.requires_grad_(False)


def unusable(path: Path, why: str) -> RidsError:
    return RidsError(f"{path} {why}; retrain it with `rids train-draft-head` or delete it")
