"""Paged KV cache bookkeeping: fixed-size pages, one page table per sequence.

Pure Python: it only edits `seq.page_table` and its free list. The KV cache has one page more
than it hands out (`scratch_page`): padding rows of fixed (CUDA-graph) layouts write there.
"""

from __future__ import annotations

from collections import deque

from rids.engine.sequence import Sequence
from rids.errors import RidsError


class PageManager:
    def __init__(self, num_pages: int, page_size: int) -> None:
        self.page_size = page_size
        self.num_pages = num_pages
        self.scratch_page = num_pages  # the cache's extra page
        self.free_page_ids: deque[int] = deque(range(num_pages))

    @property
    def scratch_slot(self) -> int:
        return self.scratch_page * self.page_size

    @property
    def num_free_pages(self) -> int:
        return len(self.free_page_ids)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def new_pages(self, seq: Sequence, num_tokens: int) -> int:
        """Pages `seq` would need beyond its table to hold positions 0..num_tokens-1."""
        return max(self.pages_for(num_tokens) - len(seq.page_table), 0)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.page_table` to cover positions 0..num_tokens-1."""
        need = self.new_pages(seq, num_tokens)
        if need > self.num_free_pages:
            raise RidsError(
                f"KV cache exhausted: sequence {seq.seq_id} needs {need} more pages of "
                f"{self.page_size} tokens, {self.num_free_pages} are free; raise "
                "--kv-cache-tokens or lower the batch size"
            )
        seq.page_table.extend(self.free_page_ids.popleft() for _ in range(need))

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Free the pages past position num_tokens-1 (rejected drafts, MASK positions)."""
        keep = self.pages_for(num_tokens)
        self.free_page_ids.extend(seq.page_table[keep:])
        del seq.page_table[keep:]

    def deallocate(self, seq: Sequence) -> None:
        self.truncate(seq, 0)
