"""`verify-lossless`: R-ISD greedy output vs `transformers` greedy `generate` on the same base."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3ForCausalLM
from transformers.utils import logging as hf_logging

from rids.chat import user_turn
from rids.config import HF_TYPE
from rids.errors import RidsError
from rids.llm import LLM
from rids.outputs import GenerationStats
from rids.utils.hub import resolve_path
from rids.utils.loader import load_model_config

BUILTIN_PROMPTS = [
    "What is 17 times 23? Show your work.",
    "Convert 5 kilometres to miles.",
    "Write a Python function that reverses a string.",
    "Explain in two sentences why the sky is blue.",
    "List the first ten prime numbers.",
    "Rewrite this sentence in the passive voice: The cat chased the mouse.",
    "Define the word 'entropy' for a ten-year-old.",
    "Write a haiku about autumn leaves.",
]


@dataclass(slots=True)
class Divergence:
    prompt: int
    position: int
    expected: int | None  # None: the reference had already ended
    got: int | None


@dataclass(slots=True)
class CaseResult:
    stride: int
    batch_size: int
    num_prompts: int
    tokens: int
    tpf: float
    acceptance: list[float]
    cold_starts: int
    divergence: Divergence | None

    @property
    def identical(self) -> bool:
        return self.divergence is None


def read_prompts(path: Path | None) -> list[str]:
    """Prompts from a file (one per line, blank lines skipped), or the built-in set."""
    if path is None:
        return list(BUILTIN_PROMPTS)
    try:
        prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise RidsError(f"cannot read prompts file {path}: {e.strerror}") from None
    if not prompts:
        raise RidsError(f"prompts file {path} has no prompts (one per line)")
    return prompts


def encode_prompts(llm: LLM, prompts: list[str]) -> list[list[int]]:
    """Chat-template the prompts when the tokenizer has a template, else encode them raw."""
    tok = llm.tokenizer
    if tok is None:
        raise RidsError(f"{llm.base_path} has no tokenizer; verify-lossless needs one")
    if tok.chat_template:
        prompts = [user_turn(tok, p) for p in prompts]
    return [llm.encode(p) for p in prompts]


def reference_greedy(
    llm: LLM, prompts: list[list[int]], max_new_tokens: int, reference: str | None = None
) -> list[list[int]]:
    """Greedy continuations from `transformers`, one prompt at a time, of the reference model
    (default: the base itself)."""
    hf_logging.disable_progress_bar()
    path = llm.base_path if reference is None else resolve_path(reference, "reference model")
    model = load_reference(path, llm.engine_config.dtype)
    model.to(llm.engine_config.device).eval()
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=llm.eos_token_ids or None,
        pad_token_id=(llm.eos_token_ids or [0])[0],
    )
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=llm.engine_config.device)
            y = model.generate(x, generation_config=config, attention_mask=torch.ones_like(x))
            out.append(y[0, len(ids) :].tolist())
    return out


def load_reference(path: Path, dtype: torch.dtype):
    """`transformers` model of a checkpoint; whole-model I-DLM (SDAR) folders load as Qwen3,
    without their remote code."""
    config = load_model_config(path)
    if config.model_type in HF_TYPE:
        return Qwen3ForCausalLM.from_pretrained(path, config=config.hf_config, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def first_divergence(prompt: int, expected: list[int], got: list[int]) -> Divergence | None:
    for i in range(max(len(expected), len(got))):
        e = expected[i] if i < len(expected) else None
        g = got[i] if i < len(got) else None
        if e != g:
            return Divergence(prompt, i, e, g)
    return None


def run_case(
    llm: LLM,
    prompts: list[list[int]],
    references: list[list[int]],
    stride: int,
    batch_size: int,
    max_new_tokens: int,
) -> CaseResult:
    outputs = []
    for i in range(0, len(prompts), batch_size):
        outputs += llm.generate(
            prompts[i : i + batch_size], max_new_tokens=max_new_tokens, stride=stride
        )
    total = GenerationStats.total([o.stats for o in outputs])
    divergence = next(
        (
            d
            for i, (o, ref) in enumerate(zip(outputs, references, strict=True))
            if (d := first_divergence(i, ref, o.token_ids))
        ),
        None,
    )
    return CaseResult(
        stride=stride,
        batch_size=batch_size,
        num_prompts=len(prompts),
        tokens=sum(len(o.token_ids) for o in outputs),
        tpf=total.tpf,
        acceptance=total.acceptance,
        cold_starts=total.cold_starts,
        divergence=divergence,
    )


def verify_lossless(
    llm: LLM,
    prompts: list[str],
    strides: list[int],
    batch_sizes: list[int],
    max_new_tokens: int,
    on_reference: Callable[[], None] = lambda: None,
    reference: str | None = None,
) -> Iterator[CaseResult]:
    """Yield one result per (stride, batch size); the reference runs once, first."""
    if any(b < 1 for b in batch_sizes):
        raise RidsError(f"batch sizes must be >= 1, got {batch_sizes}")
    encoded = encode_prompts(llm, prompts)
    for ids in encoded:  # validate every prompt before the (slow) reference run
        llm.check_request(ids, max_new_tokens, max(strides))
    references = reference_greedy(llm, encoded, max_new_tokens, reference)
    on_reference()
    for stride in strides:
        for batch_size in batch_sizes:
            yield run_case(llm, encoded, references, stride, batch_size, max_new_tokens)


def report(results: list[CaseResult]) -> dict:
    return {
        "identical": all(r.identical for r in results),
        "cases": [asdict(r) | {"identical": r.identical} for r in results],
    }
