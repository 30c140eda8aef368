"""The model runner's three parts on CPU: the step layout and its attention metadata, fixed
(padded) layouts for CUDA graphs, one host copy per greedy step, and device placement."""

from __future__ import annotations

import collections
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rids.config import EngineConfig, ModelConfig
from rids.engine import step_inputs
from rids.engine.model_runner import kv_cache_pages
from rids.engine.sequence import Sequence
from rids.engine.step_block import DraftPlan, StepBlock
from rids.engine.step_inputs import AttentionPlan, Padding, StepEntry, build_step, query_groups
from rids.errors import RidsError
from rids.llm import LLM
from rids.sampling import SamplingParams
from tests.conftest import oracle_drafter


def make_entries(llm: LLM, prompt_ids: list[list[int]], stride: int = 4) -> list[StepEntry]:
    """Three sequences after a prefill: a cold start, a verify step with 1 draft, and one with
    3 drafts and 2 MASKs; their KV (the prompts) is in the cache."""
    mask = llm.mask_token_id
    shapes = [(0, stride - 1), (1, stride - 1), (3, 2)]
    entries = []
    for i, (k, m) in enumerate(shapes):
        seq = Sequence(i, prompt_ids[i], max_new_tokens=16, stride=stride)
        prefill = seq.next_block(mask, DraftPlan(0, 0, ()))
        llm.engine.pages.allocate(seq, prefill.end)
        llm.engine.runner.run([StepEntry(prefill, seq.page_table)])
        seq.num_cached_tokens = seq.num_tokens - 1
        seq.drafts = [7, 19, 33][:k]
        block = seq.next_block(mask, DraftPlan(k, m, (k,)))
        llm.engine.pages.allocate(seq, block.end)
        entries.append(StepEntry(block, seq.page_table))
    return entries


def test_padded_layout_gives_the_real_rows_the_same_logits(tiny_base, tiny_adapter, prompt_ids):
    llm = LLM(tiny_base, tiny_adapter, page_size=4)
    entries = make_entries(llm, prompt_ids)
    runner = llm.engine.runner
    _, plain = runner.run(entries)
    step, padded = runner.run(entries, pad=runner.padding(num_seqs=5, stride=4))
    assert step.inputs.num_tokens == 5 * 7 and step.inputs.num_gated == 5 * 3  # fixed shape
    torch.testing.assert_close(padded.verify, plain.verify, atol=1e-5, rtol=0)
    # MASK rows: the padded layout's include padding rows; the real ones are where it says
    real = torch.cat([padded.masks[r] for r in step.inputs.mask_rows])
    torch.testing.assert_close(real, plain.masks, atol=1e-5, rtol=0)


class PadEveryStep:
    """A CPU stand-in for CUDA graphs: every plain decode step runs in a fixed layout."""

    def __init__(self, runner, sizes=(1, 2, 4, 8), strides=(1, 4)) -> None:
        from rids.engine.cuda_graph import BATCH_SIZES  # noqa: F401 (importable without CUDA)

        self.runner, self.batch_sizes, self.strides = runner, list(sizes), strides
        self.padded = 0

    def padding(self, entries):
        from rids.engine.cuda_graph import CudaGraphs

        pad = CudaGraphs.padding(self, entries)
        self.padded += pad is not None
        return pad

    def replay(self, step):
        step.attn = self.runner.backend.prepare(step.inputs, step.dev)
        return self.runner.forward(step)


@pytest.mark.parametrize("stride", [1, 4])
def test_generation_in_fixed_layouts_is_lossless(
    tiny_base, tiny_adapter, prompt_ids, reference, stride
):
    llm = LLM(tiny_base, tiny_adapter, page_size=4, drafting="fixed", branches="off")
    graphs = llm.engine.runner.graphs = PadEveryStep(llm.engine.runner)
    refs = {tuple(p): r for p, r in zip(prompt_ids, reference, strict=True)}
    llm.engine.drafter = oracle_drafter(refs, lambda seq, i: i == 2)  # partial acceptance
    outs = llm.generate(prompt_ids, max_new_tokens=48, stride=stride)
    assert [o.token_ids for o in outs] == reference
    assert graphs.padded > 10


