"""`train_adapter`: the training loop (seeded, resumable, DDP when launched by torchrun)."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
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
from rids.train.lora import ALL_LINEAR, grow_rank, new_adapter, trainable
from rids.train.objective import LossParts, mask_block_loss
from rids.utils.hub import resolve_path
from rids.utils.io import atomic_write_bytes, atomic_write_text

CHECKPOINT = "checkpoint"
DEFAULT_RANK = 128
STATE = "trainer_state.pt"
MODEL_CARD = "README.md"
# what a resumed run must share with its checkpoint (device, evaluation and saving may change)
RUN_OPTIONS = (
    "base", "data", "rank", "alpha", "target_modules", "strides", "lr", "warmup", "batch_size",
    "grad_accum", "max_steps", "epochs", "seq_len", "anchors", "distill_weight",
    "train_mask_embedding", "init_adapter", "mask_token", "dtype", "seed", "position_weights",
)  # fmt: skip


@dataclass
class TrainConfig:
    base: str
    data: list[Path]
    output: Path
    rank: int | None = None  # None: 128, or --init-adapter's rank (a higher one grows it)
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
    # loss weight of MASK_k, k = 1..N-1 (scaled to mean 1; None: equal). An early draft is
    # worth more: every later one is accepted only after it
    position_weights: list[float] | None = None
    train_mask_embedding: bool = True
    init_adapter: str | None = None  # continue from an existing PEFT adapter
    mask_token: str | None = None  # a token string or id; default: config, tokenizer, arch
    dtype: str | None = None
    device: str = "cpu"
    seed: int = 0
    eval_every: int = 100
    eval_prompts: int = 8
    eval_tokens: int = 48
    save_every: int | None = None  # None: every tenth of the run (1..100 steps)
    resume: bool = False
    overwrite: bool = False  # replace an adapter already in `output`
    deterministic: bool = True  # bitwise-reproducible runs (so --resume repeats the same curve)

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise RidsError(f"--rank must be >= 1, got {self.rank}")
        if not self.strides or min(self.strides) < 2:
            raise RidsError(
                f"--stride values must be >= 2 (MASK blocks need N-1 >= 1): {self.strides}"
            )
        if not 0 <= self.distill_weight <= 1:
            raise RidsError(f"--distill-weight must be in [0, 1], got {self.distill_weight}")
        if self.position_weights is not None and (
            len(self.position_weights) != max(self.strides) - 1
            or min(self.position_weights) < 0
            or max(self.position_weights) <= 0
        ):
            raise RidsError(
                f"--position-weights needs exactly one weight >= 0 per MASK position (N-1 = "
                f"{max(self.strides) - 1}), not all 0: got {self.position_weights}"
            )
        for name in ("batch_size", "grad_accum", "max_steps", "anchors"):
            if getattr(self, name) < 1:
                raise RidsError(f"--{name.replace('_', '-')} must be >= 1")
        if self.save_every is not None and self.save_every < 1:
            raise RidsError(f"--save-every must be >= 1, got {self.save_every}")
        if self.resume and self.overwrite:
            raise RidsError(
                "--resume continues the run in --output; --overwrite replaces it: pick one"
            )

    @property
    def save_interval(self) -> int:
        return self.save_every or min(max(self.max_steps // 10, 1), 100)

    def run_options(self) -> dict:
        """The options that define the run (what `--resume` must keep), as JSON values."""
        return json.loads(json.dumps({k: getattr(self, k) for k in RUN_OPTIONS}, default=str))


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
    error: str | None = None  # the evaluation failed (training goes on): why


def stride_at(cfg: TrainConfig, step: int) -> int:
    return cfg.strides[min(step * len(cfg.strides) // cfg.max_steps, len(cfg.strides) - 1)]


def lr_at(cfg: TrainConfig, step: int) -> float:
    warm = max(1, int(cfg.warmup * cfg.max_steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, cfg.max_steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(slots=True)
class MicroBatch:
    ids: torch.Tensor  # [B, L] this process's sequences
    trainable: torch.Tensor  # [B, L] which of their tokens are targets
    anchors: torch.Tensor  # [B, A]
    stride: int
    world_count: int  # trainable predictions in this micro-batch of every process

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ids, self.trainable, self.anchors


def batch_at(
    cfg: TrainConfig, data: TrainingData, step: int, micro: int, rank: int, world: int
) -> MicroBatch:
    """One micro-batch, a pure function of (seed, step, micro): the world's batch is drawn
    whole, then split. Anchors are drawn at random among those whose first target trains."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + micro)
    n, length = data.sequences.shape
    idx = torch.randint(0, n, (cfg.batch_size * world,), generator=gen)
    stride = stride_at(cfg, step)
    scores = torch.rand(len(idx), length - stride, generator=gen)
    scores += data.trainable[idx, 2 : length - stride + 2]  # anchor s drafts from s + 2 on
    anchors = scores.topk(min(cfg.anchors, length - stride), dim=1).indices.sort(dim=1).values
    ids, trainable = data.sequences[idx], data.trainable[idx]
    targets = (anchors[:, :, None] + torch.arange(2, stride + 1)).flatten(1)
    count = int(trainable.gather(1, targets).sum())
    return MicroBatch(ids[rank::world], trainable[rank::world], anchors[rank::world], stride, count)


