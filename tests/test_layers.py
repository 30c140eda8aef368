"""The gated layers against their definitions, written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rids.layers.linear as linear_module
from rids.errors import RidsError
from rids.layers.embedding import GatedEmbedding
from rids.layers.linear import GatedLinear, LoraWeights, RowOverride, linear
from rids.utils.io import atomic_write_text


def test_linear_matches_f_linear_with_and_without_grad():
    torch.manual_seed(0)
    x, w, b = torch.randn(7, 48), torch.randn(80, 48), torch.randn(80)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=0)
    w.requires_grad_(True)
    linear(x, w, b).sum().backward()  # training falls back to F.linear, which has autograd
    torch.testing.assert_close(w.grad, torch.ones(7, 80).T @ x)


def fused_qkv(dtype: torch.dtype = torch.float32) -> tuple[GatedLinear, dict[str, LoraWeights]]:
    torch.manual_seed(1)
    layer = GatedLinear(16, [12, 4, 4], bias=True, shard_names=("q", "k", "v")).to(dtype)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    loras = {
        "q": LoraWeights(torch.randn(3, 16), torch.randn(12, 3), 0.5),
        "v": LoraWeights(torch.randn(2, 16), torch.randn(4, 2), 2.0),
    }
    layer.set_lora(loras)
    return layer, loras


@torch.inference_mode()
def test_gated_linear_applies_each_shard_lora_on_gated_rows_only():
    layer, loras = fused_qkv()
    x = torch.randn(5, 16)
    y = layer(x, 2)  # the last two rows are gated
    want = F.linear(x, layer.weight, layer.bias)
    for shard, w in loras.items():
        want[3:, layer.out_slice(shard)] += w.scaling * (x[3:] @ w.A.T) @ w.B.T
    torch.testing.assert_close(y, want, atol=1e-5, rtol=0)
    assert torch.equal(y[:3], layer(x)[:3])  # gate 0: bitwise the base output
    assert torch.equal(layer(x, 0), layer(x))


@torch.inference_mode()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 7, 20])
def test_packed_weights_keep_the_gate(rows, dtype):
    """CPU inference through one oneDNN-packed copy, [W; A] (every step one GEMM): the same
    delta on the gated rows, and clean rows bit for bit what the packed base weight alone gives
    them, in steps with and without MASK rows (the gate holds whatever the kernel); bfloat16
    is packed too where the CPU has native kernels for it."""
    if not linear_module.packable(torch.empty(0, dtype=dtype)):
        pytest.skip(f"this CPU build does not pack {dtype}")
    layer, loras = fused_qkv(dtype)
    x = torch.randn(rows + 2, 16, dtype=dtype)
    want = layer(x, 2)
    atol = 1e-5 if dtype == torch.float32 else 0.25  # bf16: one rounding of values up to ~30
    base = GatedLinear(16, [12, 4, 4], bias=True, shard_names=("q", "k", "v")).to(dtype)
    base.load_state_dict(layer.state_dict())
    base.prepack()
    layer.prepack()
    assert layer.packed_rank == 5
    got = layer(x, 2)
    torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert torch.equal(got[:-2], base(x)[:-2])
    assert torch.equal(layer(x, 0), base(x))
    layer.set_lora(loras)  # a new adapter is packed again
    torch.testing.assert_close(layer(x, 2), want, atol=atol, rtol=0)
    layer.clear_adapter()  # the base weight alone, packed
    assert layer.packed_rank == 0 and torch.equal(layer(x, 2), base(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_at_model_shapes_and_with_a_trainable_lora(dtype):
    """At SmolLM2's q/k/v shapes (every thread the suite runs with), [W; A] leaves the base
    columns bit for bit; a trainable LoRA, installed per micro-batch by a trainer, keeps the
    weight's packed copy instead of packing it again."""
    if not linear_module.packable(torch.empty(0, dtype=dtype)):
        pytest.skip(f"this CPU build does not pack {dtype}")
    torch.manual_seed(2)
    layer = GatedLinear(576, [576, 192, 192], shard_names=("q", "k", "v")).to(dtype)
    layer.weight.data.normal_(std=0.02)
    layer.prepack()
    x = torch.randn(9, 576, dtype=dtype)
    with torch.inference_mode():
        base = layer(x)
    packed = layer.packed
    lora = {s: LoraWeights(torch.randn(16, 576, requires_grad=True), torch.randn(d, 16), 1.0)
            for s, d in (("q", 576), ("k", 192), ("v", 192))}  # fmt: skip
    layer.set_lora(lora)
    assert layer.packed is packed and layer.packed_rank == 0
    with torch.no_grad():
        layer.set_lora({s: LoraWeights(w.A.detach(), w.B, w.scaling) for s, w in lora.items()})
    assert layer.packed_rank == 48
    with torch.inference_mode():
        for rows in (1, 2, 7, 9):
            assert torch.equal(layer(x[:rows], 0), base[:rows])
            assert torch.equal(layer(x[:rows], 1)[:-1], base[: rows - 1])


@torch.inference_mode()
def test_gated_linear_row_override_replaces_output_features():
    layer = GatedLinear(8, 10)
    layer.weight.data.normal_()
    new = torch.randn(2, 8)
    layer.row_override = RowOverride(torch.tensor([3, 7]), new)
    x = torch.randn(4, 8)
    y = layer(x, 1)
    weight = layer.weight.clone()
    weight[[3, 7]] = new
    torch.testing.assert_close(y[3], x[3] @ weight.T, atol=1e-5, rtol=0)
    assert torch.equal(y[:3], layer(x)[:3])


@torch.inference_mode()
def test_gated_embedding_override_and_lora():
    emb = GatedEmbedding(20, 6)
    emb.weight.data.normal_()
    mask_row = torch.randn(1, 6)
    emb.row_override = RowOverride(torch.tensor([19]), mask_row)
    emb.lora = LoraWeights(torch.randn(2, 20), torch.randn(6, 2), 0.25)
    ids = torch.tensor([3, 19, 19, 5])
    out = emb(ids, 2)  # the last two tokens are gated
    lora = lambda i: 0.25 * emb.lora.A[:, i] @ emb.lora.B.T  # noqa: E731
    torch.testing.assert_close(out[2], mask_row[0] + lora(19))
    torch.testing.assert_close(out[3], emb.weight[5] + lora(5))
    assert torch.equal(out[:2], emb.weight[[3, 19]])  # gate 0: the base row, even for MASK


def test_atomic_write_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_text(target, "one")
    assert target.read_text() == "one"
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    with pytest.raises(RidsError, match="does not exist"):
        atomic_write_text(tmp_path / "no" / "r.json", "x")
