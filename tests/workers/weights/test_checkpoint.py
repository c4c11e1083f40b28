"""Checkpoint reading: sharded folders, FP8 block dequantization, and clear errors on bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.weights.checkpoint import Checkpoint
from hmoe.workers.weights.errors import CheckpointError
from hmoe.workers.weights.make_model import make_model

EXPERT = "model.layers.1.mlp.experts.3.gate_proj.weight"


def e4m3_table_f64() -> np.ndarray:
    """Value of every E4M3 code from the format's definition (bias 7, no infinities, S.1111.111 is NaN)."""
    table = np.empty(256)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp, man = (code >> 3) & 0xF, code & 0x7
        if exp == 0xF and man == 0x7:
            table[code] = np.nan
        elif exp == 0:
            table[code] = sign * man / 8 * 2.0**-6
        else:
            table[code] = sign * (1 + man / 8) * 2.0 ** (exp - 7)
    return table


def test_fp8_dequantization_matches_float64_block_reference(tiny_models):
    path = tiny_models("deepseek_v3", "fp8")
    with Checkpoint.open(path) as ck:
        assert ck.config.fp8_block == (128, 128)
        names = [n for n in ck.weight_map if ck.is_fp8(n)]
        assert EXPERT in names and "model.layers.0.self_attn.kv_b_proj.weight" in names
        assert not ck.is_fp8("model.embed_tokens.weight") and not ck.is_fp8("model.layers.1.mlp.gate.weight")
        for name in (EXPERT, "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.2.self_attn.o_proj.weight"):
            codes = ck.raw(name).view(torch.uint8).numpy()
            scale = ck.raw(name + "_scale_inv").numpy().astype(np.float64)
            out_dim, in_dim = codes.shape
            block_scale = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:out_dim, :in_dim]
            ref = (e4m3_table_f64()[codes] * block_scale).astype(np.float32)
            ours = ck.weight(name, (out_dim, in_dim), torch.float32).numpy()
            assert np.array_equal(ours, ref), name
            assert np.abs(ref).max() > 0 and len(np.unique(codes)) > 100


def test_fp8_model_runs_close_to_its_bf16_twin(tiny_models):
    """Same seed, FP8 vs BF16 weights: logits agree to FP8 precision (the quantization is sane)."""
    ids = list(range(2, 12))
    logits = {}
    for dtype in ("bf16", "fp8"):
        with Checkpoint.open(tiny_models("deepseek_v3", dtype)) as ck:
            from hmoe.workers.model.batch import ForwardBatch
            from hmoe.workers.model.kv_cache import KVPool

            model = load_model(ck, "cpu", "fp32")
            kv = KVPool(model.config, 8, 16, torch.float32, torch.device("cpu"))
            kv.reserve("s", len(ids))
            logits[dtype] = model.forward(ForwardBatch.build(kv, [("s", ids, 0)]), kv)
    rel = (logits["fp8"] - logits["bf16"]).norm() / logits["bf16"].norm()
    assert 0 < rel < 0.15


def test_sharded_checkpoint_reads_through_index(tmp_path):
    path = make_model(tmp_path / "m", "qwen3_moe", "tiny", "fp32", seed=2, shard_mb=1)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((path / s).is_file() for s in shards)
    assert not (path / "model.safetensors").exists()
    single = make_model(tmp_path / "s", "qwen3_moe", "tiny", "fp32", seed=2)
    with Checkpoint.open(path) as a, Checkpoint.open(single) as b:
        assert a.weight_map.keys() == b.weight_map.keys()
        for name in ("lm_head.weight", "model.layers.2.mlp.experts.7.down_proj.weight"):
            assert torch.equal(a.raw(name), b.raw(name))


def _copy(tiny_models, tmp_path, dtype="fp32"):
    dst = tmp_path / "model"
    shutil.copytree(tiny_models("deepseek_v3", dtype), dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _error(path, load=False) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        ck = Checkpoint.open(path)
        if load:
            load_model(ck, "cpu", "fp32")
    return info.value


def test_missing_shard_is_named(tmp_path):
    path = make_model(tmp_path / "m", "deepseek_v3", "tiny", "fp32", shard_mb=1)
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    err = _error(path)
    assert err.code == "shard_missing" and victim.name in str(err)


def test_truncated_safetensors_is_named(tiny_models, tmp_path):
    path = _copy(tiny_models, tmp_path)
    weights = path / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    err = _error(path)
    assert err.code == "checkpoint_corrupt" and "model.safetensors" in str(err)


def test_wrong_tensor_shape_is_named(tiny_models, tmp_path):
    path = _copy(tiny_models, tmp_path)
    _edit_config(path, moe_intermediate_size=64)
    err = _error(path, load=True)
    assert err.code == "tensor_shape" and "model.layers.1" in str(err) and "[128, 256]" in str(err)


@pytest.mark.parametrize(
    "change, code, words",
    [
        (
            {"architectures": ["LlamaForCausalLM"]},
            "unsupported_architecture",
            ["LlamaForCausalLM", "Qwen3MoeForCausalLM"],
        ),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "unsupported_rope", ["longrope", "yarn"]),
        ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "unsupported_quant", ["gptq", "fp8"]),
        (
            {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
            "unsupported_quant",
            ["[64, 64]"],
        ),
        ({"hidden_size": "wide"}, "config_field", ["hidden_size"]),
        ({"n_group": 3}, "config_field", ["n_group"]),
    ],
)
def test_unsupported_config_names_field_and_alternatives(tiny_models, tmp_path, change, code, words):
    path = _copy(tiny_models, tmp_path)
    _edit_config(path, **change)
    err = _error(path)
    assert err.code == code
    for word in words:
        assert word in str(err)


def test_not_a_model_folder(tmp_path):
    assert _error(tmp_path / "nope").code == "model_not_found"
    (tmp_path / "empty").mkdir()
    assert _error(tmp_path / "empty").code == "model_not_found"
    (tmp_path / "empty" / "config.json").write_text("{not json")
    assert _error(tmp_path / "empty").code == "config_invalid"
