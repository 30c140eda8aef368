"""Runs the model on a step's blocks, in three parts: prepare, run, logits.

1. `prepare` (host): lay the blocks out flat (`rids.engine.step_inputs`), pack every integer
   the device needs into one tensor and copy it once, and plan attention.
2. `run` (device only): the forward over the flat batch; no host sync, and for plain decode
   steps on CUDA a fixed layout replayed from a CUDA graph (`rids.engine.cuda_graph`).
3. `logits`: the LM head on the rows that verify and the MASK rows only.
Verification (`rids.engine.verifier`) then ends the step with its one device-to-host copy.
The runner owns the KV cache: one tensor [2, layers, slots, kv_heads, head_dim] whose per-layer
views are bound onto the attention modules, with one extra page for padding rows.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Any

import torch

from rids.config import MAX_STRIDE, EngineConfig, ModelConfig
from rids.engine.step_inputs import Padding, StepEntry, StepInputs, build_step, slot_of
from rids.engine.verifier import StepLogits
from rids.errors import RidsError
from rids.kernels import lora_kernel
from rids.layers.attention import Attention, TorchBackend
from rids.layers.linear import GatedLinear
from rids.models.qwen3 import Qwen3ForCausalLM
from rids.utils.context import Context, reset_context, set_context


def kv_cache_pages(model: ModelConfig, engine: EngineConfig, free_bytes: int | None) -> int:
    """Pages for `kv_cache_tokens`; else for `kv_cache_gib`; else, on a GPU, `memory_fraction`
    of the memory free once the weights are loaded (`free_bytes`); else 1 GiB. Capped at what a
    full batch of full-context requests can use."""
    tokens = engine.kv_cache_tokens
    if tokens is None:
        itemsize = torch.empty(0, dtype=engine.dtype).element_size()
        per_token = 2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim
        if engine.kv_cache_gib is not None:
            budget = int(engine.kv_cache_gib * 2**30)
        elif free_bytes is not None:
            budget = int(free_bytes * engine.memory_fraction)
        else:
            budget = 2**30
        usable = engine.max_batch_size * (model.max_position_embeddings + 2 * MAX_STRIDE)
        tokens = min(budget // (per_token * itemsize), usable)
    return max(tokens // engine.page_size, 1)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on a CPU, in anonymous memory that the OS zero-fills page by page as it
    is first touched, so a large KV cache costs neither start-up time nor memory until used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # not shared with a fork
    return torch.frombuffer(memory, dtype=dtype).view(shape)


def free_device_memory(device: torch.device) -> int | None:
    """Bytes free on a CUDA device (None elsewhere)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def attention_backend(name: str, config: EngineConfig, model: ModelConfig):
    """`auto`: flashinfer on CUDA in fp16/bf16 when it is installed, else torch."""
    from importlib.util import find_spec

    device = torch.device(config.device)
    half = config.dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        usable = device.type == "cuda" and half and find_spec("flashinfer") is not None
        name = "flashinfer" if usable else "torch"
    if name == "torch":
        return TorchBackend(config.page_size)
    if name == "flashinfer":
        if device.type != "cuda":
            raise RidsError("attention_backend=flashinfer runs on CUDA only; use torch")
        from rids.layers.flashinfer_attention import FlashInferBackend

        shape = (model.num_attention_heads, model.num_key_value_heads, model.head_dim)
        return FlashInferBackend(config.page_size, *shape, config.dtype, device)
    raise RidsError(f"unknown attention backend {name!r}; use auto, torch or flashinfer")


