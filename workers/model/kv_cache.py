"""KVPool: one paged KV cache per process, allocated once from a byte budget.

Shapes: L layers, S slots (num_blocks * block_size), W entry width.
Each cache entry is a tensor [L, S, W]: MLA models keep one entry, the compressed latent
(kv_lora_rank + qk_rope_head_dim per token); GQA models keep "k" and "v" (kv_heads * head_dim).
A sequence holds whole blocks; its token at position p lives in slot
block_table[p // block_size] * block_size + p % block_size. A block may have several holders (a
prefix cache and the sequences that reuse its prompt prefix): each holds one reference, and the
block is free again when the last lets go. One more block (`scratch_block`) is never handed out:
padding rows of the static decode batch write and read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hmoe.runtime.errors import HmoeError
from hmoe.workers.weights.model_config import ModelConfig

GIB = 1 << 30


class KVCapacityError(HmoeError):
    """A sequence does not fit in what is left of the KV pool."""


def kv_entry_widths(config: ModelConfig) -> dict[str, int]:
    if config.is_mla:
        return {"latent": config.kv_lora_rank + config.qk_rope_head_dim}
    width = config.num_kv_heads * config.head_dim
    return {"k": width, "v": width}


@dataclass
class KVPool:
    config: ModelConfig
    num_blocks: int
    block_size: int
    dtype: torch.dtype
    device: torch.device
    data: dict[str, torch.Tensor] = field(init=False)  # name -> [L, S, W]
    block_tables: dict[str, list[int]] = field(init=False, default_factory=dict)
    _free: list[int] = field(init=False)
    _refs: list[int] = field(init=False)  # per block: its holders (sequences, the prefix cache)

    def __post_init__(self) -> None:
        slots = (self.num_blocks + 1) * self.block_size  # + the scratch block
        self.data = {
            # empty, not zeros: a slot is always written before it is read, and untouched CPU pages cost nothing
            name: torch.empty(self.config.num_layers, slots, width, dtype=self.dtype, device=self.device)
            for name, width in kv_entry_widths(self.config).items()
        }
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._refs = [0] * self.num_blocks

    @classmethod
    def from_budget(
        cls, config: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> KVPool:
        per_block = bytes_per_token(config, dtype) * block_size
        num_blocks = budget_bytes // per_block
        if num_blocks < 1:
            raise KVCapacityError(
                "kv_budget_too_small",
                f"KV budget {budget_bytes / GIB:.3f} GiB holds no block of {block_size} tokens "
                f"({per_block / GIB:.4f} GiB each): raise the KV cache budget",
            )
        return cls(config, int(num_blocks), block_size, dtype, device)

    @property
    def scratch_block(self) -> int:
        """A block no sequence ever owns: padding rows of a static decode batch write and read it."""
        return self.num_blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def bytes_per_token(self) -> int:
        return bytes_per_token(self.config, self.dtype)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reserve(self, seq_id: str, num_tokens: int) -> None:
        """Grow seq_id's blocks to hold num_tokens, or raise KVCapacityError and change nothing."""
        table = self.block_tables.setdefault(seq_id, [])
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            if not table:
                del self.block_tables[seq_id]
            per_token = self.bytes_per_token
            raise KVCapacityError(
                "kv_capacity",
                f"KV pool has {len(self._free) * self.block_size} free token slots "
                f"({len(self._free) * self.block_size * per_token / GIB:.3f} GiB of "
                f"{self.capacity_tokens * per_token / GIB:.3f} GiB), sequence needs {num_tokens} tokens "
                f"({num_tokens * per_token / GIB:.3f} GiB): raise kv_cache_gib or shorten the request",
            )
        for _ in range(max(need, 0)):
            block = self._free.pop()
            self._refs[block] = 1
            table.append(block)

    def share(self, seq_id: str, blocks: list[int]) -> None:
        """Start seq_id's table with blocks another holder keeps (a cached prompt prefix), read-only:
        the sequence writes only positions past them, into blocks `reserve` adds after."""
        assert seq_id not in self.block_tables, seq_id
        for block in blocks:
            self.retain(block)
        self.block_tables[seq_id] = list(blocks)

    def retain(self, block: int) -> None:
        assert self._refs[block] > 0, block  # only a held block gains holders
        self._refs[block] += 1

    def release(self, block: int) -> None:
        self._refs[block] -= 1
        if self._refs[block] == 0:
            self._free.append(block)

    def holders(self, block: int) -> int:
        return self._refs[block]

    def free(self, seq_id: str) -> None:
        for block in reversed(self.block_tables.pop(seq_id, [])):
            self.release(block)

    def slots(self, seq_id: str, start: int, end: int) -> torch.Tensor:
        """Flat slot ids of positions [start, end) of seq_id: [end - start] int64 on the pool's device."""
        table = torch.tensor(self.block_tables[seq_id], dtype=torch.int64)
        positions = torch.arange(start, end, dtype=torch.int64)
        return (table[positions // self.block_size] * self.block_size + positions % self.block_size).to(self.device)


def bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    width = sum(kv_entry_widths(config).values())
    return config.num_layers * width * torch.empty((), dtype=dtype).element_size()


def kv_budget_bytes(kv_cache_gib: float, max_prompt_tokens: int, max_tokens: int, config: ModelConfig, dtype) -> int:
    """[worker] kv_cache_gib in bytes; 0 (the default) = room for one longest prompt with `max_tokens` to
    generate, and at least 2 GiB: a 32K prompt of Qwen3-30B-A3B in bf16 is 3 GiB of KV, of DeepSeek-V3
    2.3 GiB, more than a fixed 2 GiB default held."""
    if kv_cache_gib:
        return int(kv_cache_gib * (1 << 30))
    return max(2 << 30, (max_prompt_tokens + max_tokens) * bytes_per_token(config, dtype))
