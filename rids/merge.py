"""Merging: fold an adapter into its base (plain ISD, not lossless), or combine adapters.

- `fold_adapter`: PEFT's own `merge_and_unload` adds the LoRA (and the MASK row) to the base
  weights *everywhere*; the result is a standalone HF checkpoint with `mask_token_id` in its
  config, which rids runs in plain ISD mode (MASKs through the same weights, no gate). Its clean
  positions are no longer the base's: greedy output is lossless only against itself.
- `combine_adapters`: weighted sum of adapters trained for one base, either exact
  (concatenated ranks: A = [A_1; A_2], B = [w_1 s_1 B_1, w_2 s_2 B_2], scaling 1) or by SVD of
  the summed delta to a target rank (the best rank-r approximation, not exact).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from rids.adapter import Adapter, load_adapter, save_adapter
from rids.errors import RidsError
from rids.layers.linear import LoraWeights, RowOverride
from rids.llm import LLM
from rids.mask_token import resolve_mask_token_id


def fold_adapter(base: str | Path, adapter: str | Path, output: Path, shard_size: str = "2GB"):
    """Write base + adapter (applied everywhere) as an HF checkpoint to `output`, atomically."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    llm = LLM(base, adapter)  # resolves paths, validates the pair, finds the MASK id
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise RidsError(f"--output {output} exists and is not empty; choose a new folder")
    model = AutoModelForCausalLM.from_pretrained(llm.base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, llm.adapter.path).merge_and_unload()
    merged.config.mask_token_id = llm.mask_token_id
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}."))
    try:
        merged.save_pretrained(tmp, max_shard_size=shard_size)
        if llm.tokenizer is not None:
            llm.tokenizer.save_pretrained(tmp)
        meta = dict(llm.adapter.metadata, merged_from={"base": str(base), "adapter": str(adapter)})
        (tmp / "rids.json").write_text(json.dumps(meta, indent=2) + "\n")
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def combine_adapters(
    llm: LLM,
    paths: list[str | Path],
    weights: list[float],
    output: Path,
    method: str = "cat",
    rank: int | None = None,
) -> Path:
    """Combine adapters for `llm`'s base into one adapter at `output`."""
    if len(paths) < 2:
        raise RidsError("combining needs at least two --adapter")
    if len(weights) != len(paths):
        raise RidsError(f"{len(weights)} --weights for {len(paths)} adapters")
    if method not in ("cat", "svd"):
        raise RidsError(f"--method must be cat or svd, got {method!r}")
    adapters = [load_adapter(Path(p), llm.model) for p in paths]
    masks = {resolve_mask_token_id(llm.config, a.mask_token_id, llm.tokenizer)[0] for a in adapters}
    if len(masks) > 1:
        raise RidsError(f"the adapters use different MASK tokens {sorted(masks)}; cannot combine")
    loras = {}
    for name in sorted({n for a in adapters for n in a.loras}):
        parts = [
            (a.loras[name], w) for a, w in zip(adapters, weights, strict=True) if name in a.loras
        ]
        A = torch.cat([p.A.float() for p, _ in parts])
        B = torch.cat([p.B.float() * p.scaling * w for p, w in parts], dim=1)
        if method == "svd":
            A, B = svd_factors(B @ A, rank or max(p.A.shape[0] for p, _ in parts))
        loras[name] = LoraWeights(A, B, 1.0)
    overrides = {}
    for name in sorted({n for a in adapters for n in a.overrides}):
        rows = [
            (a.overrides[name], w)
            for a, w in zip(adapters, weights, strict=True)
            if name in a.overrides
        ]
        ids = rows[0][0].ids
        if any(not torch.equal(o.ids, ids) for o, _ in rows):
            raise RidsError(f"the adapters replace different rows of {name}; cannot combine")
        total = sum(w for _, w in rows)
        overrides[name] = RowOverride(ids, sum(o.values.float() * w for o, w in rows) / total)
    r = max(w.A.shape[0] for w in loras.values())
    config = {"r": r, "lora_alpha": r}
    config["base_model_name_or_path"] = adapters[0].config.get("base_model_name_or_path")
    pattern = {n: w.A.shape[0] for n, w in loras.items() if w.A.shape[0] != r}
    if pattern:  # PEFT scales these by alpha / r_module = r / r_module: store B divided by it
        config["rank_pattern"] = pattern
        for n, rm in pattern.items():
            loras[n] = LoraWeights(loras[n].A, loras[n].B * rm / r, r / rm)
    meta = dict(adapters[0].metadata, mask_token_id=masks.pop(), method=method, weights=weights)
    meta["combined_from"] = [str(p) for p in paths]
    return save_adapter(Adapter(None, config, meta, loras, overrides), output)


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r, in], B [out, r] with B A the best rank-r approximation of delta [out, in]."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    r = min(rank, S.numel())
    return Vh[:r].contiguous(), (U[:, :r] * S[:r]).contiguous()
