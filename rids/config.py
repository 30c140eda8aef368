"""Model and engine configuration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig

from rids.errors import RidsError

# model_type -> whether attention has a per-head RMSNorm on q and k (Qwen3 = Llama + q/k norm).
ARCHITECTURES: dict[str, bool] = {"qwen3": True, "llama": False, "sdar": True}
# Whole-model I-DLM checkpoints (`yifanyu/I-DLM-8B`) say "sdar" and point `auto_map` at remote
# code; their weights and shapes are Qwen3's, so rids reads them as Qwen3 and runs no file.
HF_TYPE = {"sdar": "qwen3"}
MAX_STRIDE = 32


@dataclass(slots=True)
class ModelConfig:
    """The fields of an HF `config.json` that the decoder needs, plus the HF config for RoPE."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    mask_token_id: int | None
    block_size: int | None  # whole-model ISD checkpoints: the stride they were trained for
    eos_token_ids: list[int]
    hf_config: PretrainedConfig = field(repr=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in ARCHITECTURES:
            raise RidsError(
                f"unsupported architecture {model_type!r} (architectures "
                f"{raw.get('architectures')}); rids supports model_type {sorted(ARCHITECTURES)}"
            )
        kwargs = {k: v for k, v in raw.items() if k not in ("model_type", "auto_map")}
        hf = AutoConfig.for_model(HF_TYPE.get(model_type, model_type), **kwargs)
        eos = hf.eos_token_id
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_hidden_layers=hf.num_hidden_layers,
            num_attention_heads=hf.num_attention_heads,
            num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            attention_bias=bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=ARCHITECTURES[model_type],
            mask_token_id=raw.get("mask_token_id"),
            block_size=raw.get("block_size"),
            eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
            hf_config=hf,
        )

    def shape_summary(self) -> dict[str, int]:
        """The shape fields an adapter must agree with."""
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
        }


@dataclass(slots=True)
class EngineConfig:
    """How the engine runs: device, dtype, KV cache size, attention backend, CUDA graphs."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    page_size: int = 16
    kv_cache_tokens: int | None = None  # None: from kv_cache_gib, else from free memory
    kv_cache_gib: float | None = None  # None: memory_fraction of free GPU memory; 1 GiB on CPU
    memory_fraction: float = 0.85  # of the device memory free after loading the weights
    max_batch_size: int = 64
    attention_backend: str = "auto"  # torch, flashinfer, or auto (flashinfer on CUDA, fp16/bf16)
    cuda_graphs: str = "auto"  # on, off, or auto (on CUDA with flashinfer)
    kernels: str = "auto"  # gated LoRA: torch, triton, or auto (triton on CUDA when installed)

    def __post_init__(self) -> None:
        for name, allowed in (
            ("kernels", ("auto", "torch", "triton")),
            ("attention_backend", ("auto", "torch", "flashinfer")),
            ("cuda_graphs", ("auto", "on", "off")),
        ):
            if getattr(self, name) not in allowed:
                raise RidsError(f"{name} must be {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.page_size < 1 or self.page_size & (self.page_size - 1):
            raise RidsError(f"page size must be a power of two, got {self.page_size}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.page_size:
            raise RidsError(
                f"KV cache of {self.kv_cache_tokens} tokens is smaller than one page "
                f"({self.page_size}); raise --kv-cache-tokens"
            )
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise RidsError(f"--kv-cache-gib must be > 0, got {self.kv_cache_gib}")
        if not 0 < self.memory_fraction <= 1:
            raise RidsError(f"--memory-fraction must be in (0, 1], got {self.memory_fraction}")


def check_stride(stride: int) -> int:
    """Validate the stride N (tokens committed per forward, at most)."""
    if not isinstance(stride, int) or not 1 <= stride <= MAX_STRIDE:
        raise RidsError(f"stride N must be an integer in 1..{MAX_STRIDE}, got {stride!r}")
    return stride
