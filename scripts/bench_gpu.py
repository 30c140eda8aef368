"""GPU benchmark at Qwen3-8B shapes (random bf16 weights, a random rank-128 adapter), one run.

    python scripts/bench_gpu.py --out results/                 # on a GPU (scripts/gpu_check.sh)
    python scripts/bench_gpu.py --shape tiny --device cpu --out /tmp/b   # a smoke run anywhere

Every figure comes from this one run; DIR/bench_gpu.md gets the tables, DIR/bench_gpu.json the
numbers. No weights are downloaded: everything is random, so the timings mean something and
the tokens do not (acceptance comes from an oracle, below).

1. Step latency by batch and context: the linear-stack floor (every GEMM of a step at that
   token count, graph-replayed), the AR step, R-ISD blocks (N = 2, 4, 8; N = 4 with a MASK branch
   at every rejection point; N = 4 with a sibling path of 1 and of 3 tokens: what the drafting
   policy would pay for one, a custom mask and no graph), each a whole engine step: prepare,
   forward (a captured graph when the layout allows), logits, verification and its host copy.
2. Gated LoRA per projection at the MASK rows of an N = 4 step: fused Triton, unfused PyTorch,
   none.
3. Attention backends, AR step: flashinfer (graphs), flashinfer (eager), torch.
4. End to end, 128 new tokens: rids AR; rids R-ISD N = 4 with drafts from an oracle (the base's
   own greedy continuation, each draft right with probability 0.9: TPF about 2.9, the paper's
   2.96 at N = 4), at batch 1 and 64; `transformers.generate` at batch 1.
5. Losslessness in this dtype: R-ISD vs rids AR, token agreement, and the reference's
   top-1/top-2 margin at each divergence (`rids.verify.TIE_MARGINS`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers
from bench_cpu import oracle  # scripts/ is on the path of a script run from it

from rids.config import ModelConfig
from rids.engine.sequence import Sequence
from rids.engine.step_block import StepBlock
from rids.engine.step_inputs import StepEntry
from rids.kernels import lora_kernel
from rids.layers.linear import GatedLinear, LoraWeights, linear
from rids.llm import LLM
from rids.models.qwen3 import Qwen3ForCausalLM
from rids.outputs import GenerationStats
from rids.utils.loader import default_dtype

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
ALPHA = 0.9  # oracle acceptance per draft: plain R-ISD N = 4 then commits about 2.9 a step
MASK_ID = 3


def hf_config(shape: str) -> transformers.Qwen3Config:
    return transformers.Qwen3Config(
        **SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False
    )


def random_model(shape: str, device: str, dtype: torch.dtype, rank: int) -> Qwen3ForCausalLM:
    """Random base weights and a random rank-`rank` LoRA on every projection."""
    config = ModelConfig.from_dict(hf_config(shape).to_dict())
    with torch.device(device), default_dtype(dtype), torch.no_grad():
        model = Qwen3ForCausalLM(config).eval()
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
        for layer in lora_layers(model):
            layer.set_lora({
                shard: LoraWeights(
                    torch.randn(rank, layer.in_features) * 0.01,
                    torch.randn(layer.shard_size(shard), rank) * 0.01, 1.0,
                )
                for shard in layer.shards or [None]
            })  # fmt: skip
    return model


def lora_layers(model: Qwen3ForCausalLM) -> list[GatedLinear]:
    return [m for m in model.modules() if isinstance(m, GatedLinear) and m is not model.lm_head]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def graphed(fn, device: torch.device):
    """`fn` replayed from a CUDA graph (eager elsewhere): launch overhead out of the floor."""
    if device.type != "cuda":
        return fn
    fn()
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def floor_ms(model: Qwen3ForCausalLM, tokens: int, device, repeats: int) -> float:
    """Every linear layer of a step (and the LM head) on `tokens` rows: the weights streamed
    once, nothing else."""
    layers = [m for m in model.modules() if isinstance(m, GatedLinear)]
    inputs = [
        torch.randn(tokens, m.in_features, device=device, dtype=m.weight.dtype) for m in layers
    ]

    def stack() -> None:
        for m, x in zip(layers, inputs, strict=True):
            linear(x, m.weight, m.bias)

    with torch.inference_mode():
        return median_ms(graphed(stack, device), device, repeats)


def step_ms(llm: LLM, batch: int, context: int, k: int, m: int, branches: tuple[int, ...],
            repeats: int, sibling: int = 0) -> float:  # fmt: skip
    """A whole engine step: `batch` sequences, each `context` cached tokens then a block of the
    pending token, k drafts, a sibling path of `sibling` tokens and `branches` x m MASKs."""
    engine = llm.engine
    tokens = 1 + k + sibling + m * len(branches)
    seqs = [Sequence(-i - 1, [0] * context, max_new_tokens=1, stride=1) for i in range(batch)]
    blocks = [StepBlock([0] * tokens, context, k, m, branches if m else (), sibling) for _ in seqs]
    for seq, block in zip(seqs, blocks, strict=True):
        engine.pages.allocate(seq, block.end)
    entries = [StepEntry(b, s.page_table) for s, b in zip(seqs, blocks, strict=True)]

    def once() -> None:
        step, logits = engine.runner.run(entries)
        engine.verifier.verify(blocks, step.inputs, step.dev, logits, {})

    try:
        return median_ms(once, engine.runner.device, repeats)
    finally:
        for seq in seqs:
            engine.pages.deallocate(seq)


def tokens_per_second(llm: LLM, prompts, new: int, stride: int, drafter=None):
    llm.engine.drafter = drafter
    try:
        llm.generate(prompts[:1], max_new_tokens=8, stride=stride, ignore_eos=True)  # warm-up
        sync(llm.engine.runner.device)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, max_new_tokens=new, stride=stride, ignore_eos=True)
        seconds = time.perf_counter() - t0
    finally:
        llm.engine.drafter = None
    stats = GenerationStats.total([o.stats for o in outs])
    return sum(len(o.token_ids) for o in outs) / seconds, stats, [o.token_ids for o in outs]


def hf_from(
    model: Qwen3ForCausalLM, shape: str, device: str, dtype
) -> transformers.PreTrainedModel:
    """The same weights in `transformers`' Qwen3 (shards of the fused projections split)."""
    with torch.device(device):
        hf = transformers.Qwen3ForCausalLM(hf_config(shape)).to(dtype).eval()
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, GatedLinear):
            for shard, rows in (module.shards or {None: slice(None)}).items():
                leaf = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj",
                        "up": "up_proj"}.get(shard)  # fmt: skip
                key = name.rpartition(".")[0] + f".{leaf}" if leaf else name
                state[f"{key}.weight"] = module.weight[rows]
        elif hasattr(module, "weight") and isinstance(module.weight, torch.nn.Parameter):
            state[f"{name}.weight"] = module.weight
    hf.load_state_dict(state, strict=False)
    return hf


