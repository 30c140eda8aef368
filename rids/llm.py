"""The Python API: `LLM(base, adapter).generate(prompts, ...)`."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from rich.progress import Progress

from rids.adapter import Adapter, apply_adapter, load_adapter
from rids.config import EngineConfig, ModelConfig, check_stride
from rids.embedded import cache_dir
from rids.engine.drafting import DraftingPolicy, parse_branches
from rids.engine.engine import Engine
from rids.engine.model_runner import ModelRunner, free_device_memory, kv_cache_pages
from rids.engine.page_manager import PageManager
from rids.engine.scheduler import Scheduler
from rids.engine.sequence import Sequence
from rids.engine.verifier import Verifier
from rids.errors import RidsError
from rids.kernels import verify_kernels
from rids.layers.attention import TorchBackend
from rids.mask_token import resolve_mask_token_id
from rids.models.qwen3 import Qwen3ForCausalLM
from rids.outputs import GenerationOutput, GenerationStats
from rids.sampling import GREEDY, SamplingParams
from rids.utils.hub import resolve_path
from rids.utils.loader import load_model, load_model_config, read_json
from rids.utils.openmp import release_thread_pool

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_STRIDE = 4


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise RidsError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or auto")
    return DTYPES[dtype]


class LLM:
    """A base model, optionally with a gated adapter, behind a paged-KV R-ISD engine.

    With an adapter, `generate(stride=N)` commits up to N tokens per forward and its greedy
    output equals the base model's greedy output token for token. Without one it decodes AR.
    Any thread may call `generate` (one at a time): on a CPU each call, and the build, ends by
    freeing its thread's OpenMP workers, which would otherwise slow the next thread's
    (`rids.utils.openmp`).
    """

    def __init__(
        self,
        base: str | Path,
        adapter: str | Path | None = None,
        *,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        kv_cache_tokens: int | None = None,
        kv_cache_gib: float | None = None,
        memory_fraction: float = 0.85,
        page_size: int = 16,
        max_batch_size: int = 64,
        max_step_tokens: int | None = None,
        stationary_steps: int = 1,
        attention_backend: str = "auto",
        cuda_graphs: str = "auto",
        kernels: str = "auto",
        drafting: str = "adaptive",
        branches: str | int = "auto",
        ungated: bool = False,
    ) -> None:
        """`drafting`: adaptive (per request and step, how many drafts to verify and propose,
        from the running acceptance and the device's step-time model; drafts copied from the
        request's text where it repeats) or fixed (every step verifies all drafts and proposes
        N-1: the I-DLM step, MASK drafts only). `branches`: MASK branches per
        step (off, all, K, auto; see `rids.engine.drafting`). `max_step_tokens` caps the tokens
        of one forward (long prompts are prefilled in chunks); `stationary_steps` k admits new
        requests only every k steps. KV cache: `kv_cache_tokens`, else `kv_cache_gib`, else
        `memory_fraction` of the GPU memory free after loading (1 GiB on a CPU).
        `attention_backend` (torch, flashinfer, auto: flashinfer on CUDA in fp16/bf16),
        `cuda_graphs` (on, off, auto: with flashinfer on CUDA), `kernels` (the gated LoRA and
        verification: torch, triton, auto: Triton on CUDA). `ungated=True` is a diagnostic: the
        LoRA runs on every token, as in an ungated adapter, which is NOT lossless
        (`verify-lossless --ungated` must fail)."""
        path = resolve_path(base, "base model")
        config = load_model_config(path)
        engine_config = engine_config_of(
            device, dtype, kv_cache_tokens=kv_cache_tokens, kv_cache_gib=kv_cache_gib,
            memory_fraction=memory_fraction, page_size=page_size, max_batch_size=max_batch_size,
            attention_backend=attention_backend, cuda_graphs=cuda_graphs, kernels=kernels,
        )  # fmt: skip
        model = load_model(path, config, device, engine_config.dtype)
        self.start(
            path, config, model, load_tokenizer(path), engine_config,
            max_step_tokens=max_step_tokens, stationary_steps=stationary_steps,
            drafting=drafting, branches=branches, ungated=ungated,
        )  # fmt: skip
        self.eos_token_ids = generation_eos(path, config.eos_token_ids)
        if adapter is not None:
            self.set_adapter(load_adapter(resolve_path(adapter, "adapter"), self.model))
        else:  # a whole-model ISD checkpoint (mask_token_id in its config): plain ISD
            self.set_adapter(None)

    @classmethod
    def from_model(
        cls,
        model: Qwen3ForCausalLM,
        *,
        mask_token_id: int | None = None,
        stride: int | None = None,
        tokenizer=None,
        device: str = "cpu",
        dtype: str | torch.dtype | None = None,
        **options,
    ) -> LLM:
        """An engine over a model already in memory, its gated LoRA (if any) installed on it,
        proposing with `mask_token_id` at `stride` (benchmarks and tests at shapes no checkpoint
        is at hand for). `options`: as for `LLM(...)`."""
        llm = cls.__new__(cls)
        engine_options = {k: options.pop(k) for k in list(options) if k in ENGINE_OPTIONS}
        config = dataclasses.replace(model.config, block_size=stride, mask_token_id=mask_token_id)
        engine_config = engine_config_of(device, dtype, **engine_options)
        llm.start(Path("in-memory model"), config, model, tokenizer, engine_config, **options)
        llm.eos_token_ids = list(config.eos_token_ids)
        llm.mask_token_id, llm.mask_source = mask_token_id, "the caller"
        llm.engine.mask_token_id = mask_token_id
        llm.prepare_device()
        return llm

    def start(
        self,
        path: Path,
        config: ModelConfig,
        model: Qwen3ForCausalLM,
        tokenizer,
        engine_config: EngineConfig,
        *,
        max_step_tokens: int | None = None,
        stationary_steps: int = 1,
        drafting: str = "adaptive",
        branches: str | int = "auto",
        ungated: bool = False,
    ) -> None:
        """The engine around a loaded model: KV pages, scheduler, drafting policy, verifier."""
        if drafting not in ("adaptive", "fixed"):
            raise RidsError(f"drafting must be adaptive or fixed, got {drafting!r}")
        self.base_path, self.config, self.model, self.tokenizer = path, config, model, tokenizer
        self.engine_config = engine_config
        self.adapter: Adapter | None = None
        self.mask_token_id: int | None = None
        self.mask_source: str | None = None
        device = torch.device(engine_config.device)
        num_pages = kv_cache_pages(config, engine_config, free_device_memory(device))
        pages = PageManager(num_pages, engine_config.page_size)
        runner = ModelRunner(model, engine_config, num_pages, gate_all=ungated)
        adaptive = drafting == "adaptive"
        # sibling paths only where the step-time model prices them: with the torch backend.
        # With flashinfer a block with one needs a custom mask and leaves the CUDA graph, which
        # the model (timed on causal blocks) does not see; not measured on a GPU yet
        siblings = adaptive and isinstance(runner.backend, TorchBackend)
        self.engine = Engine(
            runner,
            pages,
            Scheduler(pages, engine_config.max_batch_size, max_step_tokens, stationary_steps),
            None,
            DraftingPolicy(parse_branches(branches), adaptive=adaptive, siblings=siblings),
            Verifier(verify_kernels(engine_config.kernels, device)),
        )
        self._next_id = 0

    def set_adapter(self, adapter: Adapter | None) -> None:
        """Install a gated adapter (None: remove it) and resolve its MASK token."""
        self.adapter = adapter
        self.mask_token_id = self.mask_source = None
        if adapter is None:
            self.model.clear_adapter()
            if self.config.mask_token_id is not None:  # plain ISD: MASKs run the same weights
                self.mask_token_id, self.mask_source = resolve_mask_token_id(
                    self.config, None, self.tokenizer
                )
        else:
            with torch.no_grad():
                apply_adapter(self.model, adapter)
            self.mask_token_id, self.mask_source = resolve_mask_token_id(
                self.config, adapter.mask_token_id, self.tokenizer
            )
        self.engine.mask_token_id = self.mask_token_id
        if adapter is None:
            self.engine.policy.set_draft_sources(None)
        else:
            head = adapter.draft_head
            if head is not None:  # a copy of its own, beside this model, reading its tables
                like = self.model.lm_head.weight
                head = copy.deepcopy(head).to(like.device, like.dtype)
                head.bind(self.model.model.embed_tokens.weight, like)
            self.engine.policy.set_draft_sources(adapter.corpus, adapter.next_tokens, head)
        self.prepare_device()

    def prepare_device(self) -> None:
        """Before any request: packed weights (CPU), the drafting policy's step-time model
        (cached on disk per device and model shape) and, on CUDA, the decode graphs for the
        default stride."""
        runner, policy = self.engine.runner, self.engine.policy
        runner.pack_weights()
        runner.capture_graphs(tuple(sorted({1, self.default_stride})))  # timed with them
        needs_costs = policy.adaptive or policy.branches == "auto"
        if self.mask_token_id is not None and policy.cost is None and needs_costs:
            head = self.engine.draft_head
            key = {
                "model": self.config.shape_summary(),
                "dtype": str(self.engine_config.dtype),
                "lora_rank": self.adapter.rank if self.adapter else 0,
                "attention": type(runner.backend).__name__,
                "cuda_graphs": runner.graphs is not None,
                "kernels": self.engine_config.kernels,
                "page_size": self.engine_config.page_size,
                "mask_candidates": policy.num_candidates,  # a top-k beside the argmax
                "draft_head": head.up.out_features if head is not None else 0,  # its width
            }
            self.engine.calibrate(cache_dir() / "step-costs", key)
        self.release_cpu_threads()

    def release_cpu_threads(self) -> None:
        """On a CPU, free this thread's OpenMP workers when a batch of work ends, so that a
        generate call from another thread runs at full speed (`rids.utils.openmp`)."""
        if torch.device(self.engine_config.device).type == "cpu":
            release_thread_pool()

    @property
    def trained_stride(self) -> int | None:
        """The stride the adapter (or whole-model checkpoint) was trained for, if recorded."""
        return (self.adapter and self.adapter.stride) or self.config.block_size

    @property
    def default_stride(self) -> int:
        if self.mask_token_id is None:
            return 1
        return self.trained_stride or DEFAULT_STRIDE

    def stride_note(self, stride: int) -> str | None:
        """Why a stride other than the trained one still works (losslessly) but may be slower."""
        trained = self.trained_stride
        if stride == 1 or trained is None or stride == trained:
            return None
        why = (
            "a shorter one proposes fewer tokens per step"
            if stride < trained
            else f"drafts past position {trained - 1} were never trained and pass less often"
        )
        return (
            f"stride {stride}: this model's MASK proposals were trained for stride {trained}; "
            f"any stride stays lossless, but {why}"
        )

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a plain-text prompt, encoded as the tokenizer encodes one (with its BOS
        if it adds one, as `transformers` users get); token ids pass through."""
        if isinstance(prompt, str):
            return self.require_tokenizer().encode(prompt)
        return list(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation in the chat template, ready for the assistant's answer
        (the template carries its own special tokens: nothing is added)."""
        tok = self.require_tokenizer()
        if not tok.chat_template:
            raise RidsError(f"{self.base_path} has no chat template; send plain text prompts")
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok.encode(text, add_special_tokens=False)

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise RidsError(f"{self.base_path} has no tokenizer; pass token ids")
        return self.tokenizer

    def check_request(self, ids: list[int], max_new_tokens: int, stride: int | None) -> int:
        """Validate one request; returns its stride."""
        stride = check_stride(self.default_stride if stride is None else stride)
        if stride > 1 and self.mask_token_id is None:
            raise RidsError(
                f"stride {stride} needs a gated adapter (--adapter) or a whole-model ISD "
                "checkpoint (mask_token_id in config.json); without one use stride 1"
            )
        if max_new_tokens < 1:
            raise RidsError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not ids:
            raise RidsError("empty prompt: give at least one token")
        limit = self.config.max_position_embeddings
        if len(ids) + max_new_tokens > limit:
            raise RidsError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {limit} tokens; shorten the prompt or lower --max-new-tokens"
            )
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise RidsError(f"prompt token ids {bad[:3]} are outside the vocabulary")
        return stride

    def make_sequence(
        self,
        prompt: str | list[int],
        *,
        max_new_tokens: int,
        stride: int | None = None,
        ignore_eos: bool = False,
        stop_token_ids: list[int] | None = None,
        sampling: SamplingParams = GREEDY,
    ) -> Sequence:
        ids = self.encode(prompt)
        stride = self.check_request(ids, max_new_tokens, stride)
        stops = set(stop_token_ids or []) | (set() if ignore_eos else set(self.eos_token_ids))
        self._next_id += 1
        return Sequence(
            self._next_id,
            ids,
            max_new_tokens=max_new_tokens,
            stride=stride,
            stop_token_ids=frozenset(stops),
            sampling=sampling,
        )

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        *,
        max_new_tokens: int = 256,
        stride: int | None = None,
        ignore_eos: bool = False,
        stop_token_ids: list[int] | None = None,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        progress: bool = False,
    ) -> list[GenerationOutput]:
        """R-ISD (or AR at stride 1) for a batch of prompts; outputs in prompt order.

        temperature 0 is greedy (token-identical to the base's greedy decoding); otherwise
        speculative sampling gives exactly the base's distribution after temperature, top-k and
        top-p. With a seed, prompt i uses seed + i: its text does not depend on the batch."""
        seqs = [
            self.make_sequence(
                p,
                max_new_tokens=max_new_tokens,
                stride=stride,
                ignore_eos=ignore_eos,
                stop_token_ids=stop_token_ids,
                sampling=SamplingParams(
                    temperature, top_k, top_p, None if seed is None else seed + i
                ),
            )
            for i, p in enumerate(prompts)
        ]
        try:
            for seq in seqs:
                self.engine.add(seq)
            with Progress(disable=not progress, transient=True) as bar:
                task = bar.add_task("decoding", total=len(seqs) * max_new_tokens)
                while not self.engine.scheduler.is_finished():
                    self.engine.step()
                    done = sum(
                        max_new_tokens if s.is_finished else len(s.completion_ids) for s in seqs
                    )
                    bar.update(task, completed=done)
        except BaseException:  # Ctrl-C or an error: give back every page this call took
            self.engine.scheduler.abort(seqs)
            raise
        finally:
            self.release_cpu_threads()
        return [self.output(seq) for seq in seqs]

    def output(self, seq: Sequence) -> GenerationOutput:
        ids = seq.completion_ids
        text = self.tokenizer.decode(ids) if self.tokenizer is not None else None
        return GenerationOutput(
            seq.token_ids[: seq.num_prompt_tokens],
            ids,
            text,
            seq.finish_reason or "length",
            GenerationStats.of(seq),
        )


ENGINE_OPTIONS = (
    "kv_cache_tokens", "kv_cache_gib", "memory_fraction", "page_size", "max_batch_size",
    "attention_backend", "cuda_graphs", "kernels",
)  # fmt: skip


def engine_config_of(device: str, dtype: str | torch.dtype | None, **options) -> EngineConfig:
    return EngineConfig(device=device, dtype=parse_dtype(dtype, device), **options)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def generation_eos(path: Path, config_eos: list[int]) -> list[int]:
    """EOS ids as `transformers.generate` uses them: generation_config.json, else config.json."""
    gen = path / "generation_config.json"
    eos = read_json(gen).get("eos_token_id") if gen.is_file() else None
    if eos is None:
        return list(config_eos)
    return [eos] if isinstance(eos, int) else list(eos)