@dataclass(slots=True)
class PreparedStep:
    inputs: StepInputs
    dev: dict[str, torch.Tensor]  # the packed metadata, on the device
    attn: Any  # the backend's metadata (None when a CUDA graph replays the step)


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
        self.gate_all = gate_all  # diagnostic: LoRA on every token (ungated, NOT lossless)
        mc = model.config
        # zeros, not empty: attention reads whole pages, and a masked slot must hold a finite
        # value (its weight is 0, but 0 x NaN is NaN)
        shape = (
            2,
            mc.num_hidden_layers,
            (num_pages + 1) * config.page_size,  # + the scratch page
            mc.num_key_value_heads,
            mc.head_dim,
        )
        self.kv_cache = zeros(shape, config.dtype, self.device)
        self.scratch_slot = num_pages * config.page_size
        for attn in (m for m in model.modules() if isinstance(m, Attention)):
            attn.k_cache = self.kv_cache[0, attn.layer_id]
            attn.v_cache = self.kv_cache[1, attn.layer_id]
        kernel = lora_kernel(config.kernels, self.device)
        for layer in self.linear_layers():
            layer.lora_kernel = kernel
        self.backend = attention_backend(config.attention_backend, config, mc)
        self.config = config
        self.graphs = None

    def linear_layers(self) -> list[GatedLinear]:
        return [m for m in self.model.modules() if isinstance(m, GatedLinear)]

    def pack_weights(self) -> None:
        """On a CPU, oneDNN-packed weights from now on, packed once with the adapter in place
        (and again by each layer when its adapter changes)."""
        if self.device.type == "cpu":
            for layer in self.linear_layers():
                if not layer.prepacked:
                    layer.prepack()

    def capture_graphs(self, strides: tuple[int, ...]) -> None:
        """(Re)capture the decode graphs for these strides, where `cuda_graphs` allows: after
        every change of adapter, since a graph reads the LoRA weights where they were."""
        self.graphs = None
        if self.gate_all or self.config.cuda_graphs == "off" or self.device.type != "cuda":
            if self.config.cuda_graphs == "on" and self.device.type != "cuda":
                raise RidsError("cuda_graphs=on needs a CUDA device")
            return
        from rids.engine.cuda_graph import CudaGraphs

        self.graphs = CudaGraphs.maybe(self, self.config, strides)

    def prepare(self, entries: list[StepEntry], pad: Padding | None = None) -> PreparedStep:
        """Host work for one forward, then one copy of its metadata to the device. A step a
        captured graph can replay gets that graph's fixed layout; `pad` forces a layout."""
        graph = pad is None and self.graphs is not None
        if graph:
            pad = self.graphs.padding(entries)
            graph = pad is not None
        inputs = build_step(entries, self.page_size, pad)
        dev = inputs.to_device(self.device)
        return PreparedStep(inputs, dev, None if graph else self.backend.prepare(inputs, dev))

    def padding(self, num_seqs: int, stride: int) -> Padding:
        return Padding(num_seqs, stride, self.scratch_slot)

    @torch.inference_mode()
    def forward(self, step: PreparedStep) -> torch.Tensor:
        """Final hidden states of the flat batch (device only: no host sync)."""
        if step.attn is None:
            return self.graphs.replay(step)
        inputs = step.inputs
        gated = inputs.num_tokens if self.gate_all else inputs.num_gated
        set_context(Context(num_gated=gated, attn=step.attn))
        try:
            return self.model(step.dev["input_ids"], step.dev["positions"])
        finally:
            reset_context()

    @torch.inference_mode()
    def logits(self, step: PreparedStep, hidden: torch.Tensor) -> StepLogits:
        """LM head on the rows that verify, then on every MASK row (the gated tail)."""
        inputs = step.inputs
        rows = hidden.index_select(0, step.dev["logits_rows"])
        gated = rows.shape[0] if self.gate_all else inputs.num_gated
        logits = self.model.compute_logits(rows, gated)
        verify = inputs.num_verify
        return StepLogits(logits[:verify], logits[verify:], rows[verify:])

    def move_kv(self, table: list[int], src: int, dst: int, count: int) -> None:
        """Copy a sequence's KV at indices src .. src+count-1 to dst .. dst+count-1 (ranges
        apart), every layer at once: an accepted sibling path into place."""
        indices = [*range(src, src + count), *range(dst, dst + count)]
        slots = [slot_of(table, i, self.page_size) for i in indices]
        index = torch.tensor(slots).to(self.device, non_blocking=True)
        self.kv_cache[:, :, index[count:]] = self.kv_cache[:, :, index[:count]]

    def run(
        self, entries: list[StepEntry], pad: Padding | None = None
    ) -> tuple[PreparedStep, StepLogits]:
        step = self.prepare(entries, pad)
        return step, self.logits(step, self.forward(step))
