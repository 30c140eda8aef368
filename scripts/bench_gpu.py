"""GPU benchmark at Qwen3-8B shapes (random bf16 weights, a random rank-128 adapter), one run.

    python scripts/bench_gpu.py                             # on a GPU (the device tool)
    python scripts/bench_gpu.py --shape tiny --device cpu   # a smoke run anywhere

1. Step latency: one forward over the R-ISD block (1 clean + 2N-2 more tokens per sequence, the
   MASK rows gated) vs the 1-token AR step, for batch 1..64 at a fixed context.
2. Gated LoRA on each projection, at the MASK rows of those steps: the fused Triton kernels vs
   the unfused PyTorch LoRA vs no LoRA.
3. Tokens/s: AR measured (batch 1 step rate), R-ISD *projected* (the N = 4 step rate x the
   paper's TPF of 2.96, labelled so), and `transformers.generate` at the same shapes (batch 1).
No weights are downloaded: everything is random, so only timings mean anything here.
"""

from __future__ import annotations

import argparse

import torch
import transformers

from rids.config import EngineConfig, ModelConfig
from rids.engine.block_manager import BlockManager
from rids.engine.model_runner import ModelRunner
from rids.engine.sequence import Sequence, StepBlock
from rids.kernels import lora_kernel
from rids.layers.linear import GatedLinear, LoraWeights
from rids.models.qwen3 import Qwen3ForCausalLM
from rids.utils.loader import default_dtype
from rids.utils.timing import median_seconds

PAPER_TPF = 2.96  # I-DLM paper, R-ISD N = 4 (projected rows only)
SHAPES = {
    "qwen3-8b": dict(
        hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6,
    ),
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, vocab_size=1024, rope_theta=1e6,
    ),
}  # fmt: skip


def hf_config(shape: str) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        **SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=False
    )


def random_model(shape: str, device: str, dtype: torch.dtype, rank: int) -> Qwen3ForCausalLM:
    config = ModelConfig.from_dict(hf_config(shape).to_dict())
    with torch.device(device), default_dtype(dtype), torch.no_grad():
        model = Qwen3ForCausalLM(config).eval()
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
        for layer in (m for m in model.modules() if isinstance(m, GatedLinear)):
            if layer is model.lm_head:
                continue
            layer.set_lora({
                shard: LoraWeights(
                    torch.randn(rank, layer.in_features) * 0.01,
                    torch.randn(layer.shard_size(shard), rank) * 0.01, 1.0,
                )
                for shard in layer.shards or [None]
            })  # fmt: skip
    return model


def timer(device: str, repeats: int):
    def run(fn) -> float:
        def synced() -> None:
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()

        return median_seconds(synced, repeats, warmup=2)

    return run


def step_seconds(runner, bm, batch: int, tokens: int, context: int, time) -> float:
    """One forward: `batch` sequences, each `tokens` new tokens (1 clean + MASKs) after
    `context` cached ones."""
    seqs = [
        Sequence(-i - 1, [0] * (context + tokens), max_new_tokens=1, stride=1) for i in range(batch)
    ]
    for seq in seqs:
        bm.allocate(seq, context + tokens)
    blocks = [StepBlock([0] * tokens, context, 0, tokens - 1) for _ in seqs]
    try:
        return time(lambda: runner.run(seqs, blocks, bm))
    finally:
        for seq in seqs:
            bm.deallocate(seq)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--strides", default="2,4,8")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    strides = [int(n) for n in args.strides.split(",")]
    time = timer(args.device, args.repeats)
    model = random_model(args.shape, args.device, dtype, args.rank)
    tokens = max(batches) * (args.context + 2 * max(strides))
    cfg = EngineConfig(device=args.device, dtype=dtype, kv_cache_tokens=tokens)
    pages = tokens // cfg.page_size + 1
    runner, bm = ModelRunner(model, cfg, pages), BlockManager(pages, cfg.page_size)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    kernel = next(m for m in model.modules() if isinstance(m, GatedLinear)).lora_kernel
    print(f"{args.shape} shapes, {dtype}, rank-{args.rank} LoRA, {name}, context {args.context}")
    print(f"gated LoRA: {'Triton' if kernel else 'PyTorch'}\n")

    print("| batch | AR step ms | " + " | ".join(f"N={n} block ms (ratio)" for n in strides) + " |")
    print("|---" * (2 + len(strides)) + "|")
    ar_ms: dict[int, float] = {}
    block_ms: dict[tuple[int, int], float] = {}
    for b in batches:
        ar_ms[b] = step_seconds(runner, bm, b, 1, args.context, time) * 1e3
        cells = []
        for n in strides:
            block_ms[b, n] = step_seconds(runner, bm, b, 2 * n - 1, args.context, time) * 1e3
            cells.append(f"{block_ms[b, n]:.2f} ({block_ms[b, n] / ar_ms[b]:.2f}x)")
        print(f"| {b} | {ar_ms[b]:.2f} | " + " | ".join(cells) + " |")

    print("\n| projection | tokens (gated) | no LoRA ms | PyTorch LoRA ms | fused ms | overhead |")
    print("|---|---|---|---|---|---|")
    layer0 = model.model.layers[0]
    fused = lora_kernel("auto", torch.device(args.device))
    n = 4
    for label, layer in (
        ("qkv", layer0.self_attn.qkv_proj), ("o", layer0.self_attn.o_proj),
        ("gate_up", layer0.mlp.gate_up_proj), ("down", layer0.mlp.down_proj),
    ):  # fmt: skip
        for b in batches:
            t, g = b * (2 * n - 1), b * (n - 1)
            x = torch.randn(t, layer.in_features, device=args.device, dtype=dtype)
            with torch.no_grad():
                base = time(lambda layer=layer, x=x: layer(x, 0))
                layer.lora_kernel = None
                plain = time(lambda layer=layer, x=x, g=g: layer(x, g))
                layer.lora_kernel = fused
                best = time(lambda layer=layer, x=x, g=g: layer(x, g)) if fused else float("nan")
            print(
                f"| {label} | {t} ({g}) | {base * 1e3:.3f} | {plain * 1e3:.3f} | "
                f"{best * 1e3:.3f} | {((best if fused else plain) / base - 1) * 100:.0f}% |"
            )

    ar_tps = 1e3 / ar_ms[1]
    print(f"\nrids AR, batch 1: {ar_tps:.1f} tok/s (measured)")
    if 4 in strides:
        projected = 1e3 / block_ms[1, 4] * PAPER_TPF
        print(f"rids R-ISD N=4, batch 1: {projected:.1f} tok/s (PROJECTED: step rate x TPF 2.96)")
    del runner, model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    with torch.device(args.device):
        hf = transformers.Qwen3ForCausalLM(hf_config(args.shape)).to(dtype).eval()
    x = torch.randint(1000, (1, args.context), device=args.device)
    new = 64
    gen = transformers.GenerationConfig(
        max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
    )
    with torch.inference_mode():
        seconds = time(lambda: hf.generate(x, generation_config=gen))
    print(f"transformers.generate, batch 1: {new / seconds:.1f} tok/s (includes its prefill)")


if __name__ == "__main__":
    main()
