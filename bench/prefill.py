"""Prefill speed: today's CPU-kernel path, stream-loading prefill and the resident-experts floor, one run.

    python bench/prefill.py [--model DIR | --make ARCH:PRESET:DTYPE[:LAYERS]] [--device cuda] [--lengths 1024,...]
                            [--cpu-max 8192] [--chunk 2048] [--ring 2] [--scratch-experts N] [--json PATH]
                            [--profile DIR]

Per prompt length, in-process, the worker's code paths:
    cpu        chunk-major, routed experts on the CPU kernels over the pack (today's path; stops at --cpu-max)
    slp        one layer-major pass over all chunks, experts streamed from the pinned pack (StreamingExperts)
    resident   the same pass with every layer's stored experts already on the GPU: no copies (the compute floor)
    dslp       with --devices (e.g. cuda:0,cuda:1): the streamed pass expert-parallel over those devices, each
               streaming its share of every layer over its own link (the prefill worker's [worker] devices)

    stream_floor_s   MoE layers x one layer's expert bytes / the pinned H2D bandwidth measured in this run
    floor_s          max(stream_floor_s, resident seconds)
    ratio            (slp rows) seconds / floor_s; (dslp rows) seconds / (stream_floor_s / devices), the floor
                     of N links each carrying 1/N of the bytes
    dslp_gain        slp seconds / dslp seconds at the longest length (the issue asks it at 32K)
Also: the threshold the worker would choose (one layer's copy time / the CPU kernels' time per token
and layer) and the GPU memory each mode peaked at.

--profile DIR: per length, one more pass of slp and resident inside torch.profiler (CPU and CUDA activities);
DIR/MODE-TOKENS.txt holds key_averages by device time and by CPU time (top 40, with call counts) under a line
of kernel launches and host synchronizations per MoE layer, DIR/MODE-TOKENS.json the trace (chrome://tracing).
On a CPU the first table sorts by CPU time too.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import hmoe.workers  # noqa: F401  (before torch: the workers' OpenMP wait policy, read when libgomp loads)

# isort: split
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_name, made_model, write_results  # noqa: E402

from hmoe.runtime.config import load_config  # noqa: E402
from hmoe.shm import ShmConfig, ShmError  # noqa: E402
from hmoe.shm.registry import remove_pack  # noqa: E402
from hmoe.workers.engine.ranks import Ranks, device_free_bytes, parse_devices, streamed_prefill  # noqa: E402
from hmoe.workers.experts.cpu import CpuExperts  # noqa: E402
from hmoe.workers.experts.streaming import StreamingExperts, measure_copy_s, measure_cpu_s_per_token  # noqa: E402
from hmoe.workers.model.batch import ForwardBatch  # noqa: E402
from hmoe.workers.model.causal_lm import load_model  # noqa: E402
from hmoe.workers.model.kv_cache import KVPool  # noqa: E402
from hmoe.workers.weights.pack_loader import load_pack  # noqa: E402
from hmoe.workers.weights.pack_source import PackSource  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model, kv, prompt: list[int], chunk: int, experts, layer_major: bool) -> float:
    """Seconds to prefill `prompt` (KV reserved and freed here)."""
    kv.reserve("bench", len(prompt))
    device = model.device
    try:
        _sync(device)
        start = time.perf_counter()
        batches = [ForwardBatch.build(kv, [("bench", prompt[i : i + chunk], i)]) for i in range(0, len(prompt), chunk)]
        if layer_major:
            stream_pass = experts.open_pass() if callable(getattr(experts, "open_pass", None)) else experts
            model.forward_overlapped(batches, kv, experts=stream_pass)
        else:
            for batch in batches:
                model.forward(batch, kv, experts=experts)
        _sync(device)
        return time.perf_counter() - start
    finally:
        kv.free("bench")


SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
LAUNCH_OPS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile_pass(run_pass, device: torch.device, moe_layers: int, out_dir: Path, name: str) -> None:
    """run_pass() once inside torch.profiler; its op tables to out_dir/NAME.txt, its trace to NAME.json."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        seconds = run_pass()
    ops = prof.key_averages()
    counts = {e.key: e.count for e in ops}
    launches = sum(counts.get(k, 0) for k in LAUNCH_OPS)
    aten_calls = sum(n for k, n in counts.items() if k.startswith("aten::"))  # nested calls included
    syncs = ", ".join(f"{k} {counts[k] / moe_layers:g}" for k in SYNC_OPS if k in counts) or "none"
    first = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    head = (
        f"# {name}: {seconds:.3f} s profiled, {moe_layers} MoE layers; per layer: "
        f"{aten_calls / moe_layers:.0f} aten calls, "
        f"{launches / moe_layers:.0f} kernel launches, host syncs: {syncs}\n"
    )
    tables = [
        f"\n## by {key}\n{ops.table(sort_by=key, row_limit=40, max_name_column_width=60)}\n"
        for key in dict.fromkeys((first, "self_cpu_time_total"))
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.txt").write_text(head + "".join(tables))
    prof.export_chrome_trace(str(out_dir / f"{name}.json"))
    print(f"  profiled {name}: {seconds:.3f} s -> {out_dir / name}.txt", flush=True)


class Resident:
    """open_pass() of a StreamingExperts whose ring holds every layer (copied once, before timing)."""

    def __init__(self, streaming: StreamingExperts):
        self.streaming = streaming

    def open_pass(self):
        return self.streaming.open_pass(resident=True)


def run(args) -> dict:
    device = torch.device(args.device)
    model_dir = Path(args.model) if args.model else made_model(args.make, args.work_dir)
    shm = ShmConfig()
    start = time.perf_counter()
    pack, _ = load_pack(model_dir, args.pack, config=shm, stream=sys.stderr)
    print(f"pack {pack.name} ready in {time.perf_counter() - start:.0f} s", flush=True)
    source = PackSource.attach(pack.name, shm)
    pinned = False
    if device.type == "cuda":
        try:
            source.pin()
            pinned = True
        except ShmError as exc:
            print(f"NOT PINNED: {exc.message}", flush=True)
    cpu = CpuExperts.from_source(source, device, args.threads or None)
    model = load_model(source, device, "auto", experts=cpu)
    cfg = model.config
    kv = KVPool.from_budget(cfg, int(args.kv_gib * 2**30), 16, model.dtype, device)
    streaming = StreamingExperts.from_source(source, device, model.dtype, args.ring, None, args.scratch_experts)
    grouped_gemm, stream_device_bytes = streaming.grouped_gemm, streaming.device_bytes
    copy_s = measure_copy_s(streaming)
    h2d_gbs = streaming.layer_bytes / copy_s / 1e9
    cpu_s_per_token = measure_cpu_s_per_token(cpu, cfg)
    threshold = max(1, int(copy_s / cpu_s_per_token))
    moe_layers = len(cfg.moe_layer_ids)
    print(
        f"layer {streaming.layer_bytes / 1e9:.3f} GB copies in {copy_s * 1e3:.2f} ms ({h2d_gbs:.1f} GB/s); "
        f"CPU kernels {cpu_s_per_token * 1e3:.3f} ms per token and layer -> threshold {threshold} tokens",
        flush=True,
    )
    gen = torch.Generator().manual_seed(0)
    warm = torch.randint(0, cfg.vocab_size, (args.chunk + 7,), generator=gen).tolist()
    modes = {"cpu": (cpu, False), "slp": (streaming, True)}
    results, memory, ranks = [], {}, None
    for mode in ("cpu", "slp", "dslp", "resident"):
        if mode == "dslp":
            if not args.devices:
                continue
            ranks = Ranks(_follower_config(args), args.devices)  # rank 0: this process, on args.device
            share = ranks.share(cfg.num_experts)
            ranked = StreamingExperts.from_source(source, device, model.dtype, args.ring, share, args.scratch_experts)
            ranks.least_free_bytes(device_free_bytes(device))  # the start-up steps every follower takes, as the
            ranks.started()  # worker does: without them the first command waits on followers still starting
            run_once = partial(_ranked_prefill, model, kv, ranked, ranks, args.chunk)
        elif mode == "resident":  # the ring grows to every layer: give the streaming ring back first
            del streaming, modes["slp"]
            if device.type == "cuda":
                torch.cuda.empty_cache()
            resident = StreamingExperts.from_source(source, device, model.dtype, moe_layers, None, args.scratch_experts)
            resident.open_pass()(cfg.moe_layer_ids[0], *_one_token(cfg, device, model.dtype))  # copies every layer
            _sync(device)
            modes["resident"] = (Resident(resident), True)
        if mode != "dslp":
            experts, layer_major = modes[mode]
            run_once = partial(_prefill, model, kv, chunk=args.chunk, experts=experts, layer_major=layer_major)
        run_once(warm)  # warm-up: compilation, first touches
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for tokens in args.lengths:
            if mode == "cpu" and tokens > args.cpu_max:
                continue
            prompt = torch.randint(0, cfg.vocab_size, (tokens,), generator=gen).tolist()
            seconds = run_once(prompt)
            results.append({"tokens": tokens, "mode": mode, "seconds": seconds, "tok_s": tokens / seconds})
            print(f"{mode:9s} {tokens:6d} tokens: {seconds:8.3f} s  {tokens / seconds:10.1f} tok/s", flush=True)
            if args.profile and mode != "cpu":
                profile_pass(partial(run_once, prompt), device, moe_layers, Path(args.profile), f"{mode}-{tokens}")
        if device.type == "cuda":
            memory[mode] = torch.cuda.max_memory_allocated(device)
        if mode == "dslp":
            ranks.stop()
            del ranked
    floors = {}
    for tokens in args.lengths:
        stream_floor_s = moe_layers * streaming_bytes(source) / (h2d_gbs * 1e9)
        resident_s = next(r["seconds"] for r in results if r["mode"] == "resident" and r["tokens"] == tokens)
        floors[tokens] = {"stream_floor_s": stream_floor_s, "floor_s": max(stream_floor_s, resident_s)}
    for row in results:
        row.update(floors[row["tokens"]])
        if row["mode"] == "slp":
            row["ratio"] = row["seconds"] / row["floor_s"]
        if row["mode"] == "dslp":
            row["ratio"] = row["seconds"] / (row["stream_floor_s"] / len(args.devices))
    dslp_gain = None
    if args.devices:
        longest = max(r["tokens"] for r in results if r["mode"] == "dslp")
        by_mode = {r["mode"]: r["seconds"] for r in results if r["tokens"] == longest}
        dslp_gain = by_mode["slp"] / by_mode["dslp"]
    layer_bytes = streaming_bytes(source)
    cpu.close()
    del resident, modes
    source.close()
    pack.close()
    remove_pack(pack.name, shm, force=True)
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "model": {
            "arch": cfg.architecture,
            "dir": str(model_dir),
            "layers": cfg.num_layers,
            "moe_layers": moe_layers,
            "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok,
            "hidden": cfg.hidden_size,
            "inter": cfg.moe_intermediate_size,
            "expert_format": source.expert_format.name,
            "dtype": str(model.dtype),
        },
        "devices": args.devices or [args.device],
        "dslp_gain": dslp_gain,
        "chunk_tokens": args.chunk,
        "ring_layers": args.ring,
        "scratch_experts": args.scratch_experts,
        "layer_bytes": layer_bytes,
        "h2d_gbs": h2d_gbs,
        "pack_pinned": pinned,
        "cpu_s_per_token_layer": cpu_s_per_token,
        "threshold_tokens": threshold,
        "grouped_gemm": grouped_gemm,
        "stream_device_bytes": stream_device_bytes,
        "gpu_peak_bytes": memory,
        "results": results,
    }


