"""Build a tiny random Qwen3 base and a random gated LoRA adapter for it (seeded, ~2 s on CPU).

    python scripts/make_tiny_model.py out/tiny   # writes out/tiny/base and out/tiny/adapter

The adapter's weights are random, so its drafts are almost never accepted (TPF ~1): this pair
demonstrates losslessness, not speed. Trained adapters come from `rids train-adapter`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rids.tiny import build_random_adapter, build_tiny_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder (base/ and adapter/ go inside)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    base = build_tiny_base(args.out / "base", seed=args.seed)
    adapter = build_random_adapter(args.out / "adapter", base, seed=args.seed)
    print(f"base: {base}\nadapter: {adapter}")


if __name__ == "__main__":
    main()
