"""Paged KV cache bookkeeping: fixed-size pages, per-sequence block tables."""

from __future__ import annotations

from collections import deque

from rids.engine.sequence import Sequence
from rids.errors import RidsError


class BlockManager:
    """Hands out KV pages. Pure Python: it only edits `seq.block_table` and its free list."""

    def __init__(self, num_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        self.free_page_ids: deque[int] = deque(range(num_pages))

    @property
    def num_free_pages(self) -> int:
        return len(self.free_page_ids)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) - len(seq.block_table) <= self.num_free_pages

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover positions 0..num_tokens-1."""
        need = self.pages_for(num_tokens) - len(seq.block_table)
        if need > self.num_free_pages:
            raise RidsError(
                f"KV cache exhausted: sequence {seq.seq_id} needs {need} more pages of "
                f"{self.page_size} tokens, {self.num_free_pages} are free; raise "
                "--kv-cache-tokens or lower the batch size"
            )
        seq.block_table.extend(self.free_page_ids.popleft() for _ in range(max(need, 0)))

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Free the pages past position num_tokens-1 (rejected drafts, MASK positions)."""
        keep = self.pages_for(num_tokens)
        self.free_page_ids.extend(seq.block_table[keep:])
        del seq.block_table[keep:]

    def deallocate(self, seq: Sequence) -> None:
        self.truncate(seq, 0)

    def slot(self, seq: Sequence, position: int) -> int:
        page, offset = divmod(position, self.page_size)
        return seq.block_table[page] * self.page_size + offset