def _ranked_prefill(model, kv, ranked, ranks, chunk: int, prompt: list[int]) -> float:
    """Seconds to prefill `prompt` in one streamed pass on every rank."""
    _sync(model.device)
    start = time.perf_counter()
    streamed_prefill(model, kv, ranked, ranks, len(prompt), prompt, chunk)
    _sync(model.device)
    return time.perf_counter() - start


def _follower_config(args):
    """What the other ranks load: this bench's pack, KV budget, ring and chunk."""
    worker = {"pack": args.pack, "device": args.device, "kv_cache_gib": args.kv_gib}
    worker |= {"stream_ring_layers": args.ring, "prefill_chunk_tokens": args.chunk}
    return load_config(None, env={}, overrides={"worker": worker})


def streaming_bytes(source) -> int:
    """One MoE layer's expert bytes in the pack."""
    layer = source.layer_experts(source.config.moe_layer_ids[0])
    return sum(a.nbytes for a in layer.arrays.values())


def _one_token(cfg, device, dtype):
    return (
        torch.zeros(1, cfg.hidden_size, device=device, dtype=dtype),
        torch.arange(cfg.num_experts_per_tok, device=device)[None],
        torch.ones(1, cfg.num_experts_per_tok, device=device),
    )


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for mode, style in (("cpu", "o-"), ("slp", "s-"), ("dslp", "d-"), ("resident", "^--")):
        points = [(r["tokens"], r["tok_s"]) for r in rows if r["mode"] == mode]
        if points:
            ax.plot(*zip(*points), style, label=mode)
    lengths = sorted({r["tokens"] for r in rows})
    floor = {r["tokens"]: r["floor_s"] for r in rows}
    ax.plot(lengths, [t / floor[t] for t in lengths], "k:", label="floor (max of stream floor, resident)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("prefill tok/s")
    m = payload["model"]
    ax.set_title(f"hmoe prefill, {payload['device']}, {m['arch']} {m['expert_format']} {m['layers']} layers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face model folder (default: the --make model)")
    p.add_argument(
        "--make", default="qwen3_moe:30b-a3b:fp8:8", help="ARCH:PRESET:DTYPE[:LAYERS] made with hmoe make-model"
    )
    p.add_argument("--work-dir", default="/tmp/hmoe-bench")
    p.add_argument("--pack", default="bench-prefill")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", default="1024,4096,8192,16384,32768")
    p.add_argument("--cpu-max", type=int, default=8192, help="longest prompt the cpu mode runs (it is slow)")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--ring", type=int, default=2)
    p.add_argument(
        "--scratch-experts", type=int, default=0, help="experts dequantized at a time (0: the whole layer, the default)"
    )
    p.add_argument("--threads", type=int, default=0, help="CPU kernel threads (0: all physical cores)")
    p.add_argument("--kv-gib", type=float, default=8.0)
    p.add_argument("--tag", default=None, help="results name: prefill-TAG.json (default: this machine's name)")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", default=None, metavar="DIR", help="op tables and traces of slp/resident passes here")
    p.add_argument("--devices", default="", help="dslp mode over these devices, the first --device: cuda:0,cuda:1")
    args = p.parse_args()
    args.lengths = [int(n) for n in args.lengths.split(",")]
    args.devices = parse_devices(args.devices)
    if args.devices and args.devices[0] != args.device:
        p.error(f"--devices starts with this process's device, --device {args.device}")
    path = write_results(f"prefill-{args.tag or machine_name()}", run(args), plot, args.json)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
