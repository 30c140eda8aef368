"""An LLM built on one thread generates on another at full speed: the build and every generate
call free their thread's OpenMP workers (`rids.utils.openmp`), so two pools never compete for
the cores. Timings belong in benchmarks (docs/benchmarks.md); these check the mechanism."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest
import torch

from rids.llm import LLM
from rids.utils.openmp import release_thread_pool

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or torch.get_num_threads() < 2,
    reason="counts OpenMP worker threads in /proc (Linux, two or more torch threads)",
)


def os_threads(expected: int | None = None) -> int:
    """This process' threads; with `expected`, after waiting up to a second for freed OpenMP
    workers to exit (a pause returns once they leave their barrier, not once they are gone)."""
    deadline = time.monotonic() + 1.0
    while True:
        count = len(os.listdir("/proc/self/task"))
        if expected is None or count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.001)


def idle_threads() -> int:
    """This process' threads once freed workers have exited (the count holds for 20 ms)."""
    count = os_threads()
    while True:
        time.sleep(0.02)
        now = os_threads()
        if now == count:
            return count
        count = now


def parallel_torch_work() -> None:
    """Work torch runs on its OpenMP pool (creating this thread's pool if it has none)."""
    x = torch.randn(256, 1024)
    for _ in range(3):
        x = torch.tanh(x @ x.T @ x / 1024)


def test_releasing_frees_this_threads_workers():
    release_thread_pool()
    without = idle_threads()
    parallel_torch_work()
    assert os_threads() > without  # the pool's workers
    assert release_thread_pool()
    assert os_threads(without) == without


def test_build_and_generate_leave_no_workers_behind(tiny_base, tiny_adapter, prompt_ids, reference):
    release_thread_pool()
    without = idle_threads()
    llm = LLM(tiny_base, tiny_adapter)
    assert os_threads(without) == without
    outs = llm.generate(prompt_ids, max_new_tokens=48)
    assert os_threads(without) == without
    results: list = []
    worker = threading.Thread(
        target=lambda: results.append(llm.generate(prompt_ids, max_new_tokens=48))
    )
    worker.start()
    worker.join()
    assert [o.token_ids for o in outs] == [o.token_ids for o in results[0]] == reference


def test_a_failed_generate_frees_the_workers_too(tiny_base, prompt_ids):
    llm = LLM(tiny_base)
    release_thread_pool()
    without = idle_threads()

    def fail(*args, **kwargs):
        parallel_torch_work()
        raise RuntimeError("boom")

    llm.engine.step = fail
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate(prompt_ids[:1], max_new_tokens=8)
    assert os_threads(without) == without
