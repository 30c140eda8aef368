"""Offline chat data: varied reproducible requests, kept apart from the held-out sets; the base's
own greedy answers; chat records whose assistant turns alone train."""

from __future__ import annotations

import json
from types import SimpleNamespace

from rids.llm import LLM
from rids.train import synthetic
from rids.train.data import build_dataset, chat_document


def test_held_out_set_is_hand_written_across_domains():
    chat = synthetic.read_records(synthetic.HELD_OUT["heldout"])
    assert len(chat) >= 50 and len({r["domain"] for r in chat}) >= 10
    assert any(len(r["messages"]) > 1 for r in chat)  # multi-turn follow-ups
    assert all(r["messages"][-1]["role"] == "user" and r["topics"] for r in chat)
    assert len(synthetic.read_records(synthetic.HELD_OUT["adversarial"])) >= 20


def test_template_requests_are_distinct_reproducible_and_varied():
    requests = synthetic.template_requests(3000, seed=0)
    assert len(set(requests)) == 3000
    assert requests == synthetic.template_requests(3000, seed=0)
    assert requests != synthetic.template_requests(3000, seed=1)
    first = requests[: len(synthetic.TEMPLATES)]  # one per template, in turn
    for needle in ("describing", "function", "email", "pros and cons", "list", "summarize"):
        assert any(needle.lower() in r.lower() for r in first), needle


def test_training_requests_that_touch_a_held_out_topic_are_dropped():
    leaks = synthetic.leaks_into(synthetic.held_out_records())
    assert leaks("Any tips for running a marathon in the heat?")  # a held-out topic
    assert leaks("Write a Python function that checks if two words are anagrams.")
    assert not leaks("Write a haiku about the first snow of winter.")
    requests = synthetic.seed_requests(synthetic.TRAIN_SEEDS)
    requests += synthetic.seed_requests(synthetic.TRAIN_CHAT)
    requests += synthetic.template_requests(2000)
    kept = {r.lower() for r in requests if not leaks(r)}
    held = {m["content"].lower() for r in synthetic.held_out_records() for m in r["messages"]}
    assert len(kept) > 2500 and not kept & held


def test_first_request_keeps_one_complete_line():
    assert synthetic.first_request(" How do kites fly?\n7. Another") == "How do kites fly?"
    assert synthetic.first_request("Tell me about") is None  # cut off
    assert synthetic.first_request("8. What is up?") is None  # the list went on


class Scribe:
    """Stands in for the base: sample i of a batch seeded s writes a request that depends on
    its prompt, the batch's temperature and s + i, or a line that is not one (every third), or
    the same request again (every fifth)."""

    def generate(self, prompts, *, seed, temperature, **sampling):
        texts = []
        for i, prompt in enumerate(prompts):
            request = f"What is item {seed + i} of {hash(prompt) % 97} at {temperature}?"
            if (seed + i) % 5 == 0:
                request = "What is item zero about?"
            texts.append(f" {request}\n" if (seed + i) % 3 else "no request")
        return [SimpleNamespace(text=t) for t in texts]


def test_a_stopped_request_writer_resumes_as_if_it_had_not_stopped():
    seeds = synthetic.seed_requests(synthetic.TRAIN_SEEDS)
    batches, totals = [], []

    def record(kept: list[str], total: int) -> None:
        batches.append(kept)
        totals.append(total)

    written = synthetic.base_written_requests(Scribe(), seeds, 20, batch_size=8, on_batch=record)
    assert len(written) == len(set(written)) == 20 and len(batches) > 2
    assert totals[-1] == 20 and totals == sorted(totals)
    resumed: list[list[str]] = []
    again = synthetic.base_written_requests(
        Scribe(), seeds, 20, batch_size=8, done=batches[:2],
        on_batch=lambda kept, total: resumed.append(kept),
    )  # fmt: skip
    assert again == written and resumed == batches[2:]


def test_the_base_writes_and_answers_requests(demo, tmp_path):
    llm = LLM(demo / "base")
    seeds = synthetic.seed_requests(synthetic.TRAIN_SEEDS)
    written = synthetic.base_written_requests(llm, seeds, 4, seed=0, batch_size=8)
    assert len(set(written)) == len(written) <= 4
    assert all(synthetic.first_request(w) == w for w in written)
    convs = [[{"role": "user", "content": f"Count from {w}."}] for w in ("seven", "two", "nine")]
    answered = synthetic.answer_conversations(llm, convs, max_new_tokens=24, batch_size=2)
    assert answered[0][1]["content"].startswith("seven eight")
    follow = synthetic.with_follow_ups(answered, share=1.0)
    assert [c for c, _ in follow] == answered and all(f in synthetic.FOLLOW_UPS for _, f in follow)
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in answered * 20))
    data = build_dataset([path], llm.tokenizer, seq_len=32, stride=4)
    assert data.sequences.shape == data.trainable.shape and data.eval_prompts
    assert 0 < data.trainable.float().mean() < 1


def test_only_assistant_turns_train(demo):
    llm = LLM(demo / "base")
    messages = [
        {"role": "user", "content": "Count from two."},
        {"role": "assistant", "content": "two three four"},
        {"role": "user", "content": "Again."},
        {"role": "assistant", "content": "five six"},
    ]
    doc = chat_document(messages, llm.tokenizer, "test")
    trained = llm.tokenizer.decode([t for t, y in zip(doc.ids, doc.trainable, strict=True) if y])
    assert "two three four" in trained and "five six" in trained
    assert "Count from" not in trained and "Again" not in trained
    assert doc.prompt_ids == llm.encode_chat(messages[:-1])
