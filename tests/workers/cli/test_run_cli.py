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
    model = load_model(Checkpoint.open(path), "cpu", "auto")  # the dtype `hmoe run` gets by default
    kv = KVPool(model.config, 4, 16, model.dtype, torch.device("cpu"))
    expected = generate(model, kv, [5, 9, 2, 44], SamplingParams(max_tokens=12)).token_ids
    assert out["token_ids"] == list(expected) and out["finish_reason"] in ("length", "stop")
    assert isinstance(out["text"], str)


def test_run_streams_text_and_samples_reproducibly(tiny_models):
    path = str(tiny_models("deepseek_v3", "fp32"))
    # The two sampled runs in this process (the CLI's own code, without two more interpreter starts).
    runs = [
        _invoke("run", path, "--prompt", "Hello world", "--max-tokens", 8, "--temperature", 0.9, "--seed", 5, "--json")
        for _ in range(2)
    ]
    assert runs[0].exit_code == 0, runs[0].output
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
    env = {"HMOE_SHM_PREFIX": f"hmoe-test-{uuid.uuid4().hex[:8]}."}
    run = ["run", "--pack", "cli", "--prompt", "Hello", "--max-tokens", "10", "--json", "--experts"]
    # The load, the torch run and the rm in this process (the CLI's own code); the CPU-kernel run in its own,
    # attaching the pack another process built.
    assert _invoke("shm", "load", model_dir, "--name", "cli", env=env).exit_code == 0
    try:
        shutil.rmtree(model_dir)
        torch_run = _invoke(*run, "torch", env=env)
        assert torch_run.exit_code == 0, torch_run.output
        cpu_run = subprocess.run(
            [*HMOE, *run, "cpu"], capture_output=True, text=True, timeout=300, env=os.environ | env
        )
        assert cpu_run.returncode == 0, cpu_run.stderr
        torch_out, cpu_out = json.loads(torch_run.stdout), json.loads(cpu_run.stdout)
        assert cpu_out["token_ids"] == torch_out["token_ids"] and cpu_out["experts"] == "cpu"
        assert torch_out["prompt_token_ids"][0] == 0  # tokenized with the pack's own tokenizer.json (BOS first)
    finally:
        assert _invoke("shm", "rm", "cli", env=env).exit_code == 0


def _invoke(*args, input=None, env=None):
    from click.testing import CliRunner

    from hmoe.runtime.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], input=input, env=env)


def _one_line(result, code: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: [{code}] ") and result.output.count("\n") == 1, result.output
    assert "Traceback" not in result.output


def test_run_checks_what_the_server_checks_with_its_codes(tiny_models, tmp_path):
    path = tiny_models("deepseek_v3", "fp32")
    if not torch.cuda.is_available():
        _one_line(_invoke("run", path, "--token-ids", "1,2", "--device", "cuda"), "device_unavailable")
    _one_line(_invoke("run", path, "--token-ids", "1,2", "--device", "cuda:99"), "device_unavailable")
    _one_line(_invoke("run", path, "--token-ids", "1,2", "--device", "tpu"), "config_invalid")
    _one_line(_invoke("run", path, "--token-ids", "1,2", "--dtype", "fp16"), "config_invalid")
    too_long = _invoke("run", path, "--token-ids", ",".join(["5"] * 4090), "--max-tokens", "10")
    _one_line(too_long, "context_too_long")
    assert "(4090 tokens) + max_tokens (10) exceeds the model's context of 4096 tokens" in too_long.output
    no_layers = tmp_path / "no-layers"
    shutil.copytree(path, no_layers)
    config = json.loads((no_layers / "config.json").read_text())
    (no_layers / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 0}))
    _one_line(_invoke("run", no_layers, "--token-ids", "1,2"), "config_field")


