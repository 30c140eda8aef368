"""Triton gated-LoRA kernels against the PyTorch reference.

Without CUDA they run in Triton's interpreter (`TRITON_INTERPRET=1`, fp32, small shapes); on a
GPU the same tests run natively, also in bf16 and fp16 (tolerances below).
"""

from __future__ import annotations

import pytest
import torch

from rids.errors import RidsError
from rids.kernels import lora_kernel
from rids.llm import LLM

pytest.importorskip("triton")  # conftest.py runs it in its interpreter without CUDA
from rids.kernels.lora import gated_lora_, rank_ranges

CUDA = torch.cuda.is_available()

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}  # relative to max


def pytorch_lora(y, x, A, B, g):
    out = y.clone().float()
    out[-g:] += (x[-g:].float() @ A.float().T) @ B.float().T
    return out.to(y.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("sizes", "ranks", "tokens", "gated", "k"),
    [
        ([48, 16, 16], [8, 8, 8], 10, 4, 40),  # fused q/k/v, 4 MASK rows at the tail
        ([100], [16], 7, 7, 33),  # every row gated, odd sizes
        ([64, 64], [8, 0], 5, 3, 64),  # a shard without LoRA
        ([130, 70], [5, 12], 20, 17, 50),  # shards that split a column tile
        ([64], [128], 9, 3, 96),  # rank 128, like the reference adapter
    ],
)
def test_gated_lora_matches_pytorch(sizes, ranks, tokens, gated, k, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, k, generator=g).to(DEVICE, dtype)
    y = torch.randn(tokens, sum(sizes), generator=g).to(DEVICE, dtype)
    A = (torch.randn(sum(ranks), k, generator=g) / k**0.5).to(DEVICE, dtype)
    B = torch.block_diag(
        *[torch.randn(s, r, generator=g) for s, r in zip(sizes, ranks, strict=True)]
    )
    B = B.to(DEVICE, dtype).contiguous()
    ranges = torch.tensor(rank_ranges(sizes, ranks), dtype=torch.int32, device=DEVICE)
    want = pytorch_lora(y, x, A, B, gated)
    got = gated_lora_(y.clone(), x, A, B, gated, ranges)
    assert torch.equal(got[:-gated], y[:-gated])  # clean rows: untouched, bit for bit
    scale = want.float().abs().max()
    assert (got.float() - want.float()).abs().max() <= TOLERANCE[dtype] * scale


def test_rank_ranges_skip_the_zero_blocks():
    # q 128 cols (rank 8), k 64 (rank 0), v 64 (rank 4); tiles of 64 columns
    assert rank_ranges([128, 64, 64], [8, 0, 4]) == [0, 8, 0, 8, 0, 0, 8, 12]  # k: no work


def test_engine_with_triton_kernels_is_lossless(tiny_base, tiny_adapter, prompt_ids, reference):
    llm = LLM(tiny_base, tiny_adapter, kernels="triton", device=DEVICE)
    layers = [m for m in llm.model.modules() if getattr(m, "lora_kernel", None) is not None]
    assert layers  # the kernel is installed on every gated linear
    outs = llm.generate(prompt_ids[:3], max_new_tokens=12, stride=4)
    assert [o.token_ids for o in outs] == [r[:12] for r in reference[:3]]


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RidsError, match="TRITON_INTERPRET"):
        lora_kernel("triton", torch.device("cpu"))
    assert lora_kernel("auto", torch.device("cpu")) is None
    assert lora_kernel("torch", torch.device("cpu")) is None


def batch_case(seed: int, vocab: int = 300):
    """Random verify rows and drafts for 5 sequences with 0..4 drafts."""
    g = torch.Generator().manual_seed(seed)
    ks = [3, 0, 4, 1, 2]
    logits = torch.randn(sum(k + 1 for k in ks), vocab, generator=g) * 3
    drafts = []
    row = 0
    for k in ks:  # drafts mostly equal to the argmax, so acceptance varies
        best = logits[row : row + k].argmax(-1)
        noise = torch.randint(vocab, (k,), generator=g)
        keep = torch.rand(k, generator=g) < 0.7
        drafts.append(torch.where(keep, best, noise).tolist())
        row += k + 1
    return logits, drafts, g


