"""Huge pages for large CPU tensors: requested on importing rids, the user's choice kept."""

from __future__ import annotations

import os
import subprocess
import sys

from rids.utils import huge_pages


def imported_value(env: dict[str, str]) -> str:
    code = "import rids, os; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True)  # fmt: skip
    return done.stdout.strip()


def test_importing_rids_asks_for_huge_pages_unless_the_user_chose():
    env = {k: v for k, v in os.environ.items() if k != huge_pages.VARIABLE}
    assert imported_value(env) == "1"
    assert imported_value({**env, huge_pages.VARIABLE: "0"}) == "0"
