"""Which token id is MASK: adapter metadata, then base config, tokenizer, architecture default."""

from __future__ import annotations

from rids.config import ModelConfig
from rids.errors import RidsError

MASK_TOKEN = "<|MASK|>"
# The public I-DLM server hard-codes these (Qwen3: the row after </think> = 151668).
DEFAULT_MASK_IDS = {"qwen3": 151669}


def tokenizer_mask_id(tokenizer) -> int | None:
    if tokenizer is None:
        return None
    return tokenizer.get_vocab().get(MASK_TOKEN)


def resolve_mask_token_id(
    config: ModelConfig, adapter_mask_id: int | None, tokenizer
) -> tuple[int, str]:
    """Return (mask id, where it came from); one-line error if there is none or it is unusable."""
    sources = (  # looked up in order, each only if the ones before name no id
        ("the adapter", lambda: adapter_mask_id),
        ("the base config", lambda: config.mask_token_id),
        (f"the tokenizer's {MASK_TOKEN}", lambda: tokenizer_mask_id(tokenizer)),  # whole vocab
        (f"the {config.model_type} default", lambda: DEFAULT_MASK_IDS.get(config.model_type)),
    )
    for source, lookup in sources:
        mask_id = lookup()
        if mask_id is None:
            continue
        if not 0 <= int(mask_id) < config.vocab_size:
            raise RidsError(
                f"MASK token id {mask_id} (from {source}) is outside the base's embedding table "
                f"({config.vocab_size} rows); set mask_token_id to a valid row"
            )
        return int(mask_id), source
    raise RidsError(
        "no MASK token: set mask_token_id in the adapter's rids.json or the base's config.json, "
        f"add {MASK_TOKEN} to the tokenizer, or train with --mask-token (e.g. an unused special "
        "token)"
    )
