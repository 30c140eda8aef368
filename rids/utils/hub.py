"""Find a model or adapter: a local folder first, then the Hugging Face cache, then the hub."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

from rids.errors import RidsError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]


def resolve_path(name_or_path: str | os.PathLike, what: str = "model") -> Path:
    """Return a local folder holding `name_or_path` (a path, or a hub repo id)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RidsError(f"{what} path {path} is a file; pass the folder that holds it")
        return path
    repo = str(name_or_path)
    if repo.count("/") != 1 or repo.startswith((".", "/", "~")):
        raise RidsError(f"{what} {repo!r} not found: no such folder, and not a hub id (org/name)")
    try:
        return Path(snapshot_download(repo, allow_patterns=WEIGHT_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, HfHubHTTPError, ValueError):
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise RidsError(
            f"{what} {repo!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
            "download it first or pass a local folder"
        )
    try:
        return Path(snapshot_download(repo, allow_patterns=WEIGHT_PATTERNS))
    except Exception as e:  # network, auth, missing repo: all end the same way for the user
        raise RidsError(
            f"{what} {repo!r} is neither a local folder nor in the Hugging Face cache, and the "
            f"hub could not be reached ({type(e).__name__}); download it or pass a local folder"
        ) from None