def test_run_reads_the_prompt_from_stdin_or_a_file_and_shows_prefill_progress(tiny_models, tmp_path):
    path = tiny_models("qwen3_moe", "fp32")
    prompt = "The quick brown fox jumps over the lazy dog. " * 60  # > 512 tokens: prefilled in chunks
    (tmp_path / "prompt.txt").write_text(prompt)
    runs = [
        _invoke("run", path, "--prompt", prompt, "--max-tokens", "3", "--json"),
        _invoke("run", path, "--prompt", "-", "--max-tokens", "3", "--json", input=prompt),
        _invoke("run", path, "--prompt", f"@{tmp_path / 'prompt.txt'}", "--max-tokens", "3", "--json"),
    ]
    for result in runs:
        assert result.exit_code == 0, result.output
    answers = [json.loads(r.stdout) for r in runs]
    assert len(answers[0]["prompt_token_ids"]) > 512
    assert answers[0] == {**answers[1], "load_s": answers[0]["load_s"], "generate_s": answers[0]["generate_s"]}
    assert answers[2]["token_ids"] == answers[0]["token_ids"]
    assert "prefill 512/" in runs[0].stderr and f"prefill {len(answers[0]['prompt_token_ids'])}/" in runs[0].stderr
    # chunked prefill gives the tokens a whole-prompt forward gives
    model = load_model(Checkpoint.open(path), "cpu", "auto")
    kv = KVPool(model.config, 64, 16, model.dtype, torch.device("cpu"))
    expected = generate(model, kv, answers[0]["prompt_token_ids"], SamplingParams(max_tokens=3)).token_ids
    assert answers[0]["token_ids"] == list(expected)


def test_run_warns_about_flags_it_ignores(tiny_models):
    result = _invoke(
        "run", tiny_models("qwen3_moe", "fp32"), "--token-ids", "1,2", "--max-tokens", "1", "--expert-format", "int4"
    )
    assert result.exit_code == 0, result.output
    assert "warning: --expert-format is ignored with --experts torch" in result.stderr


def test_make_model_refuses_a_non_empty_folder_without_force(tmp_path):
    out = tmp_path / "model"
    assert _invoke("make-model", out, "--arch", "qwen3_moe", "--shard-mb", "1").exit_code == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused = _invoke("make-model", out, "--seed", "3")
    _one_line(refused, "output_not_empty")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not a byte changed
    assert _invoke("make-model", out, "--seed", "3", "--force").exit_code == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith("model-") or p.name.endswith(".index.json")]
    assert (out / "model.safetensors").is_file()  # one file now: no shard or index of the old model is left
    Checkpoint.open(out).close()
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # the weights as readable as config.json
    assert _invoke("make-model", tmp_path / "zero", "--layers", "0").exit_code == 2


def test_every_preset_vocabulary_matches_its_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    from hmoe.workers.weights.make_model import make_model

    out = make_model(tmp_path / "small", "deepseek_v3", "small", "bf16", num_layers=1)  # layer 0 is dense: cheap
    vocab = json.loads((out / "config.json").read_text())["vocab_size"]
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert vocab == 8192 and tokenizer.get_vocab_size() == vocab
    assert all(tokenizer.decode([i]) for i in (2, 600, 5000, vocab - 1))  # every id decodes to visible text


def test_a_long_wait_says_what_it_waits_for():
    """The ticker `hmoe run --experts cpu` puts around the kernel compile (~40 s on a first run)."""
    import io
    import threading

    from hmoe.shm.progress import Ticker

    out, said = io.StringIO(), threading.Event()
    out.write = lambda text, write=out.write: (said.set(), write(text))[1]
    with Ticker("compiling", out, after_s=0.01, every_s=0.01):
        said.wait()  # as long as the compile takes: here until its first line
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("compiling... ") and lines[-1].startswith("compiling: done in "), lines
    quiet = io.StringIO()
    with Ticker("quick", quiet, after_s=60):
        pass
    assert quiet.getvalue() == ""  # a short wait says nothing
