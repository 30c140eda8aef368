"""Runs the model on a batch of step blocks: owns the KV cache and builds the flat inputs."""

from __future__ import annotations

import torch

from rids.config import EngineConfig, ModelConfig
from rids.engine.block_manager import BlockManager
from rids.engine.sequence import Sequence, StepBlock
from rids.layers.attention import Attention, AttentionSeq, get_backend
from rids.models.qwen3 import Qwen3ForCausalLM
from rids.utils.context import Context, reset_context, set_context


def kv_cache_pages(model: ModelConfig, engine: EngineConfig) -> int:
    tokens = engine.kv_cache_tokens
    if tokens is None:
        itemsize = torch.empty(0, dtype=engine.dtype).element_size()
        per_token = 2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim
        tokens = int(engine.kv_cache_gib * 2**30) // (per_token * itemsize)
    return max(tokens // engine.page_size, 1)


class ModelRunner:
    def __init__(self, model: Qwen3ForCausalLM, config: EngineConfig, num_pages: int) -> None:
        self.model = model
        self.device = torch.device(config.device)
        self.page_size = config.page_size
        self.backend = get_backend(config.attention_backend)
        self.gate_all = False  # diagnostic: LoRA on every token (ungated, NOT lossless)
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
        attns = [m for m in model.modules() if isinstance(m, Attention)]
        for i, attn in enumerate(attns):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
            attn.backend = self.backend

    @torch.inference_mode()
    def run(
        self, seqs: list[Sequence], blocks: list[StepBlock], block_manager: BlockManager
    ) -> torch.Tensor:
        """Logits [sum of block.num_logits, vocab] for the verify and MASK rows of every block."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lora_rows: list[int] = []
        logit_rows: list[int] = []
        logit_lora_rows: list[int] = []
        attn_seqs = []
        for seq, b in zip(seqs, blocks, strict=True):
            t0, n, r0 = len(input_ids), len(b.token_ids), len(logit_rows)
            pos = list(range(b.start, b.end))
            input_ids += b.token_ids
            positions += pos
            slots += [block_manager.slot(seq, p) for p in pos]
            lora_rows += range(t0 + n - b.num_masks, t0 + n)
            logit_rows += range(t0 + n - b.num_logits, t0 + n)
            logit_lora_rows += range(r0 + b.num_logits - b.num_masks, r0 + b.num_logits)
            attn_seqs.append(AttentionSeq(pos, seq.block_table, b.end))
        if self.gate_all:
            lora_rows, logit_lora_rows = list(range(len(input_ids))), list(range(len(logit_rows)))

        def to_device(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long).to(self.device, non_blocking=True)

        set_context(
            Context(
                slot_mapping=to_device(slots),
                lora_rows=to_device(lora_rows) if lora_rows else None,
                attn=self.backend.prepare(attn_seqs, self.page_size, self.device),
            )
        )
        try:
            hidden = self.model(to_device(input_ids), to_device(positions))
            return self.model.compute_logits(
                hidden[to_device(logit_rows)],
                to_device(logit_lora_rows) if logit_lora_rows else None,
            )
        finally:
            reset_context()
