"""`hmoe run` and `hmoe make-model`: offline generation in one process, and random checkpoints.
Heavy imports (torch, numba) happen inside the commands."""

from __future__ import annotations

import json
import sys
import time

import click

from hmoe.runtime.cli.options import parse_token_ids, read_value, sampling_options

LONG_PROMPT_TOKENS = 512  # a prompt longer than this is prefilled chunk by chunk, with progress on stderr


@click.command("make-model")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--arch", type=click.Choice(["deepseek_v3", "qwen3_moe"]), default="deepseek_v3", show_default=True)
@click.option(
    "--preset", default="tiny", show_default=True, help="tiny | small | v3 (deepseek_v3) | 30b-a3b (qwen3_moe)"
)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp8"]), default="bf16", show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--layers", type=click.IntRange(min=1), default=None, help="Override the preset's number of layers.")
@click.option(
    "--shard-mb", type=click.IntRange(min=1), default=4096, show_default=True, help="Split safetensors past this size."
)
@click.option("--force", is_flag=True, help="Write into OUT even when it is not empty (its model files are replaced).")
def make_model_cmd(out, arch, preset, dtype, seed, layers, shard_mb, force) -> None:
    """Write a random-weight checkpoint in the Hugging Face layout to OUT (a new or empty folder)."""
    from hmoe.workers.weights.make_model import PRESETS, make_model

    if preset not in PRESETS[arch]:
        raise click.BadParameter(f"{preset!r}; {arch} presets: {', '.join(PRESETS[arch])}", param_hint="--preset")
    start = time.monotonic()

    def progress(done: int) -> None:
        if sys.stderr.isatty():
            rate = done / max(time.monotonic() - start, 1e-9) / 1e9
            click.echo(f"\r  wrote {done / 1e9:.2f} GB ({rate:.2f} GB/s)", err=True, nl=False)

    path = make_model(out, arch, preset, dtype, seed, layers, shard_mb, progress, force)
    if sys.stderr.isatty():
        click.echo("", err=True)
    click.echo(f"wrote {arch} {preset} ({dtype}) to {path} in {time.monotonic() - start:.1f} s")


