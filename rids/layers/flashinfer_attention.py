"""Paged attention through flashinfer (CUDA, fp16/bf16): imported only when selected.

A step's layout (`rids.engine.step_inputs.AttentionPlan`) is flashinfer's own plan input: two
requests per sequence over the same pages, its clean rows and its MASK rows, each with a
bottom-right-aligned causal mask (exactly R-ISD's visibility); a step with MASK branches or a
sibling path plans a custom mask instead. K/V are written into the paged cache by slot
(`index_copy_`), then `BatchPrefillWithPagedKVCacheWrapper.run` attends over the NHD cache
view [pages, page_size, kv_heads, head_dim]. `plan()` reads host int32 tensors (no device sync).

For CUDA graphs (`rids.engine.cuda_graph`) a wrapper per captured batch size is built with
`use_cuda_graph=True` and fixed buffers; it is planned once at capture with the largest step,
then re-planned outside the graph before every replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rids.errors import RidsError

WORKSPACE_BYTES = 256 << 20


def require_flashinfer():
    try:
        import flashinfer
    except ImportError:
        raise RidsError(
            "attention_backend=flashinfer needs flashinfer: pip install 'rids[gpu]' (or use "
            "attention_backend=torch)"
        ) from None
    return flashinfer


def host_i32(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


@dataclass(slots=True)
class FlashInferAttention:
    wrapper: object
    slots: torch.Tensor
    page_size: int

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        layer.k_cache.index_copy_(0, self.slots, k)
        layer.v_cache.index_copy_(0, self.slots, v)
        shape = (-1, self.page_size, layer.num_kv_heads, layer.head_dim)
        return self.wrapper.run(q, (layer.k_cache.view(shape), layer.v_cache.view(shape)))


class FlashInferBackend:
    def __init__(
        self,
        page_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise RidsError(f"flashinfer attention runs in float16 or bfloat16, not {dtype}")
        self.flashinfer = require_flashinfer()
        self.page_size = page_size
        self.shape = (num_heads, num_kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        wrapper = self.flashinfer.BatchPrefillWithPagedKVCacheWrapper
        self.causal = wrapper(self.workspace, "NHD")
        self.masked = wrapper(self.workspace, "NHD")

    def plan(self, wrapper, attention) -> None:
        """Plan `wrapper` for one step's `AttentionPlan` (host lists and tensors)."""
        h, hk, d = self.shape
        mask = attention.custom_mask
        wrapper.plan(
            host_i32(attention.qo_indptr),
            host_i32(attention.kv_indptr),
            host_i32(attention.kv_indices),
            host_i32(attention.kv_last_page_len),
            h, hk, d, self.page_size,
            custom_mask=None if mask is None else mask.to(self.device, non_blocking=True),
            causal=mask is None,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
        )  # fmt: skip

    def prepare(self, inputs, dev: dict[str, torch.Tensor]) -> FlashInferAttention:
        plan = inputs.attention_plan()
        wrapper = self.causal if plan.custom_mask is None else self.masked
        self.plan(wrapper, plan)
        return FlashInferAttention(wrapper, dev["slots"], self.page_size)

    def graph_wrapper(self, num_requests: int, max_pages: int):
        """A CUDA-graph wrapper for `num_requests` requests (causal masks only)."""
        i32 = {"dtype": torch.int32, "device": self.device}
        return self.flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", use_cuda_graph=True,
            qo_indptr_buf=torch.zeros(num_requests + 1, **i32),
            paged_kv_indptr_buf=torch.zeros(num_requests + 1, **i32),
            paged_kv_indices_buf=torch.zeros(max_pages, **i32),
            paged_kv_last_page_len_buf=torch.zeros(num_requests, **i32),
        )  # fmt: skip
