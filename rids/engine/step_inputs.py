"""The host side of one forward: the blocks laid out flat, and everything the device needs.

Flat order: every sequence's clean tokens (pending, drafts; or a prompt), then every sequence's
MASK tokens, so the gated rows are a tail of static length. All integer metadata is packed into
one tensor and crosses to the device in one copy (`StepInputs.to_device`); the attention plan in
the form flashinfer plans from is made on demand, as host lists (`attention_plan`).

Attention, per sequence, is two query ranges over the same pages: its clean rows (causal over
the cache and the clean tokens; a sibling path's rows see the committed tokens and
themselves) and its MASK rows (causal over those and the MASKs), each as a
bottom-right-aligned causal mask: exactly R-ISD's visibility. Only a block with several
branches or a sibling path needs a custom mask. Every row also carries its visibility explicitly, as
(prefix, lo, hi) over the sequence's KV indices: the torch backend builds its mask from those.
The torch backend pads each sequence's queries and keys to a common length per *query group*
(`query_groups`): in a batch, one sequence with a 7-token block would otherwise make every
1-token sequence attend as 7 rows.

A padded layout (`pad`: CUDA graphs) gives every sequence exactly N clean and N-1 MASK rows,
left-padded, and fills the batch with dummy sequences; padding rows write their KV to a
reserved scratch slot and no real row ever sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rids.engine.step_block import StepBlock


@dataclass(slots=True)
class StepEntry:
    block: StepBlock
    page_table: list[int]


@dataclass(frozen=True, slots=True)
class Padding:
    """A fixed decode layout: `num_seqs` sequences of stride `stride`, plain blocks only."""

    num_seqs: int
    stride: int
    scratch_slot: int  # a KV slot no sequence owns


# padded query rows that cost about as much as one more attention call per layer (torch
# backend, 2-core CPU, SmolLM2 shapes: a padded row over ~130 keys ~0.25 ms a step, a group's
# calls ~2 ms)
GROUP_ROWS = 8


@dataclass(frozen=True, slots=True)
class QueryGroup:
    """Sequences the torch backend attends in one call per layer: `num_seqs` of them (entries
    `first` .. of the packed `group_seqs`), each padded to `max_q` query rows (at row `offset`
    of the padded query layout) and `max_kv` keys."""

    first: int
    num_seqs: int
    max_q: int
    max_kv: int
    offset: int


def query_groups(q_lens: list[int]) -> list[list[int]]:
    """Sequence indices grouped by query length, shortest first: runs of the sorted distinct
    lengths, chosen to minimize the padded rows plus GROUP_ROWS per group (dynamic programming
    over the lengths; equal lengths always share a group)."""
    lengths = sorted(set(q_lens))
    count = {n: q_lens.count(n) for n in lengths}

    def cost(run: list[int]) -> int:  # padding each length in `run` up to its longest
        return sum(count[n] * (run[-1] - n) for n in run) + GROUP_ROWS

    best: list[tuple[int, list[list[int]]]] = [(0, [])]  # per prefix of `lengths`
    for j in range(1, len(lengths) + 1):
        splits = ((best[i][0] + cost(lengths[i:j]), [*best[i][1], lengths[i:j]]) for i in range(j))
        best.append(min(splits, key=lambda option: option[0]))
    return [[b for b, n in enumerate(q_lens) if n in run] for run in best[-1][1]]


@dataclass(slots=True)
class AttentionPlan:
    """flashinfer's paged-prefill plan inputs (host lists): two requests per sequence."""

    qo_indptr: list[int]
    kv_indptr: list[int]  # into kv_indices, per request
    kv_indices: list[int]  # page ids
    kv_last_page_len: list[int]
    custom_mask: torch.Tensor | None  # bool, row-major [qo_len, kv_len] per request, or causal


@dataclass(slots=True)
class Row:
    """One flat row: its token, position, KV slot, and which KV indices of its sequence it
    sees: [0, prefix) and lo..hi."""

    token: int
    position: int
    slot: int
    prefix: int
    lo: int = 0
    hi: int = -1