@click.command("run")
@click.argument("model_dir", required=False, type=click.Path())
@click.option("--pack", "pack_name", help="Run from weight pack NAME in shared memory instead of a model folder.")
@click.option("--prompt", help="Text to continue, - for standard input or @FILE (tokenized with tokenizer.json).")
@sampling_options
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda | cuda:N")
@click.option("--dtype", default="auto", show_default=True, help="auto (bf16 on cpu and cuda) | fp32 | bf16")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file ([shm], [worker]).")
@click.option(
    "--experts",
    type=click.Choice(["torch", "cpu"]),
    default="torch",
    show_default=True,
    help="Routed experts in torch on the device (the reference: no kernel compile), or on the CPU kernels "
    "(what [worker] experts = cpu serves with).",
)
@click.option(
    "--expert-format",
    type=click.Choice(["native", "bf16", "fp8", "int4"]),
    default="native",
    show_default=True,
    help="With --experts cpu from a model folder: the format the kernels read (a pack keeps its own).",
)
@click.option(
    "--group", "group_size", type=click.Choice(["32", "128"]), default="128", show_default=True, help="INT4 group size."
)
@click.option("--kv-cache-gib", type=float, default=None, help="KV cache budget [default: [worker] kv_cache_gib].")
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (token_ids, text, finish_reason, timings)."
)
def run_cmd(
    model_dir,
    pack_name,
    prompt,
    token_ids,
    max_tokens,
    temperature,
    top_p,
    top_k,
    seed,
    device,
    dtype,
    config_path,
    experts,
    expert_format,
    group_size,
    kv_cache_gib,
    as_json,
) -> None:
    """Generate offline, in this process, from MODEL_DIR (a Hugging Face model folder) or --pack NAME."""
    if (model_dir is None) == (pack_name is None):
        raise click.UsageError(
            "give a model folder or --pack NAME (not both). To make a demo model:\n"
            "  hmoe make-model --arch deepseek_v3 --preset tiny demo-model\n"
            "  hmoe run demo-model --prompt 'Hello'"
        )
    if (prompt is None) == (token_ids is None):
        raise click.UsageError("give exactly one of --prompt or --token-ids")
    ctx = click.get_current_context()
    for flag, name in (("--expert-format", "expert_format"), ("--group", "group_size")):
        if experts == "torch" and ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT:
            click.echo(f"warning: {flag} is ignored with --experts torch (it picks the CPU kernels' format)", err=True)
    from hmoe.runtime.config import load_config
    from hmoe.runtime.sampling_params import SamplingParams
    from hmoe.runtime.tokenizer import load_tokenizer
    from hmoe.workers.cli.checks import check_device, check_fits, check_model
    from hmoe.workers.model.causal_lm import load_model
    from hmoe.workers.model.generate import generate
    from hmoe.workers.model.kv_cache import KVPool, kv_budget_bytes

    # The server's checks, with its codes: config ranges, the device, the model, prompt vs context.
    config = load_config(
        config_path, overrides={"worker": {"device": device, "dtype": dtype, "kv_cache_gib": kv_cache_gib}}
    )
    check_device(config.worker.device)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    source, tokenizer_source = _open_source(model_dir, pack_name, config)
    check_model(source.config)
    vocab_size = source.config.vocab_size
    tokenizer = load_tokenizer(tokenizer_source) if tokenizer_source is not None else None
    if token_ids is not None:
        ids = parse_token_ids(token_ids)
        bad = [t for t in ids if not 0 <= t < vocab_size][:5]
        if not ids or bad:
            raise click.BadParameter(
                f"token ids must be in [0, {vocab_size}); got {bad or 'none'}", param_hint="--token-ids"
            )
    elif tokenizer is None:
        raise click.UsageError("this model has no tokenizer.json: pass --token-ids")
    else:
        ids = tokenizer.encode(read_value(prompt, "--prompt")).ids
    check_fits(source.config, len(ids), max_tokens)

    start = time.monotonic()
    backend = _expert_backend(source, experts, expert_format, int(group_size), config.worker.device)
    model = load_model(source, config.worker.device, config.worker.dtype, experts=backend)
    kv = KVPool.from_budget(
        model.config,
        kv_budget_bytes(config.worker.kv_cache_gib, len(ids), max_tokens, model.config, model.dtype),
        config.worker.kv_block_size,
        model.dtype,
        model.device,
    )
    load_s = time.monotonic() - start

    stream = not as_json and tokenizer is not None
    shown = ""
    emitted: list[int] = []

    def on_token(token: int) -> None:
        nonlocal shown
        emitted.append(token)
        if stream:
            text = tokenizer.decode(emitted)
            if not text.endswith("\ufffd"):  # wait for the rest of a split UTF-8 character
                click.echo(text[len(shown) :], nl=False)
                shown = text

    start = time.monotonic()
    result = generate(model, kv, ids, params, on_token, **_prefill_progress(len(ids), config.worker, start))
    gen_s = time.monotonic() - start
    text = tokenizer.decode(list(result.token_ids)) if tokenizer else None
    if as_json:
        click.echo(
            json.dumps(
                {
                    "prompt_token_ids": ids,
                    "token_ids": list(result.token_ids),
                    "text": text,
                    "finish_reason": result.finish_reason,
                    "load_s": round(load_s, 3),
                    "generate_s": round(gen_s, 3),
                    "device": str(model.device),
                    "dtype": str(model.dtype).removeprefix("torch."),
                    "experts": experts,
                }
            )
        )
    else:
        if not stream:
            click.echo(",".join(map(str, result.token_ids)), nl=False)
        click.echo("")
        click.echo(
            f"[{len(result.token_ids)} tokens, {result.finish_reason}, "
            f"{len(result.token_ids) / max(gen_s, 1e-9):.1f} tok/s, load {load_s:.1f} s]",
            err=True,
        )


def _prefill_progress(num_tokens: int, worker_config, start: float) -> dict:
    """generate()'s chunked-prefill arguments for a long prompt: a line per chunk on stderr."""
    if num_tokens <= LONG_PROMPT_TOKENS:
        return {}
    chunk = min(worker_config.prefill_chunk_tokens, LONG_PROMPT_TOKENS)

    def on_prefill(done: int, total: int) -> None:
        end = "" if sys.stderr.isatty() and done < total else "\n"
        click.echo(
            f"\rprefill {done}/{total} prompt tokens ({100 * done // total}%), {time.monotonic() - start:.1f} s",
            err=True,
            nl=False,
        )
        click.echo(end, err=True, nl=False)

    return {"prefill_chunk_tokens": chunk, "on_prefill": on_prefill}


def _open_source(model_dir, pack_name, config):
    """(weight source, what the tokenizer loads from or None): a model folder or an attached pack."""
    if pack_name is not None:
        from hmoe.workers.weights.pack_source import PackSource

        source = PackSource.attach(pack_name, config.shm)
        return source, source.blob("tokenizer.json")
    from hmoe.workers.weights.checkpoint import Checkpoint

    source = Checkpoint.open(model_dir)
    return source, (model_dir if (source.path / "tokenizer.json").is_file() else None)


def _expert_backend(source, experts: str, expert_format: str, group_size: int, device: str):
    """None (torch experts on the device, load_model's default) or the CPU kernels."""
    if experts == "torch":
        return None
    from hmoe.shm.progress import Ticker
    from hmoe.workers.experts.cpu import CpuExperts

    with Ticker("preparing the CPU expert kernels (the first run compiles them, ~40 s; later runs load the cache)"):
        if hasattr(source, "layer_experts"):  # a pack: the kernels read its arrays in place
            return CpuExperts.from_source(source, device)
        from hmoe.workers.weights.pack_loader import resolve_format

        return CpuExperts.from_checkpoint(source, resolve_format(expert_format, group_size, source), device)
