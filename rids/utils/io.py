"""Atomic file writes: a temp file in the target folder, then a rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from rids.errors import RidsError


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise RidsError(f"cannot write {path}: folder {path.parent} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise RidsError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
