"""Plain decode steps replayed from CUDA graphs: one graph per (padded batch size, stride).

A decode step whose blocks are plain (the pending token, up to N-1 drafts, up to N-1 MASKs in
one branch) is laid out in a fixed shape: every sequence gets N clean rows and N-1 MASK rows,
left-padded, and the batch is padded with dummy sequences up to the next captured size; padding
rows write their KV to the scratch page (`rids.engine.step_inputs.Padding`). The graph holds the
whole forward (embedding, layers with the gated LoRA over a static number of MASK rows, RoPE,
flashinfer attention over static buffers); before each replay the step's metadata is copied
into the static inputs and the attention wrapper is re-planned outside the graph. Logits and
verification run after the replay, on the rows that are real.

Selected by `cuda_graphs=auto` on CUDA with the flashinfer backend (its graph-safe wrapper);
never imported on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rids.config import EngineConfig
from rids.engine.step_inputs import AttentionPlan, Padding, StepEntry
from rids.errors import RidsError
from rids.layers.flashinfer_attention import FlashInferAttention, FlashInferBackend
from rids.utils.context import Context, reset_context, set_context

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    wrapper: object  # the flashinfer wrapper the graph reads
    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    hidden: torch.Tensor


class CudaGraphs:
    def __init__(self, runner, config: EngineConfig, strides: tuple[int, ...]) -> None:
        self.runner = runner
        self.backend = runner.backend
        mc = runner.model.config
        self.max_pages = -(-(mc.max_position_embeddings + 64) // config.page_size)
        self.batch_sizes = [b for b in BATCH_SIZES if b <= config.max_batch_size]
        self.strides = strides
        self.graphs: dict[tuple[int, int], Captured] = {}
        self.pool = None
        for n in strides:
            for b in sorted(self.batch_sizes, reverse=True):  # largest first: the pool fits all
                self.graphs[b, n] = self.capture(b, n)

    @classmethod
    def maybe(cls, runner, config: EngineConfig, strides: tuple[int, ...]) -> CudaGraphs | None:
        """Graphs when `cuda_graphs` allows them and the step can be replayed (CUDA, flashinfer)."""
        usable = runner.device.type == "cuda" and isinstance(runner.backend, FlashInferBackend)
        if config.cuda_graphs == "off" or (config.cuda_graphs == "auto" and not usable):
            return None
        if not usable:
            raise RidsError("cuda_graphs=on needs CUDA and attention_backend=flashinfer")
        return cls(runner, config, tuple(sorted(set(strides))))

    def padding(self, entries: list[StepEntry]) -> Padding | None:
        """The fixed layout for this step, if one was captured for it (plain decode blocks)."""
        blocks = [e.block for e in entries]
        if any(not b.is_causal or b.partial or b.num_committed != 1 for b in blocks):
            return None
        need = max(max(b.num_clean, b.num_masks + 1) for b in blocks)
        stride = next((n for n in self.strides if n >= need), None)
        size = next((b for b in self.batch_sizes if b >= len(blocks)), None)
        if stride is None or size is None:
            return None
        return self.runner.padding(size, stride)

    def capture(self, batch: int, stride: int) -> Captured:
        model, device = self.runner.model, self.runner.device
        tokens = batch * (2 * stride - 1)
        # every sequence is two requests (its clean rows, its MASK rows) over the same pages
        wrapper = self.backend.graph_wrapper(2 * batch, 2 * batch * self.max_pages)
        # plan once with this layout's shape (the first plan fixes the query count): each
        # request over one sequence's first `stride` positions
        page_size = self.backend.page_size
        pages = -(-stride // page_size)
        qo = [0]
        for rows in [stride] * batch + [stride - 1] * batch:
            qo.append(qo[-1] + rows)
        plan = AttentionPlan(
            qo, [r * pages for r in range(2 * batch + 1)], list(range(pages)) * (2 * batch),
            [stride - (pages - 1) * page_size] * (2 * batch), None,
        )  # fmt: skip
        self.backend.plan(wrapper, plan)
        zeros = {"dtype": torch.long, "device": device}
        ids, pos = torch.zeros(tokens, **zeros), torch.zeros(tokens, **zeros)
        slots = torch.full((tokens,), self.runner.scratch_slot, **zeros)
        attn = FlashInferAttention(wrapper, slots, self.backend.page_size)
        set_context(Context(num_gated=batch * (stride - 1), attn=attn))
        try:
            with torch.inference_mode():
                model(ids, pos)  # warm-up: kernels compiled and autotuned outside the graph
                torch.cuda.synchronize(device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, self.pool):
                    hidden = model(ids, pos)
        finally:
            reset_context()
        torch.cuda.synchronize(device)
        if self.pool is None:
            self.pool = graph.pool()
        return Captured(graph, wrapper, ids, pos, slots, hidden)

    def replay(self, step) -> torch.Tensor:
        inputs, dev = step.inputs, step.dev
        stride = (inputs.max_q + 1) // 2
        captured = self.graphs[inputs.num_seqs, stride]
        captured.input_ids.copy_(dev["input_ids"])
        captured.positions.copy_(dev["positions"])
        captured.slots.copy_(dev["slots"])
        self.backend.plan(captured.wrapper, inputs.attention_plan())
        captured.graph.replay()
        return captured.hidden