class AdapterModule(nn.Module):
    """The trainable parameters as a Module (what DDP wraps); forward installs them and scores."""

    def __init__(self, llm: LLM, adapter: Adapter, cfg: TrainConfig) -> None:
        super().__init__()
        self.params = nn.ParameterList(adapter.parameters())
        self.llm, self.adapter, self.cfg = [llm], adapter, cfg

    def forward(
        self, ids: torch.Tensor, trainable: torch.Tensor, anchors: torch.Tensor, stride: int
    ) -> LossParts:
        model = self.llm[0].model
        apply_adapter(model, self.adapter)
        cfg = self.cfg
        weights = None if cfg.position_weights is None else cfg.position_weights[: stride - 1]
        return mask_block_loss(
            model, ids, anchors, stride, self.adapter.mask_token_id, cfg.distill_weight,
            trainable, weights,
        )  # fmt: skip


def start_adapter(cfg: TrainConfig, llm: LLM) -> Adapter:
    if cfg.init_adapter:
        adapter = trainable(load_adapter(resolve_path(cfg.init_adapter, "adapter"), llm.model))
        if cfg.rank is not None and cfg.rank != adapter.rank:
            adapter = grow_rank(adapter, cfg.rank, seed=cfg.seed)
        given = chosen_mask(cfg, llm) if cfg.mask_token is not None else adapter.mask_token_id
        mask_id, _ = resolve_mask_token_id(llm.config, given, llm.tokenizer)
        adapter.metadata |= {
            "mask_token_id": mask_id,
            "base": str(cfg.base),
            "base_config_hash": base_config_hash(llm.model),
        }
        return adapter
    mask_id, _ = resolve_mask_token_id(llm.config, chosen_mask(cfg, llm), llm.tokenizer)
    rank = cfg.rank or DEFAULT_RANK
    return new_adapter(
        llm.model,
        rank=rank,
        alpha=cfg.alpha or rank,
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
    """TPF and acceptance of the current adapter: plain R-ISD (no branches) on held-out prompts,
    each cut to its last tokens so that it fits the context. A failure is reported, not raised:
    an evaluation never costs the run."""
    stride = stride_at(cfg, max(step - 1, 0))
    room = llm.config.max_position_embeddings - cfg.eval_tokens
    try:
        if room < 1:
            raise RidsError(f"the context cannot hold {cfg.eval_tokens} evaluation tokens")
        llm.set_adapter(adapter)
        prompts = [ids[-room:] for ids in data.eval_prompts[: cfg.eval_prompts]]
        outs = llm.generate(prompts, max_new_tokens=cfg.eval_tokens, stride=stride)
    except Exception as e:  # any failure: the trained adapter is what matters
        return EvalReport(step, stride, float("nan"), [], f"{type(e).__name__}: {e}")
    total = GenerationStats.total([o.stats for o in outs])
    return EvalReport(step, stride, total.tpf, total.acceptance)


def save_checkpoint(adapter: Adapter, opt: torch.optim.Optimizer, cfg: TrainConfig, step: int):
    path = save_adapter(adapter, cfg.output / CHECKPOINT)
    state = {"step": step, "optimizer": opt.state_dict(), "options": cfg.run_options()}
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path / STATE, buf.getvalue())  # written last: marks the checkpoint whole


