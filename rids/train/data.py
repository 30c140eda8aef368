"""Training data: text / jsonl files or a local HF dataset folder, tokenized into fixed sequences.

- `.txt`: documents separated by blank lines;
- `.jsonl`: one JSON object a line with `messages` (chat, rendered by the tokenizer's template),
  `prompt` + `response`/`completion` (rendered as a user/assistant exchange), or `text`;
- a folder saved with `datasets.save_to_disk` (needs the `datasets` package), same fields.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rids.errors import RidsError


@dataclass(slots=True)
class Document:
    text: str  # the whole document as the model sees it
    prompt: str  # what an eval request sends (chat: up to the assistant turn)


def text_document(text: str) -> Document:
    """A plain-text document; its eval prompt is its first third."""
    return Document(text, text[: max(1, len(text) // 3)])


def record_document(record: dict, tokenizer, where: str) -> Document:
    if "prompt" in record and ("response" in record or "completion" in record):
        answer = record.get("response", record.get("completion"))
        record = {"messages": [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": answer},
        ]}  # fmt: skip
    if "messages" in record:
        if not tokenizer.chat_template:
            raise RidsError(f"{where}: chat records need a tokenizer with a chat template")
        msgs = record["messages"]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = tokenizer.apply_chat_template(
            msgs[:-1], tokenize=False, add_generation_prompt=True
        )
        return Document(text, prompt)
    if "text" in record:
        return text_document(record["text"])
    raise RidsError(f"{where}: a record needs 'messages', 'prompt'+'response' or 'text'")


def read_documents(paths: list[Path], tokenizer) -> list[Document]:
    docs: list[Document] = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise RidsError(f"training data {path} does not exist")
        if path.is_dir() and (path / "dataset_info.json").is_file():
            docs += read_hf_dataset(path, tokenizer)
        elif path.is_dir():
            files = sorted([*path.glob("*.txt"), *path.glob("*.jsonl")])
            docs += read_documents(files, tokenizer)
        elif path.suffix == ".jsonl":
            for i, line in enumerate(path.read_text().splitlines()):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise RidsError(f"{path}:{i + 1} is not valid JSON ({e.msg})") from None
                    docs.append(record_document(record, tokenizer, f"{path}:{i + 1}"))
        else:
            docs += [text_document(c.strip()) for c in path.read_text().split("\n\n") if c.strip()]
    return docs


def read_hf_dataset(path: Path, tokenizer) -> list[Document]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise RidsError(
            f"{path} is an HF dataset folder: `pip install datasets` to read it"
        ) from None
    return [record_document(r, tokenizer, str(path)) for r in load_from_disk(str(path))]


@dataclass(slots=True)
class TrainingData:
    sequences: torch.Tensor  # [n, seq_len] token ids
    eval_prompts: list[str]


def build_dataset(
    paths: list[Path], tokenizer, seq_len: int, stride: int, eval_fraction: float = 0.05
) -> TrainingData:
    """Tokenize, concatenate (EOS between documents) and cut into `seq_len` sequences."""
    if seq_len < stride + 2:
        raise RidsError(
            f"--seq-len {seq_len} is too short for stride {stride} (need >= {stride + 2})"
        )
    docs = read_documents(paths, tokenizer)
    if not docs:
        raise RidsError(f"no training text in {', '.join(map(str, paths))}")
    held = max(1, int(len(docs) * eval_fraction)) if len(docs) > 1 else 0
    train_docs, eval_docs = docs[: len(docs) - held], docs[len(docs) - held :] or docs[:1]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for d in train_docs:
        stream += tokenizer.encode(d.text, add_special_tokens=False) + eos
    n = len(stream) // seq_len
    if n == 0:
        raise RidsError(
            f"the data has {len(stream)} tokens, fewer than one sequence of --seq-len {seq_len}"
        )
    sequences = torch.tensor(stream[: n * seq_len]).view(n, seq_len)
    return TrainingData(sequences, [d.prompt for d in eval_docs])
