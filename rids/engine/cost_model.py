"""How long a forward takes by the tokens in it, on this device, for this model.

The drafting policy weighs expected committed tokens against step time; the times come from a
short measurement (one forward per size, best of a few) that runs once per device, model shape,
dtype and adapter rank, and is cached on disk (`~/.cache/rids/step-costs/`: safe to delete, it
is measured again when missing). Never inside an answer: the engine measures before its first
step.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rids.utils.io import atomic_write_text

SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32, 64, 128)


@dataclass(slots=True)
class CostModel:
    """Seconds of one forward by tokens in it, interpolated linearly between measurements (and
    extrapolated from the last two past the largest)."""

    tokens: list[int]
    seconds: list[float]

    def time(self, n: int) -> float:
        i = min(max(bisect_left(self.tokens, n), 1), len(self.tokens) - 1)
        (t0, t1), (s0, s1) = self.tokens[i - 1 : i + 1], self.seconds[i - 1 : i + 1]
        return s0 + (s1 - s0) * (n - t0) / (t1 - t0)


def measure(
    step: Callable[[int], None], sizes: tuple[int, ...] = SIZES, repeats: int = 3,
    budget: float = 0.05,
) -> CostModel:  # fmt: skip
    """`step(n)` runs one forward of n tokens. Per size, the fastest of at least `repeats` runs
    (more while a size has taken less than `budget` seconds: cheap steps are noisy), after a
    warm-up. Interference only ever adds time, so a size slower than a larger one is an outlier:
    each time is lowered to the fastest of the sizes at or above it (non-decreasing in n)."""
    step(sizes[0])
    seconds = []
    for n in sizes:
        runs: list[float] = []
        while len(runs) < repeats or (sum(runs) < budget and len(runs) < 10 * repeats):
            t0 = time.perf_counter()
            step(n)
            runs.append(time.perf_counter() - t0)
        seconds.append(min(runs))
    for i in range(len(seconds) - 2, -1, -1):
        seconds[i] = min(seconds[i], seconds[i + 1])
    return CostModel(list(sizes), seconds)


def device_key(device: torch.device, fields: dict) -> dict:
    """What a measurement depends on: the device, torch, threads, and the model's shapes."""
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()}"
    )
    return {"device": name, "torch": torch.__version__, **fields}


def cached(path: Path, key: dict, build: Callable[[], CostModel]) -> CostModel:
    """The cost model for `key` from `path` (a folder), measured and stored if missing."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    file = path / f"{digest}.json"
    try:
        stored = json.loads(file.read_text())
        if stored.get("key") == key:
            return CostModel(stored["tokens"], stored["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    model = build()
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps({"key": key, **asdict(model)}, indent=1) + "\n")
    except OSError:  # a read-only cache only costs the measurement next time
        pass
    return model
