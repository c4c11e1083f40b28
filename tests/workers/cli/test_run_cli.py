"""`hmoe` commands run as a user runs them: a real subprocess, its output and exit status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import torch

from hmoe.runtime.sampling_params import SamplingParams
from hmoe.workers.model.causal_lm import load_model
from hmoe.workers.model.generate import generate
from hmoe.workers.model.kv_cache import KVPool
from hmoe.workers.weights.checkpoint import Checkpoint

HMOE = [sys.executable, "-m", "hmoe.runtime.cli"]


def _hmoe(*args):
    return subprocess.run([*HMOE, *args], capture_output=True, text=True, timeout=300)


def test_run_json_matches_in_process_generation(tiny_models):
    path = tiny_models("qwen3_moe", "fp32")
    proc = _hmoe("run", str(path), "--token-ids", "5,9,2,44", "--max-tokens", "12", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    model = load_model(Checkpoint.open(path), "cpu", "fp32")
    kv = KVPool(model.config, 4, 16, torch.float32, torch.device("cpu"))
    expected = generate(model, kv, [5, 9, 2, 44], SamplingParams(max_tokens=12)).token_ids
    assert out["token_ids"] == list(expected) and out["finish_reason"] in ("length", "stop")
    assert isinstance(out["text"], str)


def test_run_streams_text_and_samples_reproducibly(tiny_models):
    path = str(tiny_models("deepseek_v3", "fp32"))
    runs = [
        _hmoe(
            "run", path, "--prompt", "Hello world", "--max-tokens", "8", "--temperature", "0.9", "--seed", "5", "--json"
        )
        for _ in range(2)
    ]
    assert runs[0].returncode == 0, runs[0].stderr
    assert json.loads(runs[0].stdout)["token_ids"] == json.loads(runs[1].stdout)["token_ids"]
    streamed = _hmoe("run", path, "--prompt", "Hello world", "--max-tokens", "8")
    assert streamed.returncode == 0 and "8 tokens" in streamed.stderr


def test_without_a_model_it_says_how_to_make_one():
    proc = _hmoe("run")
    assert proc.returncode == 2 and "hmoe make-model" in proc.stderr


def test_bad_model_is_one_clear_line(tiny_models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models("deepseek_v3", "fp32"), broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00")
    proc = _hmoe("run", str(broken), "--token-ids", "1,2")
    assert proc.returncode == 1
    assert "checkpoint_corrupt" in proc.stderr and "model.safetensors" in proc.stderr
    assert "Traceback" not in proc.stderr
    out_of_vocab = _hmoe("run", str(tiny_models("deepseek_v3", "fp32")), "--token-ids", "1,999999")
    assert out_of_vocab.returncode == 2 and "999999" in out_of_vocab.stderr


def test_run_from_a_pack_alone_and_on_the_cpu_kernels(tiny_models, tmp_path):
    """`hmoe run --pack`: the model folder is not needed; CPU-kernel experts give the torch tokens."""
    import os
    import uuid

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_models("qwen3_moe", "bf16"), model_dir)
    env = dict(os.environ, HMOE_SHM_PREFIX=f"hmoe-test-{uuid.uuid4().hex[:8]}.")

    def hmoe(*args):
        return subprocess.run([*HMOE, *args], capture_output=True, text=True, timeout=300, env=env)

    assert hmoe("shm", "load", str(model_dir), "--name", "cli").returncode == 0
    try:
        shutil.rmtree(model_dir)
        runs = {
            experts: hmoe(
                "run", "--pack", "cli", "--prompt", "Hello", "--max-tokens", "10", "--experts", experts, "--json"
            )
            for experts in ("torch", "cpu")
        }
        for proc in runs.values():
            assert proc.returncode == 0, proc.stderr
        torch_run, cpu_run = (json.loads(runs[e].stdout) for e in ("torch", "cpu"))
        assert cpu_run["token_ids"] == torch_run["token_ids"] and cpu_run["experts"] == "cpu"
        assert torch_run["prompt_token_ids"][0] == 0  # tokenized with the pack's own tokenizer.json (BOS first)
    finally:
        assert hmoe("shm", "rm", "cli").returncode == 0