class Packed:
    """Named int64 arrays in one tensor; `to(device)` copies once and returns views."""

    def __init__(self) -> None:
        self.values: list[int] = []
        self.shapes: dict[str, tuple[int, tuple[int, ...]]] = {}

    def add(self, name: str, values: list[int], shape: tuple[int, ...] | None = None) -> None:
        self.shapes[name] = (len(self.values), shape or (len(values),))
        self.values += values

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        host = torch.tensor(self.values, dtype=torch.long)
        if device.type == "cuda":
            host = host.pin_memory()
        flat = host.to(device, non_blocking=True)
        out = {}
        for name, (offset, shape) in self.shapes.items():
            size = 1
            for s in shape:
                size *= s
            out[name] = flat[offset : offset + size].view(shape)
        return out


@dataclass(slots=True)
class Layout:
    """Per sequence (padding included): its clean rows, its MASK rows, its page table and its
    KV length after the step; and the real blocks."""

    clean: list[list[Row]]
    masks: list[list[Row]]
    tables: list[list[int]]
    kv_lens: list[int]
    blocks: list[StepBlock]


@dataclass(slots=True)
class StepInputs:
    num_tokens: int
    num_gated: int  # the last num_gated rows are MASKs (gate 1)
    num_seqs: int
    max_q: int  # rows of the longest sequence
    max_kv: int  # KV length of the longest sequence
    query_groups: list[QueryGroup]  # the torch backend's padded attention calls
    num_verify: int  # logits rows that verify (the first ones); the MASK rows follow
    packed: Packed
    layout: Layout
    page_size: int
    verify_rows: list[slice]  # per real sequence, its rows of the verify logits
    mask_rows: list[slice]  # per real sequence, its rows of the MASK logits
    max_masks: int  # the most MASKs a branch has (1 when none has any: a table width)
    has_siblings: bool  # some block has a sibling path (its metadata is packed)

    def to_device(self, device: torch.device) -> dict[str, torch.Tensor]:
        return self.packed.to(device)

    def attention_plan(self) -> AttentionPlan:
        """The step in flashinfer's plan form (host; only that backend needs it)."""
        return attention_plan(self.layout, self.page_size)


def block_rows(block: StepBlock, table: list[int], page_size: int, masks: bool) -> list[Row]:
    """A block's clean rows (or its MASK rows), with visibility in the sequence's KV indices."""
    rows, s = [], block.start
    positions, vis = block.positions, block.visibility()
    span = range(block.num_clean, len(block.token_ids)) if masks else range(block.num_clean)
    for i in span:
        prefix, lo, hi = vis[i]
        if masks and block.is_causal:  # one span: prefix and own range merge
            prefix, lo, hi = hi + 1, 0, -1
        rows.append(
            Row(block.token_ids[i], positions[i], slot_of(table, s + i, page_size), s + prefix,
                s + lo, s + hi)
        )  # fmt: skip
    return rows


def slot_of(table: list[int], index: int, page_size: int) -> int:
    page, offset = divmod(index, page_size)
    return table[page] * page_size + offset


