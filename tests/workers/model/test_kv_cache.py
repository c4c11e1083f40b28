"""KVPool: paged allocation from a byte budget, MLA latent entries, refusal with sizes, reuse."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hmoe.workers.model.kv_cache import KVCapacityError, KVPool, bytes_per_token, kv_budget_bytes
from hmoe.workers.weights.checkpoint import Checkpoint


def test_mla_caches_the_latent_and_gqa_caches_k_v(tiny_models):
    ds = Checkpoint.open(tiny_models("deepseek_v3", "fp32")).config
    qw = Checkpoint.open(tiny_models("qwen3_moe", "fp32")).config
    mla = KVPool(ds, 4, 16, torch.bfloat16, torch.device("cpu"))
    assert set(mla.data) == {"latent"}
    # 4 blocks of 16 slots, and the scratch block no sequence owns
    assert mla.data["latent"].shape == (ds.num_layers, 80, ds.kv_lora_rank + ds.qk_rope_head_dim)
    assert mla.scratch_block == 4 and mla.free_blocks == 4
    gqa = KVPool(qw, 4, 16, torch.float32, torch.device("cpu"))
    assert set(gqa.data) == {"k", "v"} and gqa.data["k"].shape[-1] == qw.num_kv_heads * qw.head_dim
    assert bytes_per_token(ds, torch.bfloat16) == ds.num_layers * (ds.kv_lora_rank + ds.qk_rope_head_dim) * 2


def test_budget_reserve_refuse_free(tiny_models):
    cfg = Checkpoint.open(tiny_models("deepseek_v3", "fp32")).config
    per_block = bytes_per_token(cfg, torch.float32) * 16
    pool = KVPool.from_budget(cfg, per_block * 10 + 5, 16, torch.float32, torch.device("cpu"))
    assert pool.num_blocks == 10 and pool.capacity_tokens == 160
    pool.reserve("a", 33)  # 3 blocks
    pool.reserve("a", 48)  # still 3
    assert pool.free_blocks == 7
    pool.reserve("b", 100)  # 7 blocks
    assert pool.free_blocks == 0
    with pytest.raises(KVCapacityError) as info:
        pool.reserve("c", 1)
    assert info.value.code == "kv_capacity" and "needs 1 tokens" in str(info.value) and "GiB" in str(info.value)
    assert "c" not in pool.block_tables  # a refused request holds nothing
    slots_a = pool.slots("a", 0, 48)
    assert len(set(slots_a.tolist())) == 48 and not set(slots_a.tolist()) & set(pool.slots("b", 0, 100).tolist())
    pool.free("a")
    pool.free("b")
    assert pool.free_blocks == 10 and not pool.block_tables
    with pytest.raises(KVCapacityError):
        KVPool.from_budget(cfg, per_block - 1, 16, torch.float32, torch.device("cpu"))


def test_the_default_budget_holds_a_longest_prompt_with_its_answer(tiny_models):
    """kv_cache_gib 0: a 32K prompt of Qwen3-30B-A3B's KV shape in bf16 (48 layers x 4 KV heads x 128) and
    2048 tokens to generate fit, where a fixed 2 GiB did not; a tiny model keeps 2 GiB; a set size wins."""
    qw = Checkpoint.open(tiny_models("qwen3_moe", "fp32")).config
    big = dataclasses.replace(qw, num_layers=48, num_kv_heads=4, head_dim=128)
    per_token = bytes_per_token(big, torch.bfloat16)
    assert per_token == 48 * 2 * 4 * 128 * 2 and 32768 * per_token > 2 << 30
    assert kv_budget_bytes(0.0, 32768, 2048, big, torch.bfloat16) == (32768 + 2048) * per_token
    assert kv_budget_bytes(0.0, 32768, 2048, qw, torch.float32) == 2 << 30
    assert kv_budget_bytes(0.5, 32768, 2048, big, torch.bfloat16) == 1 << 29
