"""Hand a CPU's OpenMP threads from one Python thread to the next.

Every thread that runs parallel torch work on a CPU gets its own OpenMP pool, and libgomp
(torch's OpenMP) spins only about a hundred times, instead of about 300,000, before putting an
idle worker to sleep once it manages more threads than there are CPUs. So after one thread has
run torch (loading a model, a generate call) a second thread's workers sleep between the
hundreds of small parallel regions of a decode step, and each region pays a wake-up: on 2
cores such a thread decodes at about two thirds of the speed, using one core and a bit
(docs/benchmarks.md). Releasing the pool when a thread is done keeps one pool alive.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from pathlib import Path

OMP_PAUSE_HARD = 2  # omp_pause_resource_t (OpenMP 5.0): free the threads, not only idle them


@functools.cache
def _pause_resource_all() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` of the libgomp torch runs on, if one is loaded (Linux). Only
    libgomp: its hard pause frees the calling thread's pool alone, which is what is meant;
    another runtime (LLVM's libomp, Intel's) may free more, so none is called there."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line.split("/")[-1]}
    for path in sorted(paths):
        try:
            return ctypes.CDLL(path).omp_pause_resource_all
        except (AttributeError, OSError):  # a libgomp older than OpenMP 5.0
            continue
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP worker threads (recreated, at a few microseconds, by
    its next parallel region); False where the runtime cannot. Call it outside any parallel
    region, when the thread has finished a batch of torch work."""
    pause = _pause_resource_all()
    return pause is not None and pause(OMP_PAUSE_HARD) == 0