def paged_reference(plan: AttentionPlan, q, k_cache, v_cache, page_size: int, scale: float):
    """Attention as flashinfer defines it for `plan`: per request, its query rows against its
    pages' first kv_len keys, bottom-right-aligned causal (or the custom mask)."""
    out = torch.zeros_like(q)
    mask_at = 0
    for r in range(len(plan.qo_indptr) - 1):
        q0, q1 = plan.qo_indptr[r], plan.qo_indptr[r + 1]
        pages = plan.kv_indices[plan.kv_indptr[r] : plan.kv_indptr[r + 1]]
        kv_len = (len(pages) - 1) * page_size + plan.kv_last_page_len[r]
        slots = torch.tensor([p * page_size + i for p in pages for i in range(page_size)])[:kv_len]
        n = q1 - q0
        if not n:
            continue
        if plan.custom_mask is None:
            rows = torch.arange(n)[:, None]
            visible = torch.arange(kv_len)[None, :] <= kv_len - n + rows
        else:
            visible = plan.custom_mask[mask_at : mask_at + n * kv_len].view(n, kv_len)
            mask_at += n * kv_len
        keys, values = k_cache[slots], v_cache[slots]  # [kv_len, Hk, D]
        groups = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        scores = torch.einsum("qhd,khd->hqk", q[q0:q1], keys) * scale
        scores = scores.masked_fill(~visible, float("-inf"))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", F.softmax(scores, -1), values)
    return out


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("branches", [False, True])
def test_attention_plan_matches_the_torch_backend(
    tiny_base, tiny_adapter, prompt_ids, branches, grouped, monkeypatch
):
    """The flashinfer-form plan (two requests per sequence over its pages; custom masks only
    for branch blocks) describes exactly what the torch backend computes, in one padded call
    or in one call per query length."""
    monkeypatch.setattr(step_inputs, "GROUP_ROWS", 0 if grouped else 10**6)
    llm = LLM(tiny_base, tiny_adapter, page_size=4)
    entries = make_entries(llm, prompt_ids)
    if branches:  # the last block becomes a tree: branches B_0, B_1, B_3
        e = entries[-1]
        block = StepBlock(
            e.block.token_ids[: e.block.num_clean] + [llm.mask_token_id] * 6,
            e.block.start, 3, 2, (0, 1, 3),
        )  # fmt: skip
        llm.engine.pages.allocate(Sequence(9, [0], max_new_tokens=1, stride=1), 0)
        entries[-1] = StepEntry(block, [*e.page_table, llm.engine.pages.free_page_ids[0]])
    inputs = build_step(entries, 4)
    assert len(inputs.query_groups) == (3 if grouped else 1)
    assert (inputs.attention_plan().custom_mask is not None) == branches
    dev = inputs.to_device(torch.device("cpu"))
    attn = llm.engine.runner.backend.prepare(inputs, dev)
    layer = llm.model.model.layers[0].self_attn.attn
    g = torch.Generator().manual_seed(0)
    t, h, hk, d = inputs.num_tokens, layer.num_heads, layer.num_kv_heads, layer.head_dim
    q, k, v = (torch.randn(t, n, d, generator=g) for n in (h, hk, hk))
    got = attn.attend(layer, q, k, v)  # also writes k, v into the cache
    want = paged_reference(inputs.attention_plan(), q, layer.k_cache, layer.v_cache, 4, layer.scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_query_groups_split_where_padding_costs_more_than_a_call():
    """A batch of 1-token steps with one 7-token block: the long block attends apart (else 15
    sequences would each pad 6 rows); lengths close together share a call; equal lengths
    always do; groups come shortest first, each in batch order."""
    assert query_groups([1] * 16) == [list(range(16))]
    assert query_groups([7] + [1] * 15) == [list(range(1, 16)), [0]]
    assert query_groups([3, 1, 2, 1]) == [[0, 1, 2, 3]]  # 3 padded rows < a call
    assert query_groups([1, 7, 1, 7, 2]) == [[0, 2, 4], [1, 3]]
    assert query_groups([5]) == [[0]]


class Syncs(TorchDispatchMode):
    """Counts op dispatches and the ops that make a device wait for the host's eyes: a scalar
    read (.item(), int(), bool()) or an op whose output size depends on the data."""

    DATA_DEPENDENT = ("nonzero", "masked_select", "unique", "_local_scalar_dense")

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(n for op, n in self.ops.items() if any(d in op for d in self.DATA_DEPENDENT))


@pytest.mark.parametrize("branches", ["off", "all"])
def test_one_host_copy_per_greedy_step(tiny_base, tiny_adapter, prompt_ids, monkeypatch, branches):
    """Every greedy decode step (R-ISD, MASK branches, the drafting policy) copies one tensor
    to the host and reads no device scalar: all step metadata goes up in one packed copy."""
    llm = LLM(tiny_base, tiny_adapter, branches=branches)
    seqs = [llm.make_sequence(p, max_new_tokens=40, stride=4) for p in prompt_ids[:3]]
    for seq in seqs:
        llm.engine.add(seq)
    llm.engine.step()  # the prefill
    copies = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: copies.append(t.shape) or tolist(t))
    made = []  # host tensors made during a step: what can go up to the device
    tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(1) or tensor(*a, **k))
    with Syncs() as mode:
        for _ in range(4):
            llm.engine.step()
    assert len(copies) == 4, copies  # one device-to-host copy a step
    assert mode.syncs == 0, [op for op in mode.ops if any(d in op for d in Syncs.DATA_DEPENDENT)]
    assert len(made) == 4  # the packed metadata: one host tensor, one copy up, a step