def table(title: str, header: list[str], rows: list[list]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.manual_seed(0)
    model = random_model(args.shape, args.device, dtype, args.rank)
    kv_tokens = max(batches) * (max(contexts) + 128)
    llm = LLM.from_model(model, mask_token_id=MASK_ID, stride=4, device=args.device, dtype=dtype,
                         kv_cache_tokens=kv_tokens, max_batch_size=max(batches),
                         drafting="fixed", branches="off")  # fmt: skip
    llm.engine.runner.capture_graphs((1, 2, 4, 8))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report = [f"# bench_gpu.py: {args.shape} shapes, {dtype}, rank-{args.rank} LoRA, {name}\n"]
    results: dict = {"device": name, "dtype": str(dtype), "shape": args.shape}
    print(report[0], flush=True)

    # 1. step latency
    rows, steps = [], {}
    for context in contexts:
        for b in batches:
            floor = floor_ms(model, b, device, args.repeats)
            ar = step_ms(llm, b, context, 0, 0, (), args.repeats)
            cells = {"floor": floor, "ar": ar}
            for n in (2, 4, 8):
                cells[f"n{n}"] = step_ms(llm, b, context, n - 1, n - 1, (n - 1,), args.repeats)
            cells["n4_branches"] = step_ms(llm, b, context, 3, 3, (0, 1, 2, 3), args.repeats)
            for s in (1, 3):
                cells[f"n4_sibling{s}"] = step_ms(llm, b, context, 3, 3, (3,), args.repeats, s)
            steps[f"{b}x{context}"] = cells
            kinds = ("n2", "n4", "n8", "n4_branches", "n4_sibling1", "n4_sibling3")
            rows.append([b, context, f"{floor:.2f}", f"{ar:.2f} ({ar / floor:.2f}x)"] + [
                f"{cells[k]:.2f} ({cells[k] / ar:.2f}x)" for k in kinds
            ])  # fmt: skip
            print(rows[-1], flush=True)
    results["steps_ms"] = steps
    report.append(table(
        "Step latency, ms (AR: x the floor; R-ISD: x the AR step)",
        ["batch", "context", "linear floor", "AR step", "N=2 block", "N=4 block", "N=8 block",
         "N=4 + every branch", "N=4 + sibling of 1", "N=4 + sibling of 3"], rows,
    ))  # fmt: skip

    # 2. gated LoRA per projection
    fused = lora_kernel("auto", device)
    layer0 = model.model.layers[0]
    rows = []
    projections = [
        ("qkv", layer0.self_attn.qkv_proj), ("o", layer0.self_attn.o_proj),
        ("gate_up", layer0.mlp.gate_up_proj), ("down", layer0.mlp.down_proj),
    ]  # fmt: skip
    for label, layer in projections:
        for b in batches:
            t, g = b * 7, b * 3
            x = torch.randn(t, layer.in_features, device=device, dtype=dtype)
            with torch.inference_mode():
                base = median_ms(lambda layer=layer, x=x: layer(x, 0), device, args.repeats)
                layer.lora_kernel = None
                plain = median_ms(lambda layer=layer, x=x, g=g: layer(x, g), device, args.repeats)
                layer.lora_kernel = fused
                best = median_ms(lambda layer=layer, x=x, g=g: layer(x, g), device, args.repeats)
            rows.append([label, f"{t} ({g})", f"{base:.3f}", f"{plain:.3f}", f"{best:.3f}",
                         f"{(best / base - 1) * 100:.0f}%"])  # fmt: skip
    report.append(table(
        f"Gated LoRA at the MASK rows of an N=4 step ({'Triton' if fused else 'PyTorch'} fused)",
        ["projection", "tokens (gated)", "no LoRA ms", "PyTorch LoRA ms", "fused ms",
         "overhead"], rows,
    ))  # fmt: skip

    # 3. attention backends (AR step)
    rows = []
    for backend, graphs in (("auto", "auto"), ("auto", "off"), ("torch", "off")):
        other = LLM.from_model(model, mask_token_id=MASK_ID, stride=4, device=args.device,
                               dtype=dtype, kv_cache_tokens=max(batches) * (contexts[0] + 128),
                               max_batch_size=max(batches), attention_backend=backend,
                               cuda_graphs=graphs, drafting="fixed", branches="off")  # fmt: skip
        label = f"{type(other.engine.runner.backend).__name__}, graphs {graphs}"
        for b in batches[:3]:
            rows.append([label, b, f"{step_ms(other, b, contexts[0], 0, 0, (), args.repeats):.2f}"])
        del other
    report.append(table("Attention backends, AR step ms", ["backend", "batch", "ms"], rows))

    # 4 and 5. end to end, and losslessness in this dtype
    new = args.new_tokens
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = [torch.randint(10, vocab, (64,), generator=g).tolist() for _ in range(max(batches))]
    rows, e2e, pairs = [], {}, []
    for b in sorted({1, max(batches)}):
        ar_tps, _, ar_ids = tokens_per_second(llm, prompts[:b], new, 1)
        refs = {tuple(p): ids for p, ids in zip(prompts[:b], ar_ids, strict=True)}
        risd_tps, stats, risd_ids = tokens_per_second(llm, prompts[:b], new, 4, oracle(refs, ALPHA))
        pairs += list(zip(prompts[:b], ar_ids, risd_ids, strict=True))
        same = sum(a == r for a, r in zip(ar_ids, risd_ids, strict=True))
        e2e[b] = dict(ar=ar_tps, risd=risd_tps, tpf=stats.tpf, acceptance=stats.acceptance,
                      identical=same / b)  # fmt: skip
        rows.append([b, f"{ar_tps / b:.1f}", f"{risd_tps / b:.1f}", f"{stats.tpf:.2f}",
                     f"{risd_tps / ar_tps:.2f}x", f"{same}/{b}"])  # fmt: skip
        print(rows[-1], flush=True)
    hf = hf_from(model, args.shape, args.device, dtype)
    x = torch.tensor([prompts[0]], device=device)
    config = transformers.GenerationConfig(max_new_tokens=new, min_new_tokens=new,
                                           do_sample=False, pad_token_id=0)  # fmt: skip
    with torch.inference_mode():
        hf.generate(x, generation_config=config)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        hf_ids = hf.generate(x, generation_config=config)[0, x.shape[1] :].tolist()
        sync(device)
        hf_tps = new / (time.perf_counter() - t0)
    e2e["transformers"] = hf_tps
    report.append(table(
        f"End to end, {new} new tokens, tok/s per request (R-ISD: oracle drafts, alpha {ALPHA})",
        ["batch", "rids AR", "rids R-ISD N=4", "TPF", "R-ISD / AR", "R-ISD text = AR text"],
        rows,
    ))  # fmt: skip
    report.append(f"`transformers.generate`, batch 1: {hf_tps:.1f} tok/s (its prefill included)\n")
    divergences = [margin_at(hf, p, a, r) for p, a, r in pairs if a != r]
    hf_vs_ar = margin_at(hf, prompts[0], hf_ids, pairs[0][1])
    results["end_to_end"] = e2e
    results["divergences"] = {"risd_vs_ar": divergences, "ar_vs_transformers": hf_vs_ar}
    report.append(
        f"Losslessness in {dtype}: R-ISD vs rids AR, {len(pairs) - len(divergences)} of "
        f"{len(pairs)} texts identical; at each divergence (token, reference top-1/top-2 "
        f"margin): {divergences or 'none'}. rids AR vs `transformers` on prompt 0: "
        f"{hf_vs_ar or 'identical'}.\n"
    )
    (args.out / "bench_gpu.md").write_text("\n".join(report))
    (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(report))


def margin_at(hf, prompt: list[int], a: list[int], b: list[int]) -> tuple[int, float] | None:
    """Where two continuations first differ, and the reference's top-1/top-2 logit margin there
    (a near-tie flips under rounding; a large margin would be a bug)."""
    i = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
    if i is None:
        return None
    with torch.inference_mode():
        ids = torch.tensor([prompt + a[:i]], device=hf.device)
        top = hf(ids).logits[0, -1].float().topk(2).values
    return i, round(float(top[0] - top[1]), 5)


if __name__ == "__main__":
    main()
