"""How long a forward takes by the tokens in it, on this device, for this model.

The drafting policy weighs expected committed tokens against step time; the times come from a
short measurement (forwards of each size and kind of row, timed against a 1-token step in the
same round, the median of a few rounds) that runs once per device, model shape, dtype and
adapter rank, and is cached on disk (`~/.cache/rids/step-costs/`: safe to delete, it is
measured again when missing). Never inside an answer: the engine measures before its first
step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import statistics
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rids.utils.io import atomic_write_text

logger = logging.getLogger(__name__)
SIZES = (1, 2, 3, 4, 5, 7, 10, 16, 24, 32, 64, 128)
METHOD = 2  # of `measure`, part of the cache key: a model measured otherwise is measured again


@dataclass(slots=True)
class CostModel:
    """Seconds of one forward by the tokens in it: `seconds` for n tokens of which n - 1 are
    MASKs, `clean` (when measured) for n clean tokens; interpolated linearly between sizes (and
    extrapolated from the last two past the largest).

    MASK rows cost more than clean ones (the LoRA, their logits and proposals; on a 2-core CPU
    a 4-token step takes ~10 ms more with 3 MASKs than with 3 drafts to verify), so a step of c
    clean tokens and m MASKs is valued as c + m clean tokens plus the premium m MASKs cost over
    m clean tokens. Without `clean`, every token costs as in `seconds`."""

    tokens: list[int]
    seconds: list[float]
    clean: list[float] | None = None
    # the planner asks for the same few sizes thousands of times a step: tabled up to the
    # largest measured size
    clean_table: list[float] = field(init=False, repr=False, compare=False)
    premium_table: list[float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sizes = range(self.tokens[-1] + 1)
        self.clean_table = [self.interpolate(self.clean_seconds, n) for n in sizes]
        self.premium_table = [self.interpolated_premium(m) for m in sizes]

    @property
    def clean_seconds(self) -> list[float]:
        return self.seconds if self.clean is None else self.clean

    def time(self, clean: int, masks: int = 0) -> float:
        return self.clean_time(clean + masks) + self.premium(masks)

    def clean_time(self, n: int) -> float:
        if 0 <= n < len(self.clean_table):
            return self.clean_table[n]
        return self.interpolate(self.clean_seconds, n)

    def premium(self, masks: int) -> float:
        """What `masks` MASK rows cost beyond as many clean rows."""
        if 0 <= masks < len(self.premium_table):
            return self.premium_table[masks]
        return self.interpolated_premium(masks)

    def interpolated_premium(self, masks: int) -> float:
        if not masks or self.clean is None:
            return 0.0
        with_masks = self.interpolate(self.seconds, 1 + masks)
        return max(with_masks - self.interpolate(self.clean, 1 + masks), 0.0)

    def interpolate(self, seconds: list[float], n: int) -> float:
        i = min(max(bisect_left(self.tokens, n), 1), len(self.tokens) - 1)
        (t0, t1), (s0, s1) = self.tokens[i - 1 : i + 1], seconds[i - 1 : i + 1]
        return s0 + (s1 - s0) * (n - t0) / (t1 - t0)


def measure(
    step: Callable[[int, int], None], sizes: tuple[int, ...] = SIZES, rounds: int = 3,
    span: float = 3.0, small: int = 10, small_rounds: int = 9,
) -> CostModel:  # fmt: skip
    """`step(clean, masks)` runs one forward of `clean` clean tokens and `masks` MASKs. Per
    size n: 1 clean token and n - 1 MASKs, and n clean tokens (one step at n = 1). The first
    round, after a warm-up, takes sizes in order while a step costs at most `span` x the
    first (past that, time grows in proportion to the tokens and is extrapolated); `rounds`
    rounds time every size, `small_rounds` those up to `small` tokens (cheap steps, where the
    policy's choices turn on a row's few percent). A shared machine's speed drifts between
    spells of a few seconds, so each step is timed relative to its round's 1-token step, and
    a size's time is the median of its ratios times the median 1-token step: a slow spell
    scales one round, a spike spoils one ratio, and neither bends the curve. Each curve is
    then made non-decreasing by pooling adjacent sizes that are out of order (isotonic
    regression): more tokens never take less time."""

    def timed(clean: int, masks: int) -> float:
        t0 = time.perf_counter()
        step(clean, masks)
        return time.perf_counter() - t0

    def size_times(n: int) -> tuple[float, float]:
        """(1 clean + n - 1 MASKs, n clean): one step at n = 1."""
        with_masks = timed(1, n - 1)
        return with_masks, (with_masks if n == 1 else timed(n, 0))

    assert sizes[0] == 1, "sizes start at a 1-token step (each round's reference)"
    step(sizes[0], 0)
    ratios: dict[int, list[tuple[float, float]]] = {}
    ones: list[float] = []
    for r in range(max(rounds, small_rounds)):
        todo = sizes if r == 0 else [n for n in ratios if r < rounds or n <= small]
        one = 0.0
        for n in todo:
            m, c = size_times(n)
            one = one or m  # sizes[0] = 1 comes first
            ratios.setdefault(n, []).append((m / one, c / one))
            if r == 0 and m > span * one:
                break
        ones.append(one)
    one = statistics.median(ones)
    measured = list(ratios)
    masked = [one * statistics.median(m for m, _ in ratios[n]) for n in measured]
    clean = [one * statistics.median(c for _, c in ratios[n]) for n in measured]
    return CostModel(measured, non_decreasing(masked), non_decreasing(clean))


def non_decreasing(values: list[float]) -> list[float]:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    pools: list[tuple[float, int]] = []  # (mean, count)
    for v in values:
        pools.append((v, 1))
        while len(pools) > 1 and pools[-2][0] > pools[-1][0]:
            (m1, n1), (m2, n2) = pools.pop(-2), pools.pop()
            pools.append(((m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2))
    return [m for m, n in pools for _ in range(n)]


def device_key(device: torch.device, fields: dict) -> dict:
    """What a measurement depends on: the device, torch, threads, and the model's shapes."""
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()}"
    )
    return {"device": name, "torch": torch.__version__, "method": METHOD, **fields}


def cached(path: Path, key: dict, build: Callable[[], CostModel]) -> CostModel:
    """The cost model for `key` from `path` (a folder), measured and stored if missing."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    file = path / f"{digest}.json"
    try:
        stored = json.loads(file.read_text())
        if stored.get("key") == key:  # a file from before `clean` is measured again
            return CostModel(stored["tokens"], stored["seconds"], stored["clean"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    logger.info("measuring step times on this device (once: cached in %s)", path)
    model = build()
    try:
        path.mkdir(parents=True, exist_ok=True)
        stored = {
            "key": key,
            "tokens": model.tokens,
            "seconds": model.seconds,
            "clean": model.clean,
        }
        atomic_write_text(file, json.dumps(stored, indent=1) + "\n")
    except OSError:  # a read-only cache only costs the measurement next time
        pass
    return model
