"""`train_adapter`: the training loop (seeded, resumable, DDP when launched by torchrun)."""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rids.adapter import Adapter, apply_adapter, base_config_hash, load_adapter, save_adapter
from rids.errors import RidsError
from rids.llm import LLM
from rids.mask_token import resolve_mask_token_id
from rids.outputs import GenerationStats
from rids.train.data import TrainingData, build_dataset
from rids.train.lora import ALL_LINEAR, new_adapter, trainable
from rids.train.objective import LossParts, mask_block_loss
from rids.utils.hub import resolve_path
from rids.utils.io import atomic_write_bytes

CHECKPOINT = "checkpoint"
STATE = "trainer_state.pt"


@dataclass
class TrainConfig:
    base: str
    data: list[Path]
    output: Path
    rank: int = 128
    alpha: float | None = None  # None: alpha = rank (scaling 1)
    target_modules: tuple[str, ...] = ALL_LINEAR
    strides: list[int] = field(default_factory=lambda: [4])  # a curriculum, in equal parts
    lr: float = 2e-4
    warmup: float = 0.05  # fraction of steps
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    epochs: float | None = None  # if set, replaces max_steps once the data size is known
    seq_len: int = 256
    anchors: int = 32  # MASK blocks per sequence and step
    distill_weight: float = 1.0  # 1: match the base's distribution, 0: the data token
    train_mask_embedding: bool = True
    init_adapter: str | None = None  # continue from an existing PEFT adapter
    mask_token: str | None = None  # a token string or id; default: config, tokenizer, arch
    dtype: str | None = None
    device: str = "cpu"
    seed: int = 0
    eval_every: int = 100
    eval_prompts: int = 8
    eval_tokens: int = 48
    save_every: int = 100
    resume: bool = False
    deterministic: bool = True  # bitwise-reproducible runs (so --resume repeats the same curve)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise RidsError(f"--rank must be >= 1, got {self.rank}")
        if not self.strides or min(self.strides) < 2:
            raise RidsError(
                f"--stride values must be >= 2 (MASK blocks need N-1 >= 1): {self.strides}"
            )
        if not 0 <= self.distill_weight <= 1:
            raise RidsError(f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        for name in ("batch_size", "grad_accum", "max_steps", "anchors"):
            if getattr(self, name) < 1:
                raise RidsError(f"--{name.replace('_', '-')} must be >= 1")


@dataclass(slots=True)
class StepReport:
    step: int
    stride: int
    loss: float
    ce: float
    kl: float
    agree: float
    lr: float
    tokens_per_s: float


@dataclass(slots=True)
class EvalReport:
    step: int
    stride: int
    tpf: float
    acceptance: list[float]


def stride_at(cfg: TrainConfig, step: int) -> int:
    return cfg.strides[min(step * len(cfg.strides) // cfg.max_steps, len(cfg.strides) - 1)]


def lr_at(cfg: TrainConfig, step: int) -> float:
    warm = max(1, int(cfg.warmup * cfg.max_steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.max_steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_at(cfg: TrainConfig, data: TrainingData, step: int, micro: int, rank: int, world: int):
    """Sequences and anchors of one micro-batch: a pure function of (seed, step, micro)."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + micro)
    n, length = data.sequences.shape
    idx = torch.randint(0, n, (cfg.batch_size * world,), generator=gen)
    stride = stride_at(cfg, step)
    scores = torch.rand(len(idx), length - stride, generator=gen)
    anchors = scores.topk(min(cfg.anchors, length - stride), dim=1).indices.sort(dim=1).values
    # the world's batch is drawn whole, then split: N processes == one with N x the batch
    return data.sequences[idx[rank::world]], anchors[rank::world], stride


class AdapterModule(nn.Module):
    """The trainable parameters as a Module (what DDP wraps); forward installs them and scores."""

    def __init__(self, llm: LLM, adapter: Adapter, cfg: TrainConfig) -> None:
        super().__init__()
        self.params = nn.ParameterList(adapter.parameters())
        self.llm, self.adapter, self.cfg = [llm], adapter, cfg

    def forward(self, ids: torch.Tensor, anchors: torch.Tensor, stride: int) -> LossParts:
        model = self.llm[0].model
        apply_adapter(model, self.adapter)
        mask_id = self.adapter.mask_token_id
        return mask_block_loss(model, ids, anchors, stride, mask_id, self.cfg.distill_weight)


def start_adapter(cfg: TrainConfig, llm: LLM) -> Adapter:
    if cfg.init_adapter:
        adapter = trainable(load_adapter(resolve_path(cfg.init_adapter, "adapter"), llm.model))
        given = chosen_mask(cfg, llm) if cfg.mask_token is not None else adapter.mask_token_id
        mask_id, _ = resolve_mask_token_id(llm.config, given, llm.tokenizer)
        adapter.metadata |= {
            "mask_token_id": mask_id,
            "base": str(cfg.base),
            "base_config_hash": base_config_hash(llm.model),
        }
        return adapter
    mask_id, _ = resolve_mask_token_id(llm.config, chosen_mask(cfg, llm), llm.tokenizer)
    return new_adapter(
        llm.model,
        rank=cfg.rank,
        alpha=cfg.alpha or cfg.rank,
        mask_token_id=mask_id,
        targets=cfg.target_modules,
        train_mask_embedding=cfg.train_mask_embedding,
        seed=cfg.seed,
        base_name=str(cfg.base),
    )


def chosen_mask(cfg: TrainConfig, llm: LLM) -> int | None:
    """--mask-token as an id: a number, or a token the tokenizer knows (e.g. <empty_output>)."""
    if cfg.mask_token is None:
        return None
    if str(cfg.mask_token).isdigit():
        return int(cfg.mask_token)
    ids = llm.tokenizer.get_vocab() if llm.tokenizer is not None else {}
    if cfg.mask_token not in ids:
        raise RidsError(f"--mask-token {cfg.mask_token!r} is not a token of this base's tokenizer")
    return ids[cfg.mask_token]


def evaluate(llm: LLM, adapter: Adapter, data: TrainingData, cfg: TrainConfig, step: int):
    """TPF and acceptance of the current adapter, decoding held-out prompts with the engine."""
    stride = stride_at(cfg, max(step - 1, 0))
    llm.set_adapter(adapter)
    prompts = data.eval_prompts[: cfg.eval_prompts]
    outs = llm.generate(prompts, max_new_tokens=cfg.eval_tokens, stride=stride)
    total = GenerationStats.total([o.stats for o in outs])
    return EvalReport(step, stride, total.tpf, total.acceptance)


def save_checkpoint(adapter: Adapter, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int):
    path = save_adapter(adapter, cfg.output / CHECKPOINT)
    state = {"step": step, "optimizer": opt.state_dict(), "config": asdict(cfg)}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path / STATE, buf.getvalue())  # written last: marks the checkpoint whole


@contextmanager
def deterministic_algorithms(enabled: bool):
    before = torch.are_deterministic_algorithms_enabled()
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextmanager
def process_group(world: int, device: str):
    """Join the torchrun process group (NCCL on GPU, gloo on CPU) unless already in one."""
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield
    finally:
        if owns:
            dist.barrier()
            dist.destroy_process_group()


def train_adapter(
    cfg: TrainConfig,
    on_step: Callable[[StepReport], None] = lambda r: None,
    on_eval: Callable[[EvalReport], None] = lambda r: None,
) -> Path:
    """Train a gated adapter; writes it (PEFT format + rids.json) to cfg.output."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    with deterministic_algorithms(cfg.deterministic), process_group(world, cfg.device):
        return _train(cfg, on_step, on_eval, world)


def _train(
    cfg: TrainConfig,
    on_step: Callable[[StepReport], None],
    on_eval: Callable[[EvalReport], None],
    world: int,
) -> Path:
    rank = dist.get_rank() if world > 1 else 0
    check_output(cfg.output)
    llm = LLM(cfg.base, device=cfg.device, dtype=cfg.dtype)
    for p in llm.model.parameters():
        p.requires_grad_(False)
    data = build_dataset(cfg.data, llm.tokenizer, cfg.seq_len, max(cfg.strides))
    if cfg.epochs is not None:
        per_step = cfg.batch_size * cfg.grad_accum * world
        cfg.max_steps = max(1, math.ceil(cfg.epochs * len(data.sequences) / per_step))
    start = 0
    ckpt = cfg.output / CHECKPOINT
    if cfg.resume and (ckpt / STATE).is_file():
        adapter = trainable(load_adapter(ckpt, llm.model))
        state = torch.load(ckpt / STATE, weights_only=False)
        start = state["step"]
    elif cfg.resume:
        raise RidsError(f"--resume: no checkpoint in {ckpt}")
    else:
        adapter = start_adapter(cfg, llm)
    adapter.metadata["stride"] = cfg.strides[-1]
    module = AdapterModule(llm, adapter, cfg)
    model = nn.parallel.DistributedDataParallel(module) if world > 1 else module
    opt = torch.optim.AdamW(module.params, lr=cfg.lr, weight_decay=0.0)
    if start:
        opt.load_state_dict(state["optimizer"])
    for step in range(start, cfg.max_steps):
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        parts = []
        for micro in range(cfg.grad_accum):
            ids, anchors, stride = batch_at(cfg, data, step, micro, rank, world)
            out = model(ids.to(cfg.device), anchors.to(cfg.device), stride)
            (out.loss / cfg.grad_accum).backward()
            parts.append(out)
        torch.nn.utils.clip_grad_norm_(module.params, 1.0)
        opt.step()
        done = step + 1
        tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len
        seconds = time.perf_counter() - t0
        on_step(
            StepReport(
                done, stride, *(mean_of(parts, f) for f in ("loss", "ce", "kl", "agree")),
                lr_at(cfg, step), tokens / seconds,
            )
        )  # fmt: skip
        if rank == 0 and done % cfg.save_every == 0 and done < cfg.max_steps:
            save_checkpoint(adapter, opt, cfg, done)
        if rank == 0 and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            on_eval(evaluate(llm, adapter, data, cfg, done))
    if rank == 0:
        save_checkpoint(adapter, opt, cfg, cfg.max_steps)
        save_adapter(adapter, cfg.output)
    return cfg.output


def mean_of(parts: list[LossParts], name: str) -> float:
    values = [getattr(p, name) for p in parts]
    return sum(float(v.detach()) if torch.is_tensor(v) else v for v in values) / len(values)


def check_output(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # unique name: safe with several processes
            pass
    except OSError as e:
        raise RidsError(f"--output {path} is not writable ({e.strerror})") from None
