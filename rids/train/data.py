"""Training data: text / jsonl files or a local HF dataset folder, tokenized into fixed sequences.

- `.txt`: documents separated by blank lines;
- `.jsonl`: one JSON object a line with `messages` (chat, rendered by the tokenizer's template),
  `prompt` + `response`/`completion` (rendered as a user/assistant exchange), or `text`;
- a folder saved with `datasets.save_to_disk` (needs the `datasets` package), same fields.

Text is encoded as the tokenizer encodes a prompt (its BOS, if it adds one); chat records are
rendered by the chat template, which carries its own special tokens. In chat records only the
assistant turns are targets: MASK blocks only ever draft answers, so prompts teach nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rids.errors import RidsError


@dataclass(slots=True)
class Document:
    """Token ids as the model sees them, which targets train, and the ids an eval sends."""

    ids: list[int]
    trainable: list[bool]  # per token: is it a target the adapter learns to draft
    prompt_ids: list[int]


def text_document(text: str, tokenizer) -> Document:
    """Plain text, encoded as the tokenizer encodes a prompt (its BOS, if it adds one); every
    token trains; the eval prompt is its first third."""
    ids = tokenizer.encode(text)
    return Document(ids, [True] * len(ids), ids[: max(1, len(ids) // 3)])


def chat_document(messages: list[dict], tokenizer, where: str) -> Document:
    """A conversation in the chat template (which carries its own special tokens); only the
    assistant turns train: drafts are only ever proposed inside answers."""
    if not tokenizer.chat_template:
        raise RidsError(f"{where}: chat records need a tokenizer with a chat template")
    if not messages or messages[-1].get("role") != "assistant":
        raise RidsError(f"{where}: a chat record must end with an assistant message")

    def render(msgs: list[dict], answer_next: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            msgs, tokenize=False, add_generation_prompt=answer_next
        )
        return tokenizer.encode(text, add_special_tokens=False)

    ids = render(messages, False)
    trainable = [False] * len(ids)
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            start, end = len(render(messages[:i], True)), len(render(messages[: i + 1], False))
            trainable[start:end] = [True] * (end - start)
    return Document(ids, trainable, render(messages[:-1], True))


def record_document(record: dict, tokenizer, where: str) -> Document:
    if "prompt" in record and ("response" in record or "completion" in record):
        answer = record.get("response", record.get("completion"))
        record = {"messages": [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": answer},
        ]}  # fmt: skip
    if "messages" in record:
        return chat_document(record["messages"], tokenizer, where)
    if "text" in record:
        return text_document(record["text"], tokenizer)
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
            chunks = path.read_text().split("\n\n")
            docs += [text_document(c.strip(), tokenizer) for c in chunks if c.strip()]
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
    trainable: torch.Tensor  # [n, seq_len] bool: the targets that train
    eval_prompts: list[list[int]]  # token ids of held-out documents' prompts


def unique_documents(docs: list[Document]) -> list[Document]:
    """Each document once, in first-seen order: a chat found twice (the same request answered
    greedily in two data runs) is one observation of what the base writes, not two."""
    return list({(tuple(d.ids), tuple(d.trainable)): d for d in docs}.values())


def split_documents(
    docs: list[Document], eval_fraction: float = 0.05
) -> tuple[list[Document], list[Document]]:
    """(training, held-out) documents: `eval_fraction` of them drawn at random (seeded, so a
    held-out share of every kind of document, the same every run; one document is both)."""
    held = max(1, int(len(docs) * eval_fraction)) if len(docs) > 1 else 0
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(0)).tolist()
    docs = [docs[i] for i in order]
    return docs[: len(docs) - held], docs[len(docs) - held :] or docs[:1]


def build_dataset(
    paths: list[Path], tokenizer, seq_len: int, stride: int, eval_fraction: float = 0.05
) -> TrainingData:
    """Tokenize, concatenate (EOS between documents) and cut into `seq_len` sequences; a long
    document simply spans several. 5 % of the documents, drawn at random (seeded), are held
    out for evaluation."""
    if seq_len < stride + 2:
        raise RidsError(
            f"--seq-len {seq_len} is too short for stride {stride} (need >= {stride + 2})"
        )
    docs = read_documents(paths, tokenizer)
    if not docs:
        raise RidsError(f"no training text in {', '.join(map(str, paths))}")
    train_docs, eval_docs = split_documents(docs, eval_fraction)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    trainable: list[bool] = []
    for d in train_docs:
        stream += d.ids + eos
        trainable += d.trainable + [False] * len(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise RidsError(
            f"the data has {len(stream)} tokens, fewer than one sequence of --seq-len {seq_len}"
        )
    if not any(trainable):
        raise RidsError("the chat records have no assistant text to train on")
    return TrainingData(
        torch.tensor(stream[: n * seq_len]).view(n, seq_len),
        torch.tensor(trainable[: n * seq_len]).view(n, seq_len),
        [d.prompt_ids for d in eval_docs],
    )
