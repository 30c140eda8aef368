"""Multi-turn chat on one sequence whose KV cache outlives each turn.

Each turn renders the whole conversation with the tokenizer's chat template, keeps the cached
KV of the longest prefix shared with what the sequence already holds, and prefills only the
rest; answers stream as the engine commits tokens. Verification makes each answer exactly what a
fresh generation on the whole conversation would give.
"""

from __future__ import annotations

from collections.abc import Iterator

from rids.detokenizer import Detokenizer
from rids.engine.sequence import Sequence, SequenceStatus
from rids.errors import RidsError
from rids.llm import LLM
from rids.outputs import GenerationStats
from rids.sampling import GREEDY, SamplingParams


def user_turn(tokenizer, text: str) -> str:
    """One user message in the tokenizer's chat template, ready for the answer."""
    messages = [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class ChatSession:
    def __init__(
        self,
        llm: LLM,
        *,
        system: str | None = None,
        stride: int | None = None,
        max_new_tokens: int = 256,
        sampling: SamplingParams = GREEDY,
    ) -> None:
        if llm.tokenizer is None or not llm.tokenizer.chat_template:
            raise RidsError(f"{llm.base_path} has no chat template; chat needs one")
        self.llm, self.stride, self.max_new_tokens, self.sampling = (
            llm,
            stride,
            max_new_tokens,
            sampling,
        )
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.seq: Sequence | None = None
        self.turns: list[GenerationStats] = []
        self.reused: list[int] = []  # per turn: tokens whose KV came from earlier turns
        self.reset()

    def reset(self) -> None:
        """Forget the conversation and free its KV pages."""
        if self.seq is not None:
            self.llm.engine.scheduler.close(self.seq)
        self.seq = None
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def render(self) -> list[int]:
        text = self.llm.tokenizer.apply_chat_template(
            self.messages, tokenize=False, add_generation_prompt=True
        )
        return self.llm.encode(text)

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text` as it is committed; the turn joins the history."""
        self.messages.append({"role": "user", "content": text})
        ids = self.render()
        fresh = self.llm.make_sequence(
            ids, max_new_tokens=self.max_new_tokens, stride=self.stride, sampling=self.sampling
        )
        seq = self.continue_from(fresh)
        engine, tok = self.llm.engine, self.llm.tokenizer
        engine.add(seq)
        text = Detokenizer(tok)
        try:
            while not seq.is_finished:
                engine.step()
                if new := text.update(seq.completion_ids, final=seq.is_finished):
                    yield new
        finally:
            if not seq.is_finished:  # interrupted: keep what was committed
                engine.scheduler.abort([seq])
            self.messages.append({"role": "assistant", "content": text.text})
            self.turns.append(GenerationStats.of(seq))

    def continue_from(self, fresh: Sequence) -> Sequence:
        """`fresh` (the whole conversation) on the session's sequence, keeping shared KV."""
        fresh.keep_kv = True
        old = self.seq
        if old is not None:
            same = 0
            for a, b in zip(old.token_ids, fresh.token_ids, strict=False):
                if a != b:
                    break
                same += 1
            keep = min(same, old.num_cached_tokens, fresh.num_tokens - 1)
            fresh.seq_id, fresh.block_table = old.seq_id, old.block_table
            fresh.num_cached_tokens = keep
            self.llm.engine.block_manager.truncate(fresh, keep)
        self.reused.append(fresh.num_cached_tokens)
        fresh.status = SequenceStatus.WAITING
        self.seq = fresh
        return fresh

    @property
    def total(self) -> GenerationStats:
        return GenerationStats.total(self.turns)