def load_state(output: Path) -> dict | None:
    """The checkpoint's trainer state (None: no checkpoint). Plain data only: a state that
    holds anything else is refused, never unpickled (it could run code)."""
    path = output / CHECKPOINT / STATE
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError:
        raise RidsError(
            f"{path} holds objects other than tensors and plain data; refusing to load it (it "
            f"could run code). Delete {path.parent} to start the run over"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise RidsError(f"{path} is unreadable ({e}); delete {path.parent} to start over") from None


def check_resume(cfg: TrainConfig, saved: dict) -> None:
    """Refuse to resume with options other than the checkpoint's: the curve would change."""
    ours = cfg.run_options()
    if ours["rank"] is None:  # no --rank: the checkpoint's (default or initial adapter's)
        ours["rank"] = saved.get("rank")
    diffs = [
        f"--{k.replace('_', '-')} {ours[k]} (checkpoint: {saved[k]})"
        for k in RUN_OPTIONS
        if k in saved and ours[k] != saved[k]
    ]
    if diffs:
        raise RidsError(
            f"--resume: this run's options differ from the checkpoint's: {'; '.join(diffs)}. "
            "Resume with the checkpoint's options, or start a new run in another --output"
        )


def check_output(cfg: TrainConfig) -> None:
    """Before any work: the output folder can be made, and holds no adapter this run would
    silently replace. Nothing is created here (a refused run leaves no empty folder)."""
    path = cfg.output
    if path.exists() and not path.is_dir():
        raise RidsError(f"--output {path} is a file; pass a folder")
    if (path / "adapter_config.json").is_file() and not (cfg.resume or cfg.overwrite):
        raise RidsError(
            f"--output {path} already holds an adapter; pass --overwrite to replace it, "
            "--resume to continue its run, or choose another folder"
        )
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        why = "not a folder" if not parent.is_dir() else "permission denied"
        raise RidsError(f"--output {path} is not writable ({parent}: {why})")


def start_output(cfg: TrainConfig) -> None:
    """Make the output folder; --overwrite clears what the replaced run left."""
    cfg.output.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        shutil.rmtree(cfg.output / CHECKPOINT, ignore_errors=True)
        (cfg.output / MODEL_CARD).unlink(missing_ok=True)


def write_model_card(cfg: TrainConfig, adapter: Adapter, report: EvalReport | None) -> None:
    """README.md beside the adapter: what it is, how it was trained, how it decodes."""
    evaluated = (
        f"TPF {report.tpf:.2f}, acceptance per draft position "
        + " ".join(f"{a:.2f}" for a in report.acceptance)
        if report is not None and report.error is None
        else "not evaluated"
        if report is None
        else f"evaluation failed ({report.error})"
    )
    rows = {
        "base": cfg.base,
        "LoRA": f"rank {adapter.rank}, alpha {adapter.config['lora_alpha']}, "
        f"on {', '.join(sorted({n.rpartition('.')[2] for n in adapter.loras}))}",
        "MASK token id": adapter.mask_token_id,
        "trained stride": adapter.stride,
        "training": f"{cfg.max_steps} steps x {cfg.batch_size * cfg.grad_accum} sequences x "
        f"{cfg.seq_len} tokens, lr {cfg.lr}, strides {cfg.strides}, seed {cfg.seed}",
        "data": ", ".join(map(str, cfg.data)),
        "held-out evaluation": f"{evaluated} (plain R-ISD, {cfg.eval_tokens} tokens per prompt)",
    }
    table = "\n".join(f"| {k} | {v} |" for k, v in rows.items())
    atomic_write_text(
        cfg.output / MODEL_CARD,
        f"# {cfg.output.name}\n\nA gated LoRA adapter for lossless R-ISD decoding with rids, "
        f"written by `rids train-adapter`.\n\n| | |\n|---|---|\n{table}\n\n"
        f"```bash\nrids chat --base {cfg.base} --adapter {cfg.output}\n"
        f"rids verify-lossless --base {cfg.base} --adapter {cfg.output}\n```\n",
    )


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
    check_output(cfg)
    # evaluations take the fixed step without branches: their TPF depends on nothing but the
    # adapter (no timings, no other requests)
    llm = LLM(cfg.base, device=cfg.device, dtype=cfg.dtype, branches="off", drafting="fixed")
    for p in llm.model.parameters():
        p.requires_grad_(False)
    data = build_dataset(cfg.data, llm.tokenizer, cfg.seq_len, max(cfg.strides))
    if cfg.epochs is not None:
        per_step = cfg.batch_size * cfg.grad_accum * world
        cfg.max_steps = max(1, math.ceil(cfg.epochs * len(data.sequences) / per_step))
    state = load_state(cfg.output) if cfg.resume else None
    if cfg.resume and state is None:
        raise RidsError(f"--resume: no checkpoint in {cfg.output / CHECKPOINT}")
    if state is not None:
        check_resume(cfg, state["options"])
        adapter = trainable(load_adapter(cfg.output / CHECKPOINT, llm.model))
    else:
        adapter = start_adapter(cfg, llm)
    adapter.metadata["stride"] = cfg.strides[-1]
    if rank == 0:
        start_output(cfg)
    module = AdapterModule(llm, adapter, cfg)
    model = nn.parallel.DistributedDataParallel(module) if world > 1 else module
    opt = torch.optim.AdamW(module.params, lr=cfg.lr, weight_decay=0.0)
    start = 0 if state is None else state["step"]
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    done, updating = start, False
    if rank == 0 and cfg.eval_every and state is None and cfg.init_adapter:
        on_eval(evaluate(llm, adapter, data, cfg, 0))  # where a warm start begins
    try:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, step)
            opt.zero_grad(set_to_none=True)
            batches = [batch_at(cfg, data, step, m, rank, world) for m in range(cfg.grad_accum)]
            # the mean over the predictions of the whole step (every micro-batch and process):
            # N processes train exactly like one with N x the batch
            count = sum(b.world_count for b in batches)
            parts = []
            for b in batches:
                out = model(*(t.to(cfg.device) for t in b.tensors), b.stride)
                (out.total * world / max(count, 1)).backward()
                parts.append(out)
            stride = batches[-1].stride
            torch.nn.utils.clip_grad_norm_(module.params, 1.0)
            updating = True
            opt.step()
            done, updating = step + 1, False
            tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len
            seconds = time.perf_counter() - t0
            on_step(
                StepReport(
                    done, stride, *(mean_of(parts, f) for f in ("loss", "ce", "kl", "agree")),
                    lr_at(cfg, step), tokens / seconds,
                )
            )  # fmt: skip
            if rank == 0 and done % cfg.save_interval == 0 and done < cfg.max_steps:
                save_checkpoint(adapter, opt, cfg, done)
            if rank == 0 and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
                on_eval(evaluate(llm, adapter, data, cfg, done))
    except KeyboardInterrupt:  # keep every finished step (not one cut off inside its update)
        if rank == 0 and done > start and not updating:
            save_checkpoint(adapter, opt, cfg, done)
        raise
    if rank == 0:  # saved before the final evaluation: nothing after this can lose the run
        save_checkpoint(adapter, opt, cfg, cfg.max_steps)
        save_adapter(adapter, cfg.output)
        write_model_card(cfg, adapter, None)
        if cfg.eval_every:
            report = evaluate(llm, adapter, data, cfg, cfg.max_steps)
            on_eval(report)
            write_model_card(cfg, adapter, report)
    return cfg.output


def mean_of(parts: list[LossParts], name: str) -> float:
    values = [getattr(p, name) for p in parts]
    return sum(float(v.detach()) if torch.is_tensor(v) else v for v in values) / len(values)
