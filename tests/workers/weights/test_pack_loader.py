"""pack_loader: a checkpoint becomes a pack whose every tensor reads back as the checkpoint's."""

from __future__ import annotations

import io
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hmoe.kernels.formats import ExpertFormat, decode_expert
from hmoe.shm import ShmError, list_packs
from hmoe.shm.progress import Progress
from hmoe.workers.weights.checkpoint import Checkpoint
from hmoe.workers.weights.errors import CheckpointError
from hmoe.workers.weights.pack_loader import default_pack_name, index_safetensors, load_pack


@pytest.mark.parametrize(
    "arch, dtype, kind", [("deepseek_v3", "bf16", "bf16"), ("deepseek_v3", "fp8", "fp8"), ("qwen3_moe", "fp32", "bf16")]
)
def test_native_pack_keeps_every_tensor_and_the_checkpoint_format(tiny_models, shm_config, arch, dtype, kind):
    path = tiny_models(arch, dtype)
    pack, built = load_pack(path, name="m", config=shm_config, threads=2)
    with pack, Checkpoint.open(path) as ckpt:
        assert built and pack.manifest.experts["kind"] == kind
        assert pack.manifest.source == json.loads(json.dumps(ckpt.identity()))
        c = ckpt.config
        for name in ckpt.weight_map:
            if ".mlp.experts." in name:
                continue
            stored = ckpt.raw(name)
            assert pack.entry(name).shape == tuple(stored.shape)
            assert pack.array(name).tobytes() == stored.contiguous().view(torch.uint8).numpy().tobytes()
        fmt = ExpertFormat(kind)
        for layer_id in c.moe_layer_ids:
            arrays = pack.expert_arrays(layer_id)
            for expert in (0, c.num_experts - 1):
                for proj, shape in (
                    ("gate", (c.moe_intermediate_size, c.hidden_size)),
                    ("down", (c.hidden_size, c.moe_intermediate_size)),
                ):
                    want = ckpt.weight(
                        f"model.layers.{layer_id}.mlp.experts.{expert}.{proj}_proj.weight", shape, torch.float32
                    )
                    if dtype == "fp32":  # native means bf16: one rounding
                        want = want.to(torch.bfloat16).float()
                    got = decode_expert(fmt, arrays, expert, proj, c.hidden_size, c.moe_intermediate_size)
                    np.testing.assert_array_equal(got.astype(np.float32), want.numpy())
        assert pack.blob("tokenizer.json") == (path / "tokenizer.json").read_bytes()
        assert pack.blob("generation_config.json") == (path / "generation_config.json").read_bytes()


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_int4_pack_is_close_to_the_checkpoint(tiny_models, shm_config, dtype):
    path = tiny_models("deepseek_v3", dtype)
    pack, _ = load_pack(path, name="q", experts="int4", group_size=32, config=shm_config, threads=2)
    with pack, Checkpoint.open(path) as ckpt:
        c = ckpt.config
        assert pack.manifest.experts == {"kind": "int4", "group_size": 32, "name": "int4-g32"}
        layer_id = c.moe_layer_ids[-1]
        want = ckpt.weight(
            f"model.layers.{layer_id}.mlp.experts.3.up_proj.weight",
            (c.moe_intermediate_size, c.hidden_size),
            torch.float32,
        )
        got = decode_expert(
            ExpertFormat("int4", 32), pack.expert_arrays(layer_id), 3, "up", c.hidden_size, c.moe_intermediate_size
        )
        step = np.abs(want.numpy()).reshape(want.shape[0], -1, 32).max(axis=2).repeat(32, axis=1) / 7
        assert np.all(np.abs(got - want.numpy()) <= step * 0.5 + 1e-3)  # within half a quantization step


def test_default_name_and_reloading(tiny_models, shm_config):
    path = tiny_models("deepseek_v3", "fp8")
    assert default_pack_name(path, ExpertFormat("fp8")).endswith("-fp8")
    pack, built = load_pack(path, config=shm_config, threads=1)
    pack.close()
    again, built_again = load_pack(path, config=shm_config, threads=1)
    again.close()
    assert built and not built_again and [p.name for p in list_packs(shm_config)] == [pack.name]
    with pytest.raises(ShmError) as err:
        load_pack(path, name=pack.name, experts="int4", config=shm_config)  # same name, another format
    assert err.value.code == "pack_mismatch" and "hmoe shm rm" in str(err.value)


def test_checkpoint_without_an_expert_is_refused_before_any_segment(tiny_models, shm_config, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models("deepseek_v3", "bf16"), broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.down_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_pack(broken, name="b", config=shm_config)
    assert err.value.code == "tensor_missing" and "experts.5.down_proj" in str(err.value)
    assert shm_config.pack_names() == []


def test_fp8_nan_codes_in_an_expert_are_refused(tiny_models, shm_config, tmp_path):
    broken = tmp_path / "nan"
    shutil.copytree(tiny_models("deepseek_v3", "fp8"), broken)
    tensors = load_file(broken / "model.safetensors")
    name = "model.layers.2.mlp.experts.7.gate_proj.weight"
    codes = tensors[name].view(torch.uint8).clone()
    codes[3, 5] = 0x7F
    tensors[name] = codes.view(torch.float8_e4m3fn)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_pack(broken, name="n", config=shm_config)
    assert err.value.code == "checkpoint_corrupt" and "NaN" in str(err.value) and name in str(err.value)
    assert shm_config.pack_names() == []  # the half-built pack was removed


def test_truncated_safetensors_is_a_clear_error(tiny_models, tmp_path):
    file = tmp_path / "model.safetensors"
    data = (tiny_models("deepseek_v3", "bf16") / "model.safetensors").read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        index_safetensors(file)
    assert err.value.code == "checkpoint_corrupt"


def test_unknown_expert_format_is_refused(tiny_models, shm_config):
    with pytest.raises(CheckpointError, match="native, bf16, fp8, int4"):
        load_pack(tiny_models("deepseek_v3", "bf16"), experts="int3", config=shm_config)
    with pytest.raises(CheckpointError, match="32 or 128"):
        load_pack(tiny_models("deepseek_v3", "bf16"), experts="int4", group_size=64, config=shm_config)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_one_updating_line_and_logs(caplog, monkeypatch):
    monkeypatch.setattr("hmoe.shm.progress.TTY_INTERVAL_S", 0.0)
    terminal = _Terminal()
    progress = Progress("loading x", 4_000_000_000, terminal, log_interval_s=0.0)
    with caplog.at_level(logging.INFO, logger="hmoe.shm.progress"):
        progress.advance(1_000_000_000)
        progress.advance(1_000_000_000)
        progress.finish()
    frames = [f for f in terminal.getvalue().split("\r") if "ETA" in f]
    assert "2.00/4.00 GB (50%)" in frames[-1] and "GB/s" in frames[-1]
    assert terminal.getvalue().endswith("\r\x1b[K")  # the line is cleared when done
    assert "\n" not in terminal.getvalue()  # one line, redrawn in place
    assert any("1.00/4.00 GB (25%)" in r.message for r in caplog.records)
    assert "2.00 GB in" in caplog.records[-1].message


def test_load_logs_progress_without_a_terminal(tiny_models, shm_config, caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO):
        pack, _ = load_pack(tiny_models("qwen3_moe", "bf16"), name="m", config=shm_config, stream=stream)
    pack.close()
    assert stream.getvalue() == ""  # not a terminal: no control characters
    assert any("loading m:" in r.message and "GB/s" in r.message for r in caplog.records)