def test_sampled_steps_read_no_device_scalar(tiny_base, tiny_adapter, prompt_ids):
    """Sampling (speculative acceptance, the residual draw, the next drafts from q) also stays
    on the device until the step's one copy."""
    llm = LLM(tiny_base, tiny_adapter, branches="all")
    for p in prompt_ids[:3]:
        llm.engine.add(llm.make_sequence(p, max_new_tokens=40, stride=4,
                                         sampling=SamplingParams(0.8, 20, 0.9, None)))  # fmt: skip
    llm.engine.step()
    with Syncs() as mode:
        for _ in range(4):
            llm.engine.step()
    assert mode.syncs == 0, [op for op in mode.ops if any(d in op for d in Syncs.DATA_DEPENDENT)]


def test_dispatches_per_decode_step_grow_only_with_layers(tiny_factory, tmp_path):
    """Op dispatches of one R-ISD decode step: about a hundred per layer, nothing per token."""
    from rids.tiny import build_random_adapter

    counts = {}
    for layers in (2, 4):
        base = tiny_factory(num_layers=layers)
        adapter = build_random_adapter(tmp_path / f"a{layers}", base, rank=4)
        llm = LLM(base, adapter, branches="off", drafting="fixed")  # the same step, any timings
        seq = llm.make_sequence([5, 6, 7, 8], max_new_tokens=20, stride=4)
        llm.engine.add(seq)
        llm.engine.step()
        llm.engine.step()
        with Syncs() as mode:
            llm.engine.step()
        counts[layers] = sum(mode.ops.values())
    per_layer = (counts[4] - counts[2]) / 2
    assert per_layer <= 100 and counts[2] - 2 * per_layer <= 150, counts


def test_rope_tables_follow_the_model_device():
    """Scaled RoPE types (llama3) are built by transformers on the CPU: they must land on the
    model's device, or the first CUDA forward fails (checked here on the meta device)."""
    from rids.models.qwen3 import Qwen3ForCausalLM
    from rids.tiny import build_tokenizer  # noqa: F401

    raw = dict(
        model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        max_position_embeddings=256, rope_theta=10000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64),
    )  # fmt: skip
    with torch.device("meta"):
        model = Qwen3ForCausalLM(ModelConfig.from_dict(raw))
    assert {b.device.type for b in model.buffers()} == {"meta"}


def test_kv_cache_size():
    cfg = ModelConfig.from_dict(
        dict(model_type="qwen3", vocab_size=64, hidden_size=64, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
             max_position_embeddings=4096)
    )  # fmt: skip
    per_token = 2 * 2 * 1 * 32 * 4  # K and V, 2 layers, 1 head of 32, fp32
    assert kv_cache_pages(cfg, EngineConfig(kv_cache_tokens=160), None) == 10
    assert (
        kv_cache_pages(cfg, EngineConfig(kv_cache_gib=1 / 1024), None) == 2**20 // per_token // 16
    )
    gpu = EngineConfig(memory_fraction=0.5, max_batch_size=1)
    assert kv_cache_pages(cfg, gpu, free_bytes=per_token * 3200) == 1600 // 16
    full = kv_cache_pages(cfg, gpu, free_bytes=10**12)  # capped: one full-context request
    assert full == (4096 + 64) // 16
    assert kv_cache_pages(cfg, EngineConfig(), None) * 16 * per_token <= 2**30  # CPU: 1 GiB


def test_gpu_parts_stay_unimported_on_cpu(tiny_base, tiny_adapter):
    code = (
        f"import sys; from rids.llm import LLM; LLM({str(tiny_base)!r}, {str(tiny_adapter)!r})"
        "; print(sorted(m for m in ('flashinfer', 'rids.engine.cuda_graph',"
        " 'rids.layers.flashinfer_attention') if m in sys.modules))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:]
    with pytest.raises(RidsError, match="runs on CUDA only"):
        LLM(tiny_base, tiny_adapter, attention_backend="flashinfer")
    with pytest.raises(RidsError, match="cuda_graphs=on needs a CUDA device"):
        LLM(tiny_base, tiny_adapter, cuda_graphs="on")
    with pytest.raises(RidsError, match="attention_backend must be"):
        EngineConfig(attention_backend="fast")


def test_padding_shape():
    pad = Padding(num_seqs=2, stride=3, scratch_slot=400)
    block = StepBlock([5, 6, 1, 1], start=8, num_drafts=1, masks_per_branch=2, branches=(1,))
    inputs = build_step([StepEntry(block, [0, 1, 2])], 4, pad)
    assert inputs.num_tokens == 2 * 5 and inputs.num_gated == 4
    slots = inputs.packed.to(torch.device("cpu"))["slots"].tolist()
    assert slots.count(400) == 10 - 4  # every padding row writes to the scratch slot
