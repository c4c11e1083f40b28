"""ForwardBatch: the tokens of one model forward, flattened across sequences, with their KV slots.

Shapes: N new tokens in the batch (all sequences), B sequences, D decoding sequences, S longest context.
A sequence contributes q_len new tokens at positions [ctx_len - q_len, ctx_len): a whole prompt,
a prompt chunk, or one decode token. Attention reads the sequence's first ctx_len cache slots.
Sequences decoding one token each are also gathered into one padded group, so attention runs
once for all of them instead of once per sequence (one kernel launch, not D).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from hmoe.workers.model.kv_cache import KVPool


@dataclass(frozen=True)
class SeqView:
    q_start: int  # first row of this sequence in the batch
    q_len: int
    ctx_len: int  # past + new tokens
    ctx_slots: torch.Tensor  # [ctx_len] int64


@dataclass(frozen=True)
class DecodeGroup:
    """The one-token sequences of a batch, attended together over their padded contexts."""

    rows: torch.Tensor  # [D] their rows in the batch
    slots: torch.Tensor  # [D, S] cache slots, padded with slot 0
    mask: torch.Tensor  # [D, 1, 1, S] True where a slot is part of the context


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] int64
    write_slots: torch.Tensor  # [N] int64, where the new tokens' KV goes
    seqs: tuple[SeqView, ...]  # every sequence not in `decode`
    last_rows: torch.Tensor  # [B] row of each sequence's last token (whose logits are sampled)
    decode: DecodeGroup | None = None  # two or more one-token sequences

    @classmethod
    def build(cls, pool: KVPool, items: list[tuple[str, list[int], int]]) -> ForwardBatch:
        """items: (seq_id, new token ids, number of tokens already cached). KV must be reserved."""
        ids: list[int] = []
        positions: list[torch.Tensor] = []
        write: list[torch.Tensor] = []
        seqs: list[SeqView] = []
        for seq_id, new_ids, past_len in items:
            ctx_len = past_len + len(new_ids)
            ctx_slots = pool.slots(seq_id, 0, ctx_len)
            seqs.append(SeqView(len(ids), len(new_ids), ctx_len, ctx_slots))
            ids.extend(new_ids)
            positions.append(torch.arange(past_len, ctx_len, dtype=torch.int64))
            write.append(ctx_slots[past_len:])
        device = pool.device
        one = [s for s in seqs if s.q_len == 1]
        decode = None
        if len(one) >= 2:
            longest = max(s.ctx_len for s in one)
            slots = torch.zeros(len(one), longest, dtype=torch.int64, device=device)
            mask = torch.zeros(len(one), 1, 1, longest, dtype=torch.bool, device=device)
            for i, s in enumerate(one):
                slots[i, : s.ctx_len] = s.ctx_slots
                mask[i, ..., : s.ctx_len] = True
            decode = DecodeGroup(torch.tensor([s.q_start for s in one], dtype=torch.int64).to(device), slots, mask)
        return cls(
            input_ids=torch.tensor(ids, dtype=torch.int64).to(device),
            positions=torch.cat(positions).to(device),
            write_slots=torch.cat(write),
            seqs=tuple(s for s in seqs if decode is None or s.q_len != 1),
            last_rows=torch.tensor([s.q_start + s.q_len - 1 for s in seqs], dtype=torch.int64).to(device),
            decode=decode,
        )


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One sequence's new tokens attending their context: q [h, T, d], k [g, S, d], v [g, S, dv] -> [h, T, dv];
    query i (at position S - T + i) sees keys 0 .. S - T + i (g divides h).

    NOTE: SDPA runs a fused kernel (flash, memory-efficient) only on 4-D inputs and never with a
    materialized mask; 3-D inputs or a [T, S] bool mask take its math kernel, which on a GPU scores
    in float32 [h, T, S] and made a long prompt's chunks cost O(T * S) memory traffic. So: 4-D, and
    the mask as `is_causal` (T == S) or a lower-right causal bias (a later chunk), which flash reads
    as the bottom-right-aligned causal mask without building it.
    """
    t, s = q.shape[1], k.shape[1]
    mask = causal_lower_right(t, s) if 1 < t < s else None
    is_causal = t == s and t > 1
    o = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
    )
    return o[0]


