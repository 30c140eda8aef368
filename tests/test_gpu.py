"""On a GPU only (`pytest -m gpu`, run by scripts/gpu_check.sh; deselected elsewhere): the
flashinfer backend against the torch backend, and CUDA-graph replays against eager steps.

bf16 and fp16 round differently per kernel and per shape, so logits are compared within a
tolerance relative to their scale, and generations within a token agreement bound: random
weights give near-ties everywhere (docs/numerics.md).
"""

from __future__ import annotations

import pytest
import torch

from rids.llm import LLM
from tests.test_runner import make_entries

pytestmark = pytest.mark.gpu
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def device() -> str:
    assert CUDA, "the gpu tests need CUDA"
    pytest.importorskip("flashinfer")  # carried as wheels by scripts/gpu_check.sh
    return "cuda"


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 2e-2) -> bool:
    scale = b.float().abs().max().clamp(min=1e-6)
    return bool(((a.float() - b.float()).abs().max() / scale) <= rel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flashinfer_matches_the_torch_backend(tiny_base, tiny_adapter, prompt_ids, device, dtype):
    kw = dict(device=device, dtype=dtype, page_size=16, cuda_graphs="off")
    fast = LLM(tiny_base, tiny_adapter, attention_backend="flashinfer", **kw)
    plain = LLM(tiny_base, tiny_adapter, attention_backend="torch", **kw)
    assert type(fast.engine.runner.backend).__name__ == "FlashInferBackend"
    for llm_a, llm_b in ((fast, plain),):
        a = llm_a.engine.runner.run(make_entries(llm_a, prompt_ids))[1]
        b = llm_b.engine.runner.run(make_entries(llm_b, prompt_ids))[1]
        assert close(a.verify, b.verify) and close(a.masks, b.masks)


def test_cuda_graph_steps_match_eager_steps(tiny_base, tiny_adapter, prompt_ids, device):
    graphs = LLM(tiny_base, tiny_adapter, device=device, dtype=torch.bfloat16, cuda_graphs="on")
    eager = LLM(tiny_base, tiny_adapter, device=device, dtype=torch.bfloat16, cuda_graphs="off")
    assert graphs.engine.runner.graphs is not None and eager.engine.runner.graphs is None
    a = graphs.engine.runner.run(make_entries(graphs, prompt_ids))
    b = eager.engine.runner.run(make_entries(eager, prompt_ids))[1]
    assert a[0].attn is None  # replayed from a graph
    assert close(a[1].verify, b.verify)
    real = torch.cat([a[1].masks[r] for r in a[0].inputs.mask_rows])
    assert close(real, b.masks)


def test_graph_generation_agrees_with_eager(tiny_base, tiny_adapter, prompt_ids, device):
    kw = dict(device=device, dtype=torch.bfloat16, drafting="fixed", branches="off")
    runs = {}
    for graphs in ("on", "off"):
        llm = LLM(tiny_base, tiny_adapter, cuda_graphs=graphs, **kw)
        runs[graphs] = [o.token_ids for o in llm.generate(prompt_ids, max_new_tokens=32)]
    same = sum(a == b for a, b in zip(runs["on"], runs["off"], strict=True))
    assert same >= len(prompt_ids) - 2, runs  # near-ties of a random model may flip a token
