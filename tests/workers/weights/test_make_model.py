"""`hmoe make-model` writes exactly the Hugging Face layout: transformers loads it and agrees."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

from hmoe.runtime.tokenizer import load_tokenizer
from hmoe.workers.model.batch import ForwardBatch
from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.weights import make_model as make_model_module
from hmoe.workers.weights.checkpoint import Checkpoint
from hmoe.workers.weights.make_model import make_model

transformers = pytest.importorskip("transformers")


def _digest(path) -> str:
    return hashlib.sha256(
        b"".join(
            (path / f).read_bytes()
            for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")
        )
    ).hexdigest()


def test_deterministic_per_seed(tmp_path):
    a = make_model(tmp_path / "a", "deepseek_v3", "tiny", "fp8", seed=7)
    b = make_model(tmp_path / "b", "deepseek_v3", "tiny", "fp8", seed=7)
    c = make_model(tmp_path / "c", "deepseek_v3", "tiny", "fp8", seed=8)
    assert _digest(a) == _digest(b) != _digest(c)


def test_a_large_model_is_drawn_on_every_core_the_same_on_any_number_of_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(make_model_module, "ONE_STREAM_MAX_VALUES", 0)  # the tiny model takes the large path
    threads = torch.get_num_threads()
    a = make_model(tmp_path / "a", "deepseek_v3", "tiny", "fp8", seed=7)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # one drawing thread instead of one per core
    b = make_model(tmp_path / "b", "deepseek_v3", "tiny", "fp8", seed=7)
    c = make_model(tmp_path / "c", "deepseek_v3", "tiny", "fp8", seed=8)
    assert _digest(a) == _digest(b) != _digest(c)
    assert torch.get_num_threads() == threads  # drawing ran torch single-threaded per thread, then gave it back


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_transformers_loads_it_and_agrees(tiny_models, arch):
    path = tiny_models(arch, "fp32")
    with Checkpoint.open(path) as ck:
        c = ck.config
        bias = ck.raw("model.layers.1.mlp.gate.e_score_correction_bias") if c.use_correction_bias else None
        model = load_model(ck, "cpu", "fp32")
    if arch == "deepseek_v3":  # the non-trivial fields the demo model promises
        assert c.rope.type == "yarn" and c.n_group > 1 and bias.abs().min() > 0 and c.q_lora_rank
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = load_tokenizer(path).encode("The quick brown fox, 0123456789!").ids
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    kv = KVPool(c, 8, 16, torch.float32, torch.device("cpu"))
    kv.reserve("s", len(ids))
    ours = model.forward(ForwardBatch.build(kv, [("s", ids, 0)]), kv, all_logits=True)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert ref.std() > 0.1  # O(1) logits, not a near-uniform random model


def test_tokenizer_round_trips_and_adds_bos(tiny_models):
    tok = load_tokenizer(tiny_models("qwen3_moe", "fp32"))
    text = "Hello wörld — ünïcode ✓ and bytes"
    ids = tok.encode(text).ids
    assert ids[0] == 0 and tok.decode(ids) == text
