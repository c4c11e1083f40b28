"""PackSource: the model runs from a pack alone and matches the checkpoint; views are zero-copy."""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

from hmoe.runtime.sampling_params import SamplingParams
from hmoe.shm import ShmError
from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.model.generate import generate
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.weights.checkpoint import Checkpoint
from hmoe.workers.weights.pack_loader import load_pack
from hmoe.workers.weights.pack_source import PackSource


def _greedy(source, prompt=(5, 9, 2, 44, 7)) -> list[int]:
    model = load_model(source, "cpu", "fp32")
    kv = KVPool(model.config, 4, 16, torch.float32, torch.device("cpu"))
    return list(generate(model, kv, list(prompt), SamplingParams(max_tokens=10)).token_ids)


@pytest.mark.parametrize("arch, dtype", [("deepseek_v3", "bf16"), ("deepseek_v3", "fp8"), ("qwen3_moe", "bf16")])
def test_model_from_a_pack_alone_generates_what_the_checkpoint_does(tiny_models, shm_config, tmp_path, arch, dtype):
    folder = tmp_path / "model"
    shutil.copytree(tiny_models(arch, dtype), folder)
    pack, _ = load_pack(folder, name="m", config=shm_config)
    pack.close()
    with Checkpoint.open(folder) as ckpt:
        want = _greedy(ckpt)
    shutil.rmtree(folder)  # the pack stands alone
    with PackSource.attach("m", shm_config) as source:
        assert source.config.family == arch and source.raw_config["architectures"]
        assert _greedy(source) == want
        assert source.blob("tokenizer.json") is not None


def test_weights_are_zero_copy_views_of_the_pack_without_warnings(tiny_models, shm_config):
    path = tiny_models("deepseek_v3", "bf16")
    pack, _ = load_pack(path, name="m", config=shm_config)
    pack.close()
    with PackSource.attach("m", shm_config, model_dir=path) as source:
        start, end = source.pack.segment.address, source.pack.segment.address + source.pack.segment.nbytes
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            norm = source.weight("model.norm.weight", (source.config.hidden_size,), torch.bfloat16)
            embed = source.raw("model.embed_tokens.weight")
        assert start <= norm.data_ptr() < end and start <= embed.data_ptr() < end
        assert embed.dtype == torch.bfloat16
        converted = source.weight("model.norm.weight", (source.config.hidden_size,), torch.float32)
        assert not start <= converted.data_ptr() < end  # a conversion is a copy
        layer = source.layer_experts(source.config.moe_layer_ids[0])
        for array in layer.arrays.values():
            assert start <= array.ctypes.data < end and not array.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            layer.arrays["gate"][0, 0, 0] = 1


def test_fp8_weights_dequantize_like_the_checkpoint(tiny_models, shm_config):
    path = tiny_models("deepseek_v3", "fp8")
    pack, _ = load_pack(path, name="m", config=shm_config)
    pack.close()
    with PackSource.attach("m", shm_config) as source, Checkpoint.open(path) as ckpt:
        name = "model.layers.0.self_attn.kv_b_proj.weight"
        assert source.is_fp8(name) and source.raw(name).dtype == torch.float8_e4m3fn
        shape = ckpt.shape(name)
        assert torch.equal(source.weight(name, shape, torch.float32), ckpt.weight(name, shape, torch.float32))
        assert (
            "model.layers.1.mlp.experts.0.up_proj.weight" in source
            and "model.layers.0.mlp.experts.0.up_proj.weight" not in source
        )


def test_attach_refuses_a_pack_of_another_checkpoint(tiny_models, shm_config):
    pack, _ = load_pack(tiny_models("deepseek_v3", "bf16"), name="m", config=shm_config)
    pack.close()
    with pytest.raises(ShmError) as err:
        PackSource.attach("m", shm_config, model_dir=tiny_models("qwen3_moe", "bf16"))
    assert err.value.code == "pack_mismatch"


def test_shape_mismatch_is_a_checkpoint_error(tiny_models, shm_config):
    pack, _ = load_pack(tiny_models("qwen3_moe", "bf16"), name="m", config=shm_config)
    pack.close()
    with PackSource.attach("m", shm_config) as source:
        from hmoe.workers.weights.errors import CheckpointError

        with pytest.raises(CheckpointError) as err:
            source.weight("model.norm.weight", (3,), torch.float32)
        assert err.value.code == "tensor_shape"
        with pytest.raises(CheckpointError) as err:
            source.raw("model.nothing")
        assert err.value.code == "tensor_missing"
        assert np.asarray(source.layer_experts(1).arrays["down"]).shape[0] == source.config.num_experts