def build_step(entries: list[StepEntry], page_size: int, pad: Padding | None = None) -> StepInputs:
    """Lay out one forward over `entries` (one block per sequence)."""
    clean: list[list[Row]] = []
    masks: list[list[Row]] = []
    tables, kv_lens = [], []
    for e in entries:
        clean.append(block_rows(e.block, e.page_table, page_size, masks=False))
        masks.append(block_rows(e.block, e.page_table, page_size, masks=True))
        tables.append(e.page_table)
        kv_lens.append(e.block.end)
    if pad is not None:
        clean, masks, tables, kv_lens = padded(entries, clean, masks, tables, kv_lens, pad)
    flat = [r for rows in clean for r in rows] + [r for rows in masks for r in rows]
    num_seqs = len(clean)
    max_pages = max(max((len(t) for t in tables), default=1), 1)
    packed = Packed()
    packed.add("input_ids", [r.token for r in flat])
    packed.add("positions", [r.position for r in flat])
    packed.add("slots", [r.slot for r in flat])
    # the torch backend's query layout: per query group, sequence u of the group's rows at
    # offset + u * max_q + i, in block order
    q_lens = [len(c) + len(m) for c, m in zip(clean, masks, strict=True)]
    clean_at = [0]
    mask_at = [sum(len(c) for c in clean)]
    for c, m in zip(clean, masks, strict=True):
        clean_at.append(clean_at[-1] + len(c))
        mask_at.append(mask_at[-1] + len(m))
    row_q = [0] * len(flat)
    groups, group_seqs, offset = [], [], 0
    for members in query_groups(q_lens):
        max_q_g = max(q_lens[b] for b in members)
        groups.append(QueryGroup(len(group_seqs), len(members), max_q_g,
                                 max(kv_lens[b] for b in members), offset))  # fmt: skip
        for u, b in enumerate(members):
            first, n_clean = offset + u * max_q_g, len(clean[b])
            row_q[clean_at[b] : clean_at[b + 1]] = range(first, first + n_clean)
            row_q[mask_at[b] : mask_at[b + 1]] = range(first + n_clean, first + q_lens[b])
        group_seqs += members
        offset += len(members) * max_q_g
    packed.add("row_q", row_q)
    packed.add("group_seqs", group_seqs)
    packed.add("row_prefix", [r.prefix for r in flat])
    packed.add("row_lo", [r.lo for r in flat])
    packed.add("row_hi", [r.hi for r in flat])
    packed.add("page_tables", [p for t in tables for p in (t + [0] * (max_pages - len(t)))],
               (num_seqs, max_pages))  # fmt: skip
    verify, verify_rows, sibling_starts, mask_slices = logits_rows(entries, clean, masks)
    num_verify = len(verify)
    num_masks = sum(len(m) for m in masks)
    first_mask = len(flat) - num_masks
    packed.add("logits_rows", verify + list(range(first_mask, len(flat))))
    max_masks = add_verification(packed, entries, verify_rows, sibling_starts, mask_slices)
    return StepInputs(
        num_tokens=len(flat),
        num_gated=num_masks,
        num_seqs=num_seqs,
        max_q=max(q_lens),
        max_kv=max(kv_lens),
        query_groups=groups,
        num_verify=num_verify,
        packed=packed,
        layout=Layout(clean, masks, tables, kv_lens, [e.block for e in entries]),
        page_size=page_size,
        verify_rows=verify_rows,
        mask_rows=mask_slices,
        max_masks=max_masks,
        has_siblings="sibling" in packed.shapes,
    )


def add_verification(
    packed: Packed,
    entries: list[StepEntry],
    verify_rows: list[slice],
    sibling_starts: list[int],
    mask_rows: list[slice],
) -> int:
    """Per sequence: where its verify and MASK logits start, its drafts (padded with -1), and
    which branch covers each acceptance count j (-1: none); with sibling paths, also where
    each path's rows start, its length and its tokens. Returns the widest branch."""
    blocks = [e.block for e in entries]
    width = max([b.num_drafts for b in blocks] + [1])
    # a prefill chunk verifies nothing: row 0 (any row that exists; its verdict is ignored)
    starts = [0 if b.partial else r.start for b, r in zip(blocks, verify_rows, strict=True)]
    packed.add("verify_start", starts)
    packed.add("mask_start", [r.start for r in mask_rows])
    packed.add("num_drafts", [b.num_drafts for b in blocks])
    packed.add("masks_per_branch", [b.masks_per_branch for b in blocks])

    def table(paths: list[list[int]]) -> list[int]:  # one row per block, padded with -1
        return [t for d in paths for t in d + [-1] * (width - len(d))]

    packed.add("drafts", table([b.token_ids[b.num_committed : b.first_sibling] for b in blocks]),
               (len(blocks), width))  # fmt: skip
    if any(b.num_sibling for b in blocks):
        packed.add("sibling_start", sibling_starts)
        packed.add("num_sibling", [b.num_sibling for b in blocks])
        packed.add("sibling", table([b.sibling for b in blocks]), (len(blocks), width))
    branch_of = [
        b.branches.index(j) if j in b.branches else -1 for b in blocks for j in range(width + 1)
    ]
    packed.add("branch_of", branch_of, (len(blocks), width + 1))
    return max([b.masks_per_branch for b in blocks] + [1])


