"""Build the embedded adapter's training data: chat requests answered by the base (offline, seeded).

    python scripts/build_chat_data.py out/embedded/data                  # embedded SmolLM2
    python scripts/build_chat_data.py out/data --base DIR --num-written 500 --num-templated 500
    python scripts/build_chat_data.py out/human --seeds prompts/train_chat.txt \
        --num-written 0 --num-templated 0                                 # hand-written only

Requests: hand-written ones (`--seeds`, prompts/train_seeds.txt by default; they are also the
base's few-shot examples), domain templates, and requests the base writes itself
(`rids.train.synthetic`); deduplicated, and any request that shares a topic word with the
held-out sets (prompts/heldout_chat.jsonl, prompts/adversarial.jsonl) is dropped.
The base answers each greedily; a share then gets a follow-up turn, answered the same way.
Writes WORK/requests.json (first turns), then WORK/chats.jsonl (one {"messages": [...]} a line,
ready for `rids train-adapter --data`). Each stage is skipped when its file exists, and the
written requests (WORK/written.jsonl, a batch a line) and the answers are saved as they come, so
an interrupted run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.progress import Progress

from rids.embedded import default_base
from rids.llm import LLM
from rids.train import synthetic
from rids.utils.io import atomic_write_text

CHUNK = 256


def build_requests(llm: LLM, args: argparse.Namespace, bar: Progress) -> list[str]:
    seeds = [request for path in args.seeds for request in synthetic.seed_requests(path)]
    task = bar.add_task("base-written requests", total=args.num_written)
    path = args.work / "written.jsonl"  # each batch's kept lines: a stopped run resumes
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    with path.open("a") as f:

        def save(kept: list[str], total: int) -> None:
            f.write(json.dumps(kept) + "\n")
            f.flush()
            bar.update(task, completed=total)

        written = synthetic.base_written_requests(
            llm, seeds, args.num_written, seed=args.seed, done=done, on_batch=save
        )
    templated = synthetic.template_requests(args.num_templated, seed=args.seed)
    leaks = synthetic.leaks_into(synthetic.held_out_records())
    seen: set[str] = set()
    out = []
    for text in [*seeds, *templated, *written]:
        if text.lower() not in seen and not leaks(text):
            seen.add(text.lower())
            out.append(text)
    return out


def answer_all(
    llm: LLM, conversations: list[synthetic.Conversation], path: Path, args, bar: Progress
) -> list[synthetic.Conversation]:
    """Answer in chunks appended to `path`; lines already there are kept (a resumed run)."""
    done = synthetic.read_conversations(path) if path.is_file() else []
    task = bar.add_task(f"answering ({path.name})", total=len(conversations), completed=len(done))
    with path.open("a") as f:
        for i in range(len(done), len(conversations), CHUNK):
            answered = synthetic.answer_conversations(
                llm, conversations[i : i + CHUNK], args.max_new_tokens, args.batch_size
            )
            f.write("".join(json.dumps({"messages": c}) + "\n" for c in answered))
            f.flush()
            done += answered
            bar.update(task, completed=len(done))
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path, help="output folder")
    ap.add_argument("--base", help="base model (default: the embedded SmolLM2)")
    ap.add_argument(
        "--seeds", type=Path, action="append", help="hand-written requests, a line each "
        "(repeatable; default: prompts/train_seeds.txt)",
    )  # fmt: skip
    ap.add_argument("--num-written", type=int, default=2000, help="requests the base writes")
    ap.add_argument("--num-templated", type=int, default=3500, help="requests from templates")
    ap.add_argument("--follow-up-share", type=float, default=0.1)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.seeds = args.seeds or [synthetic.TRAIN_SEEDS]
    args.work.mkdir(parents=True, exist_ok=True)
    llm = LLM(args.base or default_base(), branches="off")
    t0 = time.perf_counter()
    requests_path = args.work / "requests.json"
    with Progress() as bar:
        if not requests_path.is_file():
            atomic_write_text(requests_path, json.dumps(build_requests(llm, args, bar), indent=0))
        requests = json.loads(requests_path.read_text())
        first = [[{"role": "user", "content": r}] for r in requests]
        answered = answer_all(llm, first, args.work / "first_turns.jsonl", args, bar)
        follow = [
            [*c, {"role": "user", "content": f}]
            for c, f in synthetic.with_follow_ups(answered, args.follow_up_share, args.seed)
        ]
        second = answer_all(llm, follow, args.work / "follow_ups.jsonl", args, bar)
    records = "".join(json.dumps({"messages": c}) + "\n" for c in [*answered, *second])
    atomic_write_text(args.work / "chats.jsonl", records)
    print(
        f"{len(answered)} chats + {len(second)} follow-ups in {time.perf_counter() - t0:.0f} s "
        f"-> {args.work / 'chats.jsonl'}"
    )


if __name__ == "__main__":
    main()
