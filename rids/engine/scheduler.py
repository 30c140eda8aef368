"""Admission: requests wait until the KV pages of their worst case can be promised to them."""

from __future__ import annotations

from collections import deque

from rids.engine.block_manager import BlockManager
from rids.engine.sequence import Sequence, SequenceStatus
from rids.errors import RidsError


class Scheduler:
    """FIFO admission by page reservation, so a running sequence never runs out of KV pages."""

    def __init__(self, block_manager: BlockManager, max_batch_size: int) -> None:
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved: dict[int, int] = {}  # seq_id -> pages promised

    def worst_case_pages(self, seq: Sequence) -> int:
        # the last step's block may reach 2N-1 positions past the final committed token
        return self.block_manager.pages_for(
            seq.num_prompt_tokens + seq.max_new_tokens + 2 * seq.stride
        )

    def add(self, seq: Sequence) -> None:
        self.reserved.pop(seq.seq_id, None)  # a kept session's next turn: reserved anew below
        need = self.worst_case_pages(seq)
        if need > self.block_manager.num_pages:
            raise RidsError(
                f"KV cache too small: one request needs {need} pages of "
                f"{self.block_manager.page_size} tokens, the cache has "
                f"{self.block_manager.num_pages}; raise --kv-cache-tokens or lower "
                "--max-new-tokens"
            )
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> list[Sequence]:
        """Admit what fits, then return the running batch."""
        free = self.block_manager.num_pages - sum(self.reserved.values())
        while self.waiting and len(self.running) < self.max_batch_size:
            need = self.worst_case_pages(self.waiting[0])
            if need > free:
                break
            seq = self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.reserved[seq.seq_id] = need
            self.running.append(seq)
            free -= need
        return list(self.running)

    def abort(self, seqs: list[Sequence]) -> None:
        """Drop these sequences wherever they are, freeing their pages."""
        for seq in seqs:
            if not seq.is_finished:
                seq.finish("abort")
        self.waiting = deque(s for s in self.waiting if not s.is_finished)
        self.release_finished()

    def release_finished(self) -> list[Sequence]:
        """Drop finished sequences from the batch and free their pages (a session keeps its
        pages, and their reservation, until `close`)."""
        done = [s for s in self.running if s.is_finished]
        for seq in done:
            if not seq.keep_kv:
                self.close(seq)
        self.running = [s for s in self.running if not s.is_finished]
        return done

    def close(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        self.reserved.pop(seq.seq_id, None)