def logits_rows(
    entries: list[StepEntry], clean: list[list[Row]], masks: list[list[Row]]
) -> tuple[list[int], list[slice], list[int], list[slice]]:
    """Flat rows whose logits verify: each real block's k + 1 main rows (its last committed
    token and drafts), then each sibling path's s + 1 (the last committed token again, and the
    path); per real sequence its slice of the main rows, where its sibling rows start (0:
    none), and its slice of the MASK rows."""
    verify: list[int] = []
    sibling: list[int] = []
    verify_rows, sibling_starts, mask_slices = [], [], []
    at, mask_at = 0, 0
    for b, c in enumerate(clean):
        if b < len(entries):
            block = entries[b].block
            n, s = block.num_verify, block.num_sibling
            end = at + len(c) - s  # after the drafts (padding is on the left)
            verify_rows.append(slice(len(verify), len(verify) + n))
            verify += range(end - n, end)
            sibling_starts.append(len(sibling) if s else -1)
            if s:
                sibling += [end - n, *range(end, end + s)]
            m = block.num_masks
            pads = len(masks[b]) - m
            mask_slices.append(slice(mask_at + pads, mask_at + pads + m))
        at += len(c)
        mask_at += len(masks[b])
    starts = [len(verify) + i if i >= 0 else 0 for i in sibling_starts]
    return verify + sibling, verify_rows, starts, mask_slices


def padded(
    entries: list[StepEntry],
    clean: list[list[Row]],
    masks: list[list[Row]],
    tables: list[list[int]],
    kv_lens: list[int],
    pad: Padding,
):
    """Left-pad each sequence to N clean and N-1 MASK rows; add dummy sequences up to
    `pad.num_seqs`. Padding rows write to the scratch slot and see only KV index 0."""
    n = pad.stride
    assert len(entries) <= pad.num_seqs, "padding to fewer sequences than the batch"
    for e, c, m in zip(entries, clean, masks, strict=True):
        assert e.block.is_causal and len(c) <= n and len(m) <= n - 1, "not a plain decode block"
    filler = Row(0, 0, pad.scratch_slot, 1)
    dummies = pad.num_seqs - len(entries)
    clean = [[filler] * (n - len(c)) + c for c in clean] + [[filler] * n] * dummies
    masks = [[filler] * (n - 1 - len(m)) + m for m in masks] + [[filler] * (n - 1)] * dummies
    tables = tables + [[0]] * dummies
    kv_lens = kv_lens + [1] * dummies
    return clean, masks, tables, kv_lens


def attention_plan(layout: Layout, page_size: int) -> AttentionPlan:
    """Two requests per sequence (its clean rows, then later its MASK rows), in flat order:
    request i of the first half is sequence i's clean range, of the second half its MASKs. A
    custom mask (only when some block has several branches or a sibling path) is built with
    tensor ops from each row's visibility."""
    qo, kv_indptr, kv_indices, last = [0], [0], [], []
    masks: list[torch.Tensor] | None = None if all(b.is_causal for b in layout.blocks) else []
    for half, groups in enumerate((layout.clean, layout.masks)):
        for b, rows in enumerate(groups):
            block = layout.blocks[b] if b < len(layout.blocks) else None
            kv_len = layout.kv_lens[b] - (0 if half or block is None else block.num_masks)
            qo.append(qo[-1] + len(rows))
            pages = -(-kv_len // page_size)
            kv_indices += layout.tables[b][:pages]
            kv_indptr.append(len(kv_indices))
            last.append(kv_len - (pages - 1) * page_size)
            if masks is not None and rows:
                vis = torch.tensor([(r.prefix, r.lo, r.hi) for r in rows])[:, :, None]
                k = torch.arange(kv_len)
                masks.append(((k < vis[:, 0]) | ((k >= vis[:, 1]) & (k <= vis[:, 2]))).flatten())
    custom = None if masks is None else torch.cat(masks)  # every sequence has clean rows
    return AttentionPlan(qo, kv_indptr, kv_indices, last, custom)
