"""`verify-lossless`: R-ISD greedy output vs `transformers` greedy `generate` on the same base."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

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


# Below this top-1/top-2 logit margin (the reference's, at the first divergent token), two
# correct implementations may pick different tokens: GEMM and attention sum in an order that
# depends on the kernel and the rows per call (docs/numerics.md). fp32 on CPU differs by about
# 2e-4 on SmolLM2's logits; bf16 and fp16 by far more.
TIE_MARGINS = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 2.5e-1}


@dataclass(slots=True)
class Divergence:
    prompt: int
    position: int
    expected: int | None  # None: the reference had already ended
    got: int | None
    margin: float | None = None  # the reference's top-1 minus top-2 logit there
    second: int | None = None  # the reference's second choice there
    near_tie: bool = False  # got == second and margin <= the tie margin: rounding, not a bug

    def describe(self) -> str:
        where = f"prompt {self.prompt} @ token {self.position}: {self.expected} != {self.got}"
        if self.margin is None:
            return where
        kind = "near-tie" if self.near_tie else "MISMATCH"
        second = "the reference's 2nd choice" if self.got == self.second else "not its 2nd choice"
        return f"{where} ({kind}: reference top-1/top-2 margin {self.margin:.2e}, {second})"


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

    @property
    def passed(self) -> bool:
        """Identical, or diverging only at a near-tie of the reference."""
        return self.divergence is None or self.divergence.near_tie


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
        return [llm.encode_chat([{"role": "user", "content": p}]) for p in prompts]
    return [llm.encode(p) for p in prompts]


class Reference:
    """The `transformers` model of the reference checkpoint (default: the base itself)."""

    def __init__(self, llm: LLM, reference: str | None = None) -> None:
        from transformers import GenerationConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        path = llm.base_path if reference is None else resolve_path(reference, "reference model")
        self.device = llm.engine_config.device
        self.model = load_reference(path, llm.engine_config.dtype).to(self.device).eval()
        self.config = GenerationConfig(
            do_sample=False,
            eos_token_id=llm.eos_token_ids or None,
            pad_token_id=(llm.eos_token_ids or [0])[0],
        )

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations, one prompt at a time (no padding)."""
        out = []
        for ids in prompts:
            x = torch.tensor([ids], device=self.device)
            y = self.model.generate(
                x, generation_config=self.config, max_new_tokens=max_new_tokens,
                attention_mask=torch.ones_like(x),
            )  # fmt: skip
            out.append(y[0, len(ids) :].tolist())
        return out

    @torch.inference_mode()
    def top2(self, ids: list[int]) -> tuple[float, int]:
        """(top-1 minus top-2 logit, the second token) of the next token after `ids`."""
        logits = self.model(torch.tensor([ids], device=self.device)).logits[0, -1].float()
        values, tokens = logits.topk(2)
        return float(values[0] - values[1]), int(tokens[1])


def load_reference(path: Path, dtype: torch.dtype):
    """`transformers` model of a checkpoint; whole-model I-DLM (SDAR) folders load as Qwen3,
    without their remote code (imported here: `transformers`' models take seconds to import,
    which every CLI command would pay)."""
    from transformers import AutoModelForCausalLM, Qwen3ForCausalLM

    config = load_model_config(path)
    if config.model_type in HF_TYPE:
        return Qwen3ForCausalLM.from_pretrained(path, config=config.hf_config, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def explain(
    divergence: Divergence, prompt: list[int], expected: list[int], ref: Reference, tie: float
) -> Divergence:
    """Add the reference's margin at the divergent token: a near-tie, or a bug."""
    if divergence.expected is None or divergence.got is None:
        return divergence  # one stopped early: a length difference, not a choice
    margin, second = ref.top2(prompt + expected[: divergence.position])
    divergence.margin, divergence.second = margin, second
    divergence.near_tie = divergence.got == second and margin <= tie
    return divergence


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
    ref: Reference,
    tie_margin: float,
) -> CaseResult:
    outputs = []
    for i in range(0, len(prompts), batch_size):
        outputs += llm.generate(
            prompts[i : i + batch_size], max_new_tokens=max_new_tokens, stride=stride
        )
    total = GenerationStats.total([o.stats for o in outputs])
    divergence = next(
        (
            explain(d, prompts[i], want, ref, tie_margin)
            for i, (o, want) in enumerate(zip(outputs, references, strict=True))
            if (d := first_divergence(i, want, o.token_ids))
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
    tie_margin: float | None = None,
) -> Iterator[CaseResult]:
    """Yield one result per (stride, batch size); the reference runs once, first. At a
    divergence whose reference margin is at most `tie_margin` (default: by dtype,
    `TIE_MARGINS`) and whose token is the reference's second choice, the case is a near-tie."""
    if any(b < 1 for b in batch_sizes):
        raise RidsError(f"batch sizes must be >= 1, got {batch_sizes}")
    encoded = encode_prompts(llm, prompts)
    for ids in encoded:  # validate every prompt before the (slow) reference run
        llm.check_request(ids, max_new_tokens, max(strides))
    ref = Reference(llm, reference)
    references = ref.greedy(encoded, max_new_tokens)
    on_reference()
    tie = TIE_MARGINS[llm.engine_config.dtype] if tie_margin is None else tie_margin
    for stride in strides:
        for batch_size in batch_sizes:
            yield run_case(llm, encoded, references, stride, batch_size, max_new_tokens, ref, tie)


def report(results: list[CaseResult]) -> dict:
    return {
        "identical": all(r.identical for r in results),
        "passed": all(r.passed for r in results),
        "cases": [asdict(r) | {"identical": r.identical, "passed": r.passed} for r in results],
    }
