"""Runs the model on a batch of step blocks: owns the KV cache and builds the flat inputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rids.config import MAX_STRIDE, EngineConfig, ModelConfig
from rids.engine.block_manager import BlockManager
from rids.engine.branches import CostModel
from rids.engine.sequence import Sequence, StepBlock
from rids.kernels import lora_kernel
from rids.layers.attention import Attention, AttentionSeq, get_backend
from rids.layers.linear import GatedLinear
from rids.models.qwen3 import Qwen3ForCausalLM
from rids.utils.context import Context, reset_context, set_context
from rids.utils.timing import median_seconds


@dataclass(slots=True)
class StepLogits:
    """Per block, in batch order: `num_verify` rows of base logits, then (separately) its MASKs'."""

    verify: torch.Tensor  # [sum num_verify, vocab]
    masks: torch.Tensor  # [sum num_masks, vocab]


def kv_cache_pages(model: ModelConfig, engine: EngineConfig) -> int:
    """Pages for `kv_cache_tokens`, else for `kv_cache_gib`, capped at what a full batch of
    full-context requests can use."""
    tokens = engine.kv_cache_tokens
    if tokens is None:
        itemsize = torch.empty(0, dtype=engine.dtype).element_size()
        per_token = 2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim
        budget = int(engine.kv_cache_gib * 2**30) // (per_token * itemsize)
        usable = engine.max_batch_size * (model.max_position_embeddings + 2 * MAX_STRIDE)
        tokens = min(budget, usable)
    return max(tokens // engine.page_size, 1)


class ModelRunner:
    def __init__(
        self,
        model: Qwen3ForCausalLM,
        config: EngineConfig,
        num_pages: int,
        gate_all: bool = False,
    ) -> None:
        self.model = model
        self.device = torch.device(config.device)
        self.page_size = config.page_size
        self.backend = get_backend(config.attention_backend)
        self.gate_all = gate_all  # diagnostic: LoRA on every token (ungated, NOT lossless)
        mc = model.config
        self.kv_cache = torch.empty(
            2,
            mc.num_hidden_layers,
            num_pages * config.page_size,
            mc.num_key_value_heads,
            mc.head_dim,
            dtype=config.dtype,
            device=self.device,
        )
        for attn in (m for m in model.modules() if isinstance(m, Attention)):
            attn.k_cache = self.kv_cache[0, attn.layer_id]
            attn.v_cache = self.kv_cache[1, attn.layer_id]
        kernel = lora_kernel(config.kernels, self.device)
        for layer in (m for m in model.modules() if isinstance(m, GatedLinear)):
            layer.lora_kernel = kernel

    @torch.inference_mode()
    def run(
        self, seqs: list[Sequence], blocks: list[StepBlock], block_manager: BlockManager
    ) -> StepLogits:
        """One forward over the blocks, laid out flat as [every clean token | every MASK]."""
        num_clean = sum(b.num_clean for b in blocks)
        num_masks = sum(b.num_masks for b in blocks)
        num_tokens = num_clean + num_masks
        input_ids, positions, slots = [0] * num_tokens, [0] * num_tokens, [0] * num_tokens
        verify_rows: list[int] = []
        attn_seqs = []
        clean_at, mask_at = 0, num_clean
        for seq, b in zip(seqs, blocks, strict=True):
            # where each block token lands in the flat batch (its MASKs go to the tail)
            index = [
                *range(clean_at, clean_at + b.num_clean),
                *range(mask_at, mask_at + b.num_masks),
            ]
            for dst, token, pos, i in zip(
                index, b.token_ids, b.positions, range(b.start, b.end), strict=True
            ):
                input_ids[dst], positions[dst] = token, pos
                slots[dst] = block_manager.slot(seq, i)  # KV slots follow block order
            verify_rows += range(clean_at + b.num_clean - b.num_verify, clean_at + b.num_clean)
            attn_seqs.append(AttentionSeq(index, seq.block_table, b.start, b.attention_mask()))
            clean_at += b.num_clean
            mask_at += b.num_masks
        gated, logits_gated = num_masks, num_masks
        if self.gate_all:
            gated, logits_gated = num_tokens, len(verify_rows) + num_masks

        def to_device(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True)

        attn = self.backend.prepare(attn_seqs, to_device(slots), self.page_size, self.device)
        set_context(Context(num_gated=gated, attn=attn))
        try:
            hidden = self.model(to_device(input_ids), to_device(positions))
            rows = torch.cat([hidden[to_device(verify_rows)], hidden[num_clean:]])
            logits = self.model.compute_logits(rows, logits_gated)
        finally:
            reset_context()
        return StepLogits(logits[: len(verify_rows)], logits[len(verify_rows) :])

    def time_step(
        self, block_manager: BlockManager, tokens: int, context: int, repeats: int = 3
    ) -> float:
        """Median seconds of one forward over a block of `tokens` (1 clean + MASKs) after
        `context` cached tokens (for the branch cost model and benchmarks)."""
        seq = Sequence(-1, [0] * (context + tokens), max_new_tokens=1, stride=1)
        block_manager.allocate(seq, context + tokens)
        block = StepBlock([0] * tokens, context, 0, tokens - 1)
        try:
            return median_seconds(lambda: self.run([seq], [block], block_manager), repeats)
        finally:
            block_manager.deallocate(seq)

    def measure_costs(self, block_manager: BlockManager, max_tokens: int = 512) -> CostModel | None:
        """Step time vs tokens in the step, on this device (context up to 128 tokens); None
        while the free pages cannot hold a measurement (the caller tries again later)."""
        room = block_manager.num_free_pages * block_manager.page_size
        context = min(128, room // 2)
        sizes = [
            n
            for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
            if n <= min(max_tokens, room - context)
        ]
        if len(sizes) < 2:
            return None
        return CostModel(sizes, [self.time_step(block_manager, n, context) for n in sizes])
