"""Load a PEFT LoRA adapter, check it against the base, and install it as a gated adapter.

Supported: LoRA on any linear projection (q/k/v/o/gate/up/down, lm_head) and on embed_tokens,
`r`, `lora_alpha`, `use_rslora`, `rank_pattern`, `modules_to_save` and `trainable_token_indices`
(the usual ways an adapter carries a trained MASK embedding). Every delta is gated per token.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rids.engine.draft_corpus import FILENAME as CORPUS_FILE
from rids.engine.draft_corpus import DraftCorpus
from rids.engine.draft_head import FILENAME as DRAFT_HEAD_FILE
from rids.engine.draft_head import DraftHead
from rids.engine.next_tokens import FILENAME as NEXT_TOKENS_FILE
from rids.engine.next_tokens import NextTokenCounts
from rids.errors import RidsError
from rids.layers.embedding import GatedEmbedding
from rids.layers.linear import GatedLinear, LoraWeights, RowOverride
from rids.models.qwen3 import Qwen3ForCausalLM
from rids.utils.io import publish
from rids.utils.loader import read_json

PEFT_PREFIX = "base_model.model."
RIDS_METADATA = "rids.json"  # rids' own metadata beside adapter_config.json
UNSUPPORTED = ("use_dora", "alpha_pattern", "lora_bias", "use_qalora", "megatron_config")
_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<lora>lora_A|lora_B)\.weight|(?P<emb>lora_embedding_A|lora_embedding_B)"
    r"|token_adapter\.trainable_tokens_delta|(?P<base>base_layer\.weight)|(?P<full>weight))$"
)


@dataclass
class Adapter:
    path: Path | None  # None: made in memory (training)
    config: dict
    metadata: dict
    loras: dict[str, LoraWeights] = field(default_factory=dict)  # HF module path -> LoRA
    overrides: dict[str, RowOverride] = field(default_factory=dict)  # embed_tokens / lm_head
    corpus: DraftCorpus | None = None  # the base's earlier answers, for corpus drafts ...
    next_tokens: NextTokenCounts | None = None  # ... to choose MASK drafts with ...
    draft_head: DraftHead | None = None  # ... or, where it has one, with its draft head

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def mask_token_id(self) -> int | None:
        return self.metadata.get("mask_token_id", self.config.get("mask_token_id"))

    @property
    def stride(self) -> int | None:
        return self.metadata.get("stride")

    def parameters(self) -> list[torch.Tensor]:
        """Every tensor of the adapter (LoRA A and B, replacement rows), ordered by name."""
        out = [t for n in sorted(self.loras) for t in (self.loras[n].A, self.loras[n].B)]
        return out + [self.overrides[n].values for n in sorted(self.overrides)]


def read_adapter_files(path: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    if not path.is_dir():
        raise RidsError(f"adapter folder {path} does not exist")
    if not (path / "adapter_config.json").is_file():
        raise RidsError(f"{path} is not a PEFT adapter: it has no adapter_config.json")
    config = read_json(path / "adapter_config.json")
    meta = read_json(path / RIDS_METADATA) if (path / RIDS_METADATA).is_file() else {}
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        try:
            return config, meta, load_file(weights)
        except (SafetensorError, OSError) as e:
            raise RidsError(f"{weights} is corrupt ({e}); re-download or re-train it") from None
    if (path / "adapter_model.bin").is_file():
        try:
            return config, meta, torch.load(path / "adapter_model.bin", weights_only=True)
        except Exception as e:
            raise RidsError(f"{path}/adapter_model.bin is corrupt ({e})") from None
    raise RidsError(f"{path} has no adapter_model.safetensors")


def load_adapter(path: Path, model: Qwen3ForCausalLM, draft_head: bool = True) -> Adapter:
    """Read an adapter and check it against `model`: each mismatch is one line naming both
    (`draft_head=False`: leave out the draft head beside it, which is about to be retrained)."""
    config, meta, tensors = read_adapter_files(path)
    if config.get("peft_type", "LORA") != "LORA":
        raise RidsError(f"{path} is a {config.get('peft_type')} adapter; rids needs a LoRA adapter")
    for key in UNSUPPORTED:
        if config.get(key):
            raise RidsError(f"{path}: adapter option {key!r} is not supported by rids")
    if int(config.get("r", 0)) < 1:
        raise RidsError(f"{path}: adapter rank r must be >= 1, got {config.get('r')}")
    check_base_hash(path, meta, model)
    corpus, next_tokens = path / CORPUS_FILE, path / NEXT_TOKENS_FILE
    head, hidden = path / DRAFT_HEAD_FILE, model.config.hidden_size
    adapter = Adapter(
        path, config, meta,
        corpus=DraftCorpus.load(corpus, model.config.vocab_size) if corpus.is_file() else None,
        next_tokens=NextTokenCounts.load(next_tokens) if next_tokens.is_file() else None,
        draft_head=DraftHead.load(head, hidden) if draft_head and head.is_file() else None,
    )  # fmt: skip
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX).replace(".default", "")
        m = _KEY.match(name)
        if m is None:
            raise RidsError(f"{path}: unrecognised adapter tensor {key!r}")
        if m["base"]:
            continue  # the base's own weights, saved by PEFT beside an embedding LoRA
        locate(model, m["module"], path)
        kind = m["lora"] or m["emb"] or ("full" if m["full"] else "tokens")
        pairs.setdefault(m["module"], {})[kind] = tensor
    for name, parts in pairs.items():
        module, shard = model.resolve(name)
        if "full" in parts or "tokens" in parts:
            adapter.overrides[name] = row_override(name, module, parts, config, path)
        if len(parts.keys() & {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}):
            adapter.loras[name] = lora_weights(name, module, shard, parts, config, path)
    if not adapter.loras and not adapter.overrides:
        raise RidsError(f"{path}: the adapter holds no LoRA weights")
    return adapter


def locate(model: Qwen3ForCausalLM, name: str, path: Path) -> torch.nn.Module:
    layer = re.match(r"model\.layers\.(\d+)\.", name)
    if layer and int(layer[1]) >= model.config.num_hidden_layers:
        raise RidsError(
            f"{path}: adapter has weights for layer {layer[1]}, the base has "
            f"{model.config.num_hidden_layers} layers; it was trained for another base"
        )
    try:
        module, _ = model.resolve(name)
    except AttributeError:
        raise RidsError(
            f"{path}: adapter targets {name!r}, which a {model.config.model_type} base does not "
            "have (rids supports q/k/v/o/gate/up/down_proj, embed_tokens, lm_head)"
        ) from None
    if not isinstance(module, (GatedLinear, GatedEmbedding)):
        raise RidsError(f"{path}: adapter targets {name!r}, which is not a linear or embedding")
    return module


def lora_weights(
    name: str,
    module: torch.nn.Module,
    shard: str | None,
    parts: dict[str, torch.Tensor],
    config: dict,
    path: Path,
) -> LoraWeights:
    emb = isinstance(module, GatedEmbedding)
    a_key, b_key = ("lora_embedding_A", "lora_embedding_B") if emb else ("lora_A", "lora_B")
    if a_key not in parts or b_key not in parts:
        raise RidsError(f"{path}: {name} lacks {a_key} or {b_key}; the adapter is incomplete")
    A, B = parts[a_key], parts[b_key]
    if emb:
        in_dim, out_dim = module.weight.shape  # A [r, vocab], B [dim, r]
    else:
        in_dim, out_dim = module.in_features, module.shard_size(shard)
    what = {"in": ("vocab_size" if emb else "input size"), "out": "output size"}
    if A.shape[1] != in_dim:
        raise RidsError(
            f"{path}: {name} LoRA A has {what['in']} {A.shape[1]}, the base has {in_dim}; "
            "the adapter was trained for another base"
        )
    if B.shape[0] != out_dim:
        raise RidsError(
            f"{path}: {name} LoRA B has {what['out']} {B.shape[0]}, the base has {out_dim}; "
            "the adapter was trained for another base"
        )
    rank = A.shape[0]
    if B.shape[1] != rank or (not config.get("rank_pattern") and rank != int(config["r"])):
        raise RidsError(
            f"{path}: {name} has LoRA rank {rank} (B: {B.shape[1]}) but adapter_config.json "
            f"says r={config['r']}; the adapter files disagree"
        )
    alpha = float(config.get("lora_alpha", rank))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    dtype, device = module.weight.dtype, module.weight.device
    return LoraWeights(A.to(device, dtype), B.to(device, dtype), scaling)


def row_override(
    name: str, module: torch.nn.Module, parts: dict[str, torch.Tensor], config: dict, path: Path
) -> RowOverride:
    base = module.weight
    if "tokens" in parts:
        table = config.get("trainable_token_indices") or {}
        leaf = name.rpartition(".")[2]
        ids = table.get(leaf) if isinstance(table, dict) else table
        if ids is None:
            raise RidsError(f"{path}: trainable tokens for {name} but no trainable_token_indices")
        values = parts["tokens"]
        ids = torch.tensor(ids, dtype=torch.long)
    else:  # modules_to_save: keep only the rows that differ from the base
        full = parts["full"]
        if full.shape != base.shape:
            raise RidsError(
                f"{path}: {name} replacement has shape {tuple(full.shape)}, the base has "
                f"{tuple(base.shape)}; the adapter was trained for another base"
            )
        ids = (full.to(base.device, base.dtype) != base).any(1).nonzero().flatten().cpu()
        values = full[ids]
    out_of_range = len(ids) and int(ids.max()) >= base.shape[0]
    if values.shape != (len(ids), base.shape[1]) or out_of_range:
        raise RidsError(f"{path}: {name} token rows do not fit the base's {tuple(base.shape)}")
    return RowOverride(ids.to(base.device), values.to(base.device, base.dtype))


def base_config_hash(model: Qwen3ForCausalLM) -> str:
    """A short hash of the shape fields an adapter depends on."""
    fields = model.config.shape_summary() | {"model_type": model.config.model_type}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def check_base_hash(path: Path, meta: dict, model: Qwen3ForCausalLM) -> None:
    want = meta.get("base_config_hash")
    if want and want != base_config_hash(model):
        raise RidsError(
            f"{path} was trained for base {meta.get('base', '?')!r} (config hash {want}), "
            f"which is not this base (hash {base_config_hash(model)}); pass the matching --base"
        )


def save_adapter(adapter: Adapter, path: Path) -> Path:
    """Write `adapter` in PEFT format (plus rids.json) to `path`, atomically (temp + rename)."""
    from peft import LoraConfig

    tensors = {}
    for name, w in adapter.loras.items():
        a, b = (
            ("lora_embedding_A", "lora_embedding_B")
            if "embed_tokens" in name
            else ("lora_A", "lora_B")
        )
        suffix = "" if "embed_tokens" in name else ".weight"
        tensors[f"{PEFT_PREFIX}{name}.{a}{suffix}"] = w.A
        tensors[f"{PEFT_PREFIX}{name}.{b}{suffix}"] = w.B
    for name, o in adapter.overrides.items():
        tensors[f"{PEFT_PREFIX}{name}.token_adapter.trainable_tokens_delta"] = o.values
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    config = LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.config["lora_alpha"],
        target_modules=sorted({n.rpartition(".")[2] for n in adapter.loras}),
        trainable_token_indices={
            n.rpartition(".")[2]: o.ids.tolist() for n, o in adapter.overrides.items()
        }
        or None,
        base_model_name_or_path=adapter.config.get("base_model_name_or_path"),
        rank_pattern=adapter.config.get("rank_pattern") or {},
    )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path, prefix=".tmp-"))
    try:  # each file is written whole, then renamed into place
        config.save_pretrained(tmp)
        save_file(tensors, tmp / "adapter_model.safetensors")
        (tmp / RIDS_METADATA).write_text(json.dumps(adapter.metadata, indent=2) + "\n")
        for f in ("adapter_model.safetensors", "adapter_config.json", RIDS_METADATA):
            publish(tmp / f, path / f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def apply_adapter(model: Qwen3ForCausalLM, adapter: Adapter) -> None:
    """Install the adapter's LoRA and replacement rows into the gated layers, replacing what
    was there (a layer the adapter leaves alone is cleared; one it adapts is set directly, so a
    packed layer is packed once, not for the cleared state in between)."""
    grouped: dict[int, dict] = {}
    for name, lora in adapter.loras.items():
        module, shard = model.resolve(name)
        grouped.setdefault(id(module), {})[shard] = lora
    for module in model.modules():
        if not isinstance(module, (GatedLinear, GatedEmbedding)):
            continue
        loras = grouped.get(id(module))
        if loras is None:
            module.clear_adapter()
        elif isinstance(module, GatedEmbedding):
            module.lora, module.row_override = loras[None], None
        else:
            module.row_override = None
            module.set_lora(loras)
    for name, override in adapter.overrides.items():
        model.resolve(name)[0].row_override = override
