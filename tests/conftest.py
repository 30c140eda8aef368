"""Tiny random models (built once per session) and the `transformers` greedy reference."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter; set before any import
    os.environ.setdefault("TRITON_INTERPRET", "1")  # of triton (peft and transformers import it)

import transformers

from rids.engine.cost_model import CostModel
from rids.engine.engine import Drafter
from rids.engine.sequence import Sequence
from rids.sampling import SamplingParams
from rids.tiny import build_random_adapter, build_tiny_base

# A GPU-like step-time model (a block's tokens nearly free) for tests of the adaptive policy:
# what it plans must not depend on this machine's timings
GPU_LIKE_COSTS = CostModel([1, 64, 1024], [0.010, 0.011, 0.060])

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

PROMPTS = [
    "The quick brown fox",
    "def add(a, b):\n    return a + b\nfor i in range(10):",
    "One",
    "Explain why the sky is blue. Convert 5 kilometres to miles. Write a haiku about",
    "A paged key-value cache stores",
    "Water boils at",
    "print(i * i)",
    "Speculative decoding drafts several tokens and verifies them in one forward pass. One, two,",
]


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory) -> Callable[..., Path]:
    cache: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            cache[key] = build_tiny_base(tmp_path_factory.mktemp("base"), **kwargs)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_base(tiny_factory) -> Path:
    return tiny_factory()


@pytest.fixture(scope="session")
def tiny_adapter(tiny_base, tmp_path_factory) -> Path:
    return build_random_adapter(tmp_path_factory.mktemp("adapter"), tiny_base, rank=8)


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    return transformers.AutoTokenizer.from_pretrained(tiny_base)


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]


def hf_greedy(
    base: Path, prompts: list[list[int]], max_new_tokens: int, eos: list[int] | None = None
) -> list[list[int]]:
    """`transformers` greedy `generate`, one prompt at a time (fp32, CPU); EOS: the model's."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    config = transformers.GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos or model.generation_config.eos_token_id,
        pad_token_id=0,
    )
    out = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(x, generation_config=config, attention_mask=torch.ones_like(x))
            out.append(y[0, len(ids) :].tolist())
    return out


@pytest.fixture(scope="session")
def reference(tiny_base, prompt_ids) -> list[list[int]]:
    return hf_greedy(tiny_base, prompt_ids, 48)


def oracle_drafter(
    references: dict[tuple[int, ...], list[int]],
    wrong_at: Callable[[Sequence, int], bool] = lambda seq, i: False,
    sibling_right: Callable[[Sequence], bool] = lambda seq: False,
) -> Drafter:
    """Replace the MASK proposals by the base's own greedy continuation, made wrong where asked;
    where the first draft is wrong, the sibling draft is the right token where `sibling_right`
    says (else the MASK row's runner-up)."""

    def draft(seq: Sequence, proposals: list[int], second: int | None):
        ref = references[tuple(seq.token_ids[: seq.num_prompt_tokens])]
        n = len(seq.completion_ids)
        truth = (ref[n : n + len(proposals)] + [0] * len(proposals))[: len(proposals)]
        drafts = [(t + 1) % 64 if wrong_at(seq, i) else t for i, t in enumerate(truth)]
        if drafts[0] != truth[0] and sibling_right(seq):
            second = truth[0]
        return drafts, second

    return draft


def noisy(p_wrong: float, seed: int = 0) -> Callable[[Sequence, int], bool]:
    rng = random.Random(seed)
    return lambda seq, i: rng.random() < p_wrong


@pytest.fixture(scope="session")
def fitted(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny base fitted to a repetitive corpus (its continuations can be drafted) + the corpus."""
    from rids.tiny import fit_tiny_base, repetitive_corpus

    root = tmp_path_factory.mktemp("fitted")
    base = fit_tiny_base(build_tiny_base(root / "base"), repetitive_corpus(), steps=600)
    data = root / "corpus.txt"
    data.write_text("\n\n".join(repetitive_corpus()))
    return base, data


@pytest.fixture(scope="session")
def trained_adapter(fitted, tmp_path_factory) -> Path:
    """A gated adapter trained for `fitted` (rank 16, N = 4, 300 steps: TPF about 2.2)."""
    from rids.train.trainer import TrainConfig, train_adapter

    base, data = fitted
    cfg = TrainConfig(
        base=str(base), data=[data], output=tmp_path_factory.mktemp("trained") / "a", rank=16,
        max_steps=300, batch_size=8, seq_len=64, anchors=24, lr=5e-3, eval_every=0,
        save_every=1000,
    )  # fmt: skip
    return train_adapter(cfg)


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The README's demo (scripts/make_tiny_model.py): a tiny chat model and its adapter."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo")
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_tiny_model.py"
    subprocess.run([sys.executable, str(script), str(out)], check=True, capture_output=True)
    return out


def answers(*docs: list[int]) -> list[tuple[list[int], list[bool]]]:
    """Documents whose every token but the first is an answer's (a target)."""
    return [(d, [False] + [True] * (len(d) - 1)) for d in docs]


def answered(base: Path, prompts: list[list[int]]) -> list[tuple[list[int], list[bool]]]:
    """Documents of what a corpus is built from: the base's greedy answers (40 tokens) to half
    the prompts, and three random texts (drafts that pass, and drafts that do not)."""
    rng = random.Random(1)
    outs = hf_greedy(base, prompts[::2], 40)
    docs = [
        (p + o, [False] * len(p) + [True] * len(o)) for p, o in zip(prompts[::2], outs, strict=True)
    ]
    return docs + answers(*[[rng.randrange(10, 200) for _ in range(40)] for _ in range(3)])


def greedy_beside_sampled(
    llm, greedy_prompts: list[list[int]], sampled_prompt: list[int], max_new_tokens: int = 40
) -> tuple[list[list[int]], list[int]]:
    """Greedy requests and one seeded sampled request in one batch: their completions."""
    greedy = [llm.make_sequence(p, max_new_tokens=max_new_tokens) for p in greedy_prompts]
    sampled = llm.make_sequence(
        sampled_prompt, max_new_tokens=max_new_tokens,
        sampling=SamplingParams(temperature=1.0, seed=5),
    )  # fmt: skip
    for seq in [*greedy, sampled]:
        llm.engine.add(seq)
    while not llm.engine.scheduler.is_finished():
        llm.engine.step()
    return [s.completion_ids for s in greedy], sampled.completion_ids


def check_chooser_leaves_sampling_alone(
    llm, chooser: str, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    """With the drafting policy's `chooser` (an attribute: draft_head, next_tokens) as loaded,
    then None: greedy requests on prompts[:3] keep `reference`, and a seeded sampled request on
    prompts[3] in the same batch draws the same text both times (choosers are for greedy drafts
    only)."""
    policy = llm.engine.policy
    loaded = getattr(policy, chooser)
    assert loaded is not None
    completions = []
    for value in (loaded, None):
        setattr(policy, chooser, value)
        greedy, sampled = greedy_beside_sampled(llm, prompts[:3], prompts[3])
        assert greedy == reference
        completions.append(sampled)
    assert completions[0] == completions[1]
