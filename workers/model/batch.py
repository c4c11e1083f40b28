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


def causal_mask(q_len: int, ctx_len: int, device: torch.device) -> torch.Tensor | None:
    """[T, S] bool, True where query i (at position ctx_len - q_len + i) may attend key j."""
    if q_len == 1:
        return None
    rows = torch.arange(q_len, device=device)[:, None] + (ctx_len - q_len)
    return torch.arange(ctx_len, device=device)[None, :] <= rows