def layout(drafts: list[list[int]]) -> tuple[torch.Tensor, ...]:
    """Device tensors as the engine packs them: each sequence's first verify row, its draft
    count, its drafts padded with -1, and its first q row."""
    width = max(max(len(d) for d in drafts), 1)
    starts, q_starts, row, qrow = [], [], 0, 0
    for d in drafts:
        starts.append(row)
        q_starts.append(qrow)
        row, qrow = row + len(d) + 1, qrow + len(d)
    padded = [d + [-1] * (width - len(d)) for d in drafts]
    return tuple(
        torch.tensor(x, dtype=torch.long, device=DEVICE)
        for x in (starts, [len(d) for d in drafts], padded, q_starts)
    )


def accept_greedy(drafts: list[int], targets: list[int]) -> int:
    n = 0
    while n < len(drafts) and drafts[n] == targets[n]:
        n += 1
    return n


@pytest.mark.parametrize("seed", range(4))
def test_greedy_verify_matches_the_rule(seed):
    """The Triton kernel and the PyTorch rule both give the longest prefix of drafts equal to
    the argmax, and the argmax after it (the first maximum, as torch.argmax)."""
    from rids.engine.verifier import TorchRule
    from rids.kernels.verify import greedy_verify

    logits, drafts, _ = batch_case(seed)
    logits[0, 5] = logits[0, 9] = logits[0].max() + 1  # a tie: the first maximum wins
    start, num, padded, _ = layout(drafts)
    want, row = ([], []), 0
    for d in drafts:
        targets = logits[row : row + len(d) + 1].argmax(-1).tolist()
        n = accept_greedy(d, targets)
        want[0].append(n)
        want[1].append(targets[n])
        row += len(d) + 1
    for rule in (greedy_verify, TorchRule.greedy):
        accepted, token = rule(logits.to(DEVICE), start, num, padded)
        assert (accepted.tolist(), token.tolist()) == want


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("params", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_sampled_verify_matches_speculative_accept(seed, params):
    """The Triton kernel (the whole batch) and the PyTorch rule (per sequence) against the
    reference rule of `rids.sampling`."""
    from rids.engine.verifier import TorchRule
    from rids.kernels.verify import sampled_verify
    from rids.sampling import SamplingParams, probabilities, speculative_accept

    logits, drafts, g = batch_case(seed)
    sp = SamplingParams(*params)
    p = probabilities(logits, sp)
    q = probabilities(logits[: sum(len(d) for d in drafts)] + torch.randn(1, 300, generator=g), sp)
    uniforms = [torch.rand(len(d) + 1, generator=g, dtype=torch.float64).tolist() for d in drafts]
    want, row, qrow = ([], []), 0, 0
    for d, u in zip(drafts, uniforms, strict=True):
        k = len(d)
        n, t = speculative_accept(d, q[qrow : qrow + k], p[row : row + k + 1], u)
        assert TorchRule.sampled(
            p[row : row + k + 1].to(DEVICE), q[qrow : qrow + k].to(DEVICE),
            torch.tensor(d, dtype=torch.long, device=DEVICE),
            torch.tensor(u, dtype=torch.float64, device=DEVICE),
        ) == (n, t)  # fmt: skip
        want[0].append(n)
        want[1].append(t)
        row, qrow = row + k + 1, qrow + k
    start, num, padded, q_start = layout(drafts)
    width = padded.shape[1]
    u = torch.zeros(len(drafts), width + 1, dtype=torch.float64)
    for b, us in enumerate(uniforms):
        u[b, : len(us) - 1] = torch.tensor(us[:-1], dtype=torch.float64)
        u[b, width] = us[-1]
    accepted, token = sampled_verify(
        p.to(DEVICE), q.to(DEVICE), start, q_start, num, padded, u.to(DEVICE)
    )
    assert (accepted.tolist(), token.tolist()) == want


def test_sampled_engine_with_triton_kernels_matches_pytorch(tiny_base, tiny_adapter, prompt_ids):
    """Seeded sampling through the fused verification = through the PyTorch rule."""
    kw = dict(max_new_tokens=10, stride=3, temperature=0.8, top_k=30, seed=5)
    fused = LLM(tiny_base, tiny_adapter, kernels="triton").generate(prompt_ids[:3], **kw)
    plain = LLM(tiny_base, tiny_adapter, kernels="torch").generate(prompt_ids[:3], **kw)
    assert [o.token_ids for o in fused] == [o.token_ids for o in plain]
