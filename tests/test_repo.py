"""The README's two commands are what CI and newcomers run."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())[:2]


def test_readme_starts_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    install, tests = readme_commands()
    assert text.index(install) < 400  # the very first lines
    assert "pip install torch==2.13.0" in install and install.endswith("rids chat")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = readme_commands()
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_the_shipped_adapter_stays_small():
    """The embedded adapter travels in the package: under 30 MB (issue 18)."""
    folder = ROOT / "adapters" / "smollm2-135m-instruct-rids"
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert 1e6 < size < 30e6, size


@pytest.mark.parametrize("script", sorted((ROOT / "scripts").glob("*.py")), ids=lambda p: p.name)
def test_every_script_still_imports(script: Path, monkeypatch):
    """Benchmarks nobody runs in CI rot quietly (load_test.py once imported a helper that had
    been removed): each script's imports must resolve, as when run from `scripts/`."""
    monkeypatch.syspath_prepend(str(script.parent))
    module = importlib.import_module(script.stem)
    assert callable(module.main)
