"""PrefixCache: the KV of prompts already prefilled, kept in full KV-pool blocks and reused by prompts
that start with the same tokens.

A block is keyed by a hash chain: key(i) = H(key(i - 1), token ids of block i), and key(-1) = H(the
model, its KV dtype and the block size), so a key names the whole prefix up to its block's end, and
equal keys mean equal KV (the positions, hence the rotary phases, are equal too). The cache holds one
reference on each cached block (KVPool.retain); a prompt that matches takes one more per block it
reuses (KVPool.share) and writes only the blocks after them, so a cached block is never written while
read, and neither a cancel nor an eviction frees a block someone still holds.

Eviction is least recently used within `budget_blocks`, and only of blocks the cache alone holds.
A match or an insert touches a prefix's blocks from its last to its first, so a prefix's first block
is always more recent than its later ones and eviction trims prefixes from their ends: a surviving
block is always reachable from the start.

At most (prompt length - 1) tokens are reused: the prompt's last token runs through the model again,
since its logits give the first output token.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

from hmoe.runtime.codec import chain_keys
from hmoe.workers.model.kv_cache import KVPool


class PrefixCache:
    def __init__(self, kv: KVPool, budget_blocks: int, model_key: str):
        self.kv, self.budget_blocks = kv, budget_blocks
        self.root = hashlib.blake2b(f"{model_key}|{kv.dtype}|{kv.block_size}".encode(), digest_size=16).digest()
        self.blocks: OrderedDict[bytes, int] = OrderedDict()  # chain key -> block, least recently used first
        self.query_tokens = 0  # prompt tokens looked up, and of those found cached (counters since start)
        self.hit_tokens = 0

    @property
    def cached_tokens(self) -> int:
        return len(self.blocks) * self.kv.block_size

    @property
    def capacity_tokens(self) -> int:
        return self.budget_blocks * self.kv.block_size

    def keys(self, token_ids: Sequence[int], num_blocks: int) -> list[bytes]:
        """The chain keys of the first num_blocks full blocks of token_ids."""
        return chain_keys(token_ids, self.kv.block_size, num_blocks, self.root)

    def match(self, token_ids: Sequence[int]) -> list[int]:
        """The blocks of the longest cached prefix of token_ids (at most len - 1 tokens), touched."""
        keys = self.keys(token_ids, (len(token_ids) - 1) // self.kv.block_size)
        found = 0
        while found < len(keys) and keys[found] in self.blocks:
            found += 1
        self._touch(keys[:found])
        return [self.blocks[k] for k in keys[:found]]

    def count(self, prompt_tokens: int, cached_tokens: int) -> None:
        """A prompt that got its KV: prompt_tokens looked up, cached_tokens of them found."""
        self.query_tokens += prompt_tokens
        self.hit_tokens += cached_tokens

    def insert(self, seq_id: str, token_ids: Sequence[int]) -> None:
        """Keep the full blocks of seq_id's prompt (its KV written up to len(token_ids)), as far as the
        budget allows: blocks already cached stay as they are, new ones take the place of the least
        recently used blocks nobody else holds."""
        table = self.kv.block_tables[seq_id]
        keys = self.keys(token_ids, min(len(token_ids) // self.kv.block_size, len(table)))
        new = [i for i, key in enumerate(keys) if key not in self.blocks]
        over = len(self.blocks) + len(new) - self.budget_blocks
        if over > 0:
            short = over - self._evict(over, keep=set(keys))
            if short > 0:  # full of blocks in use: keep what fits, a prefix of the new ones
                new = new[: len(new) - short]
        for i in new:
            self.kv.retain(table[i])
            self.blocks[keys[i]] = table[i]
        self._touch([k for k in keys if k in self.blocks])

    def make_room(self, num_blocks: int) -> None:
        """Evict until the KV pool has num_blocks free (or nothing more can go)."""
        self._evict(num_blocks - self.kv.free_blocks)

    def clear(self) -> None:
        for block in self.blocks.values():
            self.kv.release(block)
        self.blocks.clear()

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the first block ends most recent
            self.blocks.move_to_end(key)

    def _evict(self, count: int, keep: set[bytes] | frozenset[bytes] = frozenset()) -> int:
        """Drop up to count least recently used blocks that only the cache holds (never those in keep);
        return how many went."""
        if count <= 0:
            return 0
        victims = []
        for key, block in self.blocks.items():
            if self.kv.holders(block) == 1 and key not in keep:
                victims.append(key)
                if len(victims) == count:
                    break
        for key in victims:
            self.kv.release(self.blocks.pop(key))
        return len(victims)
