"""Offline chat data: varied, reproducible prompts; the base's own answers; trainable records."""

from __future__ import annotations

import json
import re

from rids.llm import LLM
from rids.train.data import build_dataset
from rids.train.synthetic import TEMPLATES, answer_prompts, chat_prompts, held_out_prompts


def test_prompts_are_distinct_reproducible_and_varied():
    prompts = chat_prompts(3000, seed=0)
    assert len(set(prompts)) == 3000
    assert prompts == chat_prompts(3000, seed=0) and prompts != chat_prompts(3000, seed=1)
    starts = {re.sub(r"\d.*", "", p.split()[0]) for p in prompts[: len(TEMPLATES) * 3]}
    assert {"What", "Convert", "Write", "List"} <= starts  # every kind shows up early


def test_held_out_prompts_are_not_in_the_training_set():
    held = held_out_prompts(40, training=500)
    assert len(held) == 40 and not set(held) & set(chat_prompts(500))


def test_answers_are_the_base_greedy_output_and_train(demo, tmp_path):
    llm = LLM(demo / "base")
    prompts = ["Count from seven.", "Count from two.", "Count from nine."]
    records = answer_prompts(llm, prompts, max_new_tokens=24, batch_size=2)
    assert [r["messages"][0]["content"] for r in records] == prompts
    assert records[0]["messages"][1]["content"].startswith("seven eight")
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records * 20))
    data = build_dataset([path], llm.tokenizer, seq_len=32, stride=4)
    assert data.sequences.shape[1] == 32 and data.eval_prompts
