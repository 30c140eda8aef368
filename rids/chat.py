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

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text` as it is committed; the turn joins the history. An
        answer that would pass the model's context is cut where the context ends; a message
        that leaves no room for one is refused (RidsError) and the history stays as it was."""
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self.llm.encode_chat(messages)
        room = self.llm.config.max_position_embeddings - len(ids)
        if room < 1:
            limit = self.llm.config.max_position_embeddings
            alone = [m for m in messages if m["role"] == "system"] + messages[-1:]
            alone_tokens = len(self.llm.encode_chat(alone))
            if alone_tokens < limit:  # dropping earlier exchanges makes room
                raise RidsError(
                    f"the conversation with this message is {len(ids)} tokens and the model's "
                    f"context holds {limit}: /trim drops the oldest exchange, /reset starts over"
                )
            raise RidsError(
                f"this message (with the system message, in the chat template) is "
                f"{alone_tokens} tokens and the model's context holds {limit}: shorten it"
            )
        self.messages = messages
        fresh = self.llm.make_sequence(
            ids,
            max_new_tokens=min(self.max_new_tokens, room),
            stride=self.stride,
            sampling=self.sampling,
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

    def trim(self) -> bool:
        """Drop the oldest exchange (a user message and its answer; the system message
        stays). False if there is none. The KV of what follows is recomputed next turn."""
        first = 1 if self.system else 0
        if len(self.messages) - first < 2:
            return False
        del self.messages[first : first + 2]
        return True

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
            fresh.seq_id, fresh.page_table = old.seq_id, old.page_table
            fresh.num_cached_tokens = keep
            self.llm.engine.pages.truncate(fresh, keep)
        self.reused.append(fresh.num_cached_tokens)
        fresh.status = SequenceStatus.WAITING
        self.seq = fresh
        return fresh

    @property
    def total(self) -> GenerationStats:
        return GenerationStats.total(self.turns)
