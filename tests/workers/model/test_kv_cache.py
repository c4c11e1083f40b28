"""KVPool: paged allocation from a byte budget, MLA latent entries, refusal with sizes, reuse."""

from __future__ import annotations

import pytest
import torch

from hmoe.workers.model.kv_cache import KVCapacityError, KVPool, bytes_per_token
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