@dataclass(frozen=True)
class DecodeView:
    """What attention reads for a step of one-token rows (see paged_attention.py)."""

    write_slots: torch.Tensor  # [B] int64
    block_table: torch.Tensor  # [B, MB] int32
    seq_lens: torch.Tensor  # [B] int64


BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)  # decode rows per micro-batch a graph is captured for


def bucket_for(rows: int, capacity: int) -> int:
    """The smallest bucket holding `rows` (the capacity itself past the last bucket)."""
    return next((b for b in BUCKETS if rows <= b <= capacity), capacity)


class DecodeRows:
    """One decode micro-batch with static shapes: each running request keeps its row; device buffers
    for input ids, positions, context lengths, write slots and the block table are updated in place.

    Shapes: R rows (capacity), MB block-table width. Rows [0, n) hold requests; rows [n, bucket) are
    padding that attends one token of a scratch block, so a graph captured for the bucket stays valid.
    Per step the host fills pinned mirrors and copies them with two transfers (meta, block table).
    """

    def __init__(self, pool: KVPool, capacity: int, max_blocks: int, scratch_block: int):
        self.pool, self.capacity, self.max_blocks = pool, capacity, max_blocks
        self.scratch_slot = scratch_block * pool.block_size
        device, pin = pool.device, pool.device.type == "cuda"
        # meta rows: input ids, positions, seq lens, write slots
        self.meta = torch.zeros(4, capacity, dtype=torch.int64, device=device)
        self.block_table = torch.full((capacity, max_blocks), scratch_block, dtype=torch.int32, device=device)
        self._meta_host = torch.zeros(4, capacity, dtype=torch.int64, pin_memory=pin)
        self._table_host = torch.full((capacity, max_blocks), scratch_block, dtype=torch.int32, pin_memory=pin)
        self._meta_np, self._table_np = self._meta_host.numpy(), self._table_host.numpy()
        self.request_ids: list[str] = []  # row -> request
        self.width = 1  # block-table columns the longest row uses (the CPU reference reads only these)

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.meta[0]

    @property
    def positions(self) -> torch.Tensor:
        return self.meta[1]

    @property
    def seq_lens(self) -> torch.Tensor:
        return self.meta[2]

    @property
    def write_slots(self) -> torch.Tensor:
        return self.meta[3]

    def view(self, bucket: int, full_width: bool) -> DecodeView:
        """The first `bucket` rows; the whole block table (a graph's fixed shape) or the used columns."""
        return DecodeView(
            self.write_slots[:bucket],
            self.block_table[:bucket, : self.max_blocks if full_width else self.width],
            self.seq_lens[:bucket],
        )

    def add(self, request_id: str) -> None:
        """A new row at the end; its block table row is written once, here."""
        row = len(self.request_ids)
        table = self.pool.block_tables[request_id]
        if row >= self.capacity or len(table) > self.max_blocks:
            raise ValueError(f"row {row} of {self.capacity} or {len(table)} blocks of {self.max_blocks}")
        self.request_ids.append(request_id)
        self._table_np[row, : len(table)] = table
        self._table_np[row, len(table) :] = self._table_np[row, 0]

    def remove(self, request_id: str) -> None:
        """The last row moves into the hole: one row copied, the others keep theirs."""
        row = self.request_ids.index(request_id)
        last = len(self.request_ids) - 1
        if row != last:
            self.request_ids[row] = self.request_ids[last]
            self._table_np[row] = self._table_np[last]
        self.request_ids.pop()
        self._table_np[last] = self.scratch_slot // self.pool.block_size

    def prepare(self, tokens: list[int], ctx_lens: list[int], bucket: int) -> None:
        """Stage one step: row i decodes tokens[i] at position ctx_lens[i] (tokens already cached)."""
        n, bs = len(tokens), self.pool.block_size
        meta = self._meta_np
        meta[0, :n] = tokens
        meta[1, :n] = ctx_lens
        meta[2, :n] = [c + 1 for c in ctx_lens]
        table = self._table_np
        meta[3, :n] = [int(table[r, c // bs]) * bs + c % bs for r, c in enumerate(ctx_lens)]
        meta[0:2, n:bucket] = 0
        meta[2, n:bucket] = 1
        meta[3, n:bucket] = self.scratch_slot
        self.width = min(self.max_blocks, max(ctx_lens, default=0) // bs + 1)
        self.meta.copy_(self._meta_host, non_blocking=True)
        self.block_table[:bucket].copy_(self._table_host[:bucket], non_blocking=True)
