"""Decode speed of the hybrid step against its physical floor, batch 1..32, measured in one run.

    python bench/decode.py [--model DIR | --make ARCH:PRESET:DTYPE[:LAYERS]] [--device cuda]
                           [--batches 1,2,4,8,16,32] [--modes legacy,static,graphs] [--steps 24] [--json PATH]
                           [--variants "default;OMP_WAIT_POLICY=active"]

Per batch size B and engine mode (legacy: a ForwardBatch rebuilt per step, SDPA over gathered
contexts; static: persistent rows, paged attention, eager segments; graphs: the same replayed as CUDA
graphs), B requests with random prompts are prefilled in-process, then `steps` decode steps of the
worker's DecodeEngine (two micro-batches, routed experts on the CPU kernels reading the weight pack)
are timed. The same steps are timed again with a null expert backend (zeros, no CPU work): the
device's part of a step, hand-off round trips included.

    expert_bytes      bytes of the distinct experts the step's routing touched (read by the kernels)
    physical_floor_s  expert_bytes / read_bw (same run)  +  device_bytes / hbm_bw (measured here; on a CPU
                      device_bytes / read_bw), where
                      device_bytes = device-resident weights read per step + the KV the step reads
    floor_ratio       tpot_s / physical_floor_s
    roofline_s        expert_bytes / read_bw + device part (batch 1 cannot overlap them); ratio = tpot / it
    breakdown         device (null-expert step; device_graphs_only: its graphs replayed back to back, the
                      device's own time), cpu_experts (kernel time in place, its GB/s), the rest
    kernel_alone_gbs  the same kernels on the same number of tokens, called directly (no step around them)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import hmoe.workers  # noqa: F401  (before torch: the workers' OpenMP wait policy, read when libgomp loads)

# isort: split
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    decode_worker_threads,
    machine_name,
    made_model,
    read_bandwidth_elsewhere,
    run_variants,
    write_results,
)

from hmoe.runtime.sampling_params import SamplingParams  # noqa: E402
from hmoe.shm import ShmConfig  # noqa: E402
from hmoe.workers.engine.decode import DecodeEngine, DecodeRequest  # noqa: E402
from hmoe.workers.experts.cpu import CpuExperts  # noqa: E402
from hmoe.workers.model.batch import ForwardBatch, bucket_for  # noqa: E402
from hmoe.workers.model.causal_lm import load_model  # noqa: E402
from hmoe.workers.model.kv_cache import KVPool  # noqa: E402
from hmoe.workers.model.layers import MoE  # noqa: E402
from hmoe.workers.model.sampler import sample  # noqa: E402
from hmoe.workers.weights.pack_loader import load_pack  # noqa: E402
from hmoe.workers.weights.pack_source import PackSource  # noqa: E402


class TimedKernel:
    """Stands in for CpuExperts' MoeKernel: kernel seconds and the distinct experts each call touched;
    `null` makes every call return zeros at once (the step without its CPU experts)."""

    def __init__(self, kernel):
        self.kernel, self.null = kernel, False
        self.reset()

    def reset(self) -> None:
        self.kernel_s = 0.0
        self.touched: list[int] = []  # distinct experts per call

    def run(self, x, topk_ids, topk_weights, layer, out):
        self.touched.append(int(np.unique(topk_ids).size))
        if self.null:
            out[:] = 0.0
            return 0
        start = time.perf_counter()
        n = self.kernel.run(x, topk_ids, topk_weights, layer, out)
        self.kernel_s += time.perf_counter() - start
        return n


def _time_steps(engine: DecodeEngine, steps: int, device: torch.device) -> float:
    for _ in range(3):  # warm-up
        engine.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def _graphs_only_s(engine: DecodeEngine) -> float | None:
    """Seconds per step of the step's CUDA graphs replayed back to back with no hand-off between them: the
    device's own share of the device part (the rest is the host's turnaround at each MoE layer)."""
    step = engine.static
    if step is None or not step.graphed:
        return None
    graphs = [g for p in step.parts if len(p.rows) for g in p.graphs[bucket_for(len(p.rows), p.rows.capacity)]]
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for g in graphs:  # the rows prepared for the last step: the same inputs, the same KV slots rewritten
        g.replay()
    reps = 5
    start.record()
    for _ in range(reps):
        for g in graphs:
            g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _device_bytes(model) -> int:
    """Bytes of the device-resident weights a decode step reads: every tensor the blocks hold on the model's
    device, the CPU too (attention, norms, routers, shared experts, dense MLPs, lm_head), the embedding
    table excepted (a step reads B rows of it) unless it is the tied lm_head."""
    seen: dict[int, int] = {}

    def walk(obj, depth=0):
        if isinstance(obj, torch.Tensor):
            if obj.device.type == model.device.type and obj is not model.embed:  # cuda:0 != cuda
                seen[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif depth < 3 and hasattr(obj, "__dict__") and not isinstance(obj, CpuExperts):
            for v in vars(obj).values():
                walk(v, depth + 1)

    for layer in model.layers:
        walk(layer)
    walk(model.norm)
    if model.lm_head is model.embed:
        seen[model.embed.untyped_storage().data_ptr()] = model.embed.untyped_storage().nbytes()
    else:
        walk(model.lm_head)
    return sum(seen.values())


def _hbm_bandwidth(device: torch.device) -> float | None:
    """GB/s of a 1 GiB device-to-device copy (bytes read + written)."""
    if device.type != "cuda":
        return None
    a = torch.empty(1 << 29, dtype=torch.float16, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del a, b
    return 2 * (1 << 30) / best / 1e9


def _kernel_alone(experts: CpuExperts, recorder: TimedKernel, batch: int, cfg) -> float:
    """GB/s of the kernels on `batch` tokens per call, one call per MoE layer, nothing around them: CPU inputs
    through the backend, timed on its expert thread (the OpenMP team the step's calls use)."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((batch, cfg.hidden_size), dtype=np.float32))
    w = torch.full((batch, cfg.num_experts_per_tok), 1.0 / cfg.num_experts_per_tok)
    for _ in range(2):  # the first round warms up
        recorder.reset()
        for layer_id in experts.layers:
            ids = np.stack([rng.permutation(cfg.num_experts)[: cfg.num_experts_per_tok] for _ in range(batch)])
            experts(layer_id, x, torch.from_numpy(ids), w)
    return sum(recorder.touched) * next(iter(experts.layers.values())).nbytes_per_expert / recorder.kernel_s / 1e9


def run(args) -> dict:
    device = torch.device(args.device)
    model_dir = Path(args.model) if args.model else made_model(args.make, args.work_dir)
    shm = ShmConfig()
    start = time.perf_counter()
    pack, built = load_pack(model_dir, args.pack, experts=args.experts, config=shm, stream=sys.stderr)
    print(f"pack {pack.name} {'built' if built else 'attached'} in {time.perf_counter() - start:.0f} s", flush=True)
    source = PackSource.attach(pack.name, shm)
    threads = args.threads or decode_worker_threads()
    torch.set_num_threads(threads)  # as the decode worker does
    # Measured in a child process: a parallel region on this thread would leave an OpenMP team beside the
    # expert thread's, which a worker never has.
    read_bw = read_bandwidth_elsewhere(threads)
    hbm_bw = _hbm_bandwidth(device)
    print(f"read bandwidth {read_bw:.1f} GB/s, HBM {hbm_bw or 0:.0f} GB/s", flush=True)

    experts = CpuExperts.from_source(source, device, threads)
    recorder = experts.kernel = TimedKernel(experts.kernel)
    model = load_model(source, device, "auto", experts=experts)
    cfg = model.config
    num_moe = sum(isinstance(layer.mlp, MoE) for layer in model.layers)
    resident = _device_bytes(model)
    layer = source.layer_experts(cfg.moe_layer_ids[0])
    bytes_per_expert = layer.nbytes_per_expert
    kv = KVPool.from_budget(cfg, int(args.kv_gib * 2**30), 16, model.dtype, device)
    gen = torch.Generator().manual_seed(0)
    results = []
    for mode in args.modes:
        engine_mode, _, split = mode.partition(":")
        for batch in args.legacy_batches if engine_mode == "legacy" else args.batches:
            start = time.perf_counter()
            engine = DecodeEngine(
                model, kv, max_batch=batch, micro_batches=2, shm=None, mode=engine_mode, split=split or "auto"
            )
            capture_s = time.perf_counter() - start
            # Both timed runs (with experts, then null) and their warm-ups must fit, or requests finish early.
            params = SamplingParams(max_tokens=2 * (args.steps + 3) + 4, ignore_eos=True)
            for i in range(batch):
                rid = f"{mode}-b{batch}-{i}"
                prompt = torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
                kv.reserve(rid, args.prompt_len + params.max_tokens)
                logits = model.forward(ForwardBatch.build(kv, [(rid, prompt, 0)]), kv)
                engine.join(DecodeRequest(rid, params, len(prompt), -1, "", [sample(logits, [params], [0])[0]]))
            recorder.reset()
            tpot = _time_steps(engine, args.steps, device)
            calls_per_step = len(recorder.touched) / (args.steps + 3)
            expert_bytes = sum(recorder.touched) / (args.steps + 3) * bytes_per_expert
            kernel_s = recorder.kernel_s / (args.steps + 3)
            recorder.null = True
            device_s = _time_steps(engine, args.steps, device)
            recorder.null = False
            graphs_s = _graphs_only_s(engine)
            ctx = args.prompt_len + args.steps + 3  # mean context over the timed steps, about
            kv_bytes = batch * ctx * kv.bytes_per_token
            for rid in list(engine.running):
                engine.cancel(rid)
            del engine
            read_bw = max(read_bw, read_bandwidth_elsewhere(threads, passes=2))  # the best of the run
            alone = _kernel_alone(experts, recorder, batch, cfg)
            # On a CPU the "device" weights and the KV are read from the same memory as the experts.
            floor = (expert_bytes + (0 if hbm_bw else resident + kv_bytes)) / (read_bw * 1e9) + (
                (resident + kv_bytes) / (hbm_bw * 1e9) if hbm_bw else 0.0
            )
            roofline = expert_bytes / (read_bw * 1e9) + device_s
            row = {
                "mode": mode,
                "batch": batch,
                "tpot_s": tpot,
                "tok_s": batch / tpot,
                "physical_floor_s": floor,
                "floor_ratio": tpot / floor,
                "roofline_s": roofline,
                "ratio": tpot / roofline,
                "expert_bytes": expert_bytes,
                "device_bytes": resident + kv_bytes,
                "expert_calls_per_step": calls_per_step,
                "kernel_gbs": expert_bytes / kernel_s / 1e9 if kernel_s else None,
                "kernel_alone_gbs": alone,
                "capture_s": capture_s,
                "breakdown": {
                    "device_s": device_s,
                    "device_per_moe_layer_s": device_s / max(num_moe, 1),
                    "device_graphs_only_s": graphs_s,
                    "cpu_experts_s": kernel_s,
                    "handoff_python_s": max(tpot - device_s - kernel_s, 0.0),
                },
            }
            results.append(row)
            if args.on_row:
                args.on_row(results)
            print(
                f"{mode:7s} batch {batch:3d}: tpot {tpot * 1e3:8.2f} ms {batch / tpot:8.1f} tok/s  "
                f"floor {floor * 1e3:6.2f} ms (x{tpot / floor:5.1f})  device {device_s * 1e3:.2f} ms "
                f"= {device_s / max(num_moe, 1) * 1e3:.3f} ms/MoE layer"
                + (f" (graphs alone {graphs_s * 1e3:.2f} ms)" if graphs_s is not None else "")
                + f", kernels {kernel_s * 1e3:.2f} ms "
                f"{expert_bytes / 1e9:.3f} GB at {row['kernel_gbs'] or 0:.0f} GB/s (alone {alone:.0f})",
                flush=True,
            )
    experts.close()
    source.close()
    pack.close()
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "threads": threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "read_bw_gbs": read_bw,
        "hbm_bw_gbs": hbm_bw,
        "device_resident_bytes": resident,
        "model": {
            "dir": str(model_dir),
            "arch": cfg.architecture,
            "layers": cfg.num_layers,
            "moe_layers": num_moe,
            "experts": cfg.num_experts,
            "top_k": cfg.num_experts_per_tok,
            "hidden": cfg.hidden_size,
            "inter": cfg.moe_intermediate_size,
            "expert_format": source.expert_format.name,
            "bytes_per_expert": bytes_per_expert,
            "dtype": str(model.dtype),
        },
        "prompt_len": args.prompt_len,
        "steps": args.steps,
        "results": results,
    }


def _plot(path, title: str, lines: list[tuple[str, str, list, list]]) -> None:
    """ms per step against the decode batch, log-log; lines are (label, style, batches, ms)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, style, batches, ms in lines:
        ax.plot(batches, ms, style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch")
    ax.set_ylabel("ms per step")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot(payload: dict, path) -> None:
    rows, lines = payload["results"], []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        batches = [r["batch"] for r in mine]
        lines.append((f"{mode}: time per step", "o-", batches, [r["tpot_s"] * 1e3 for r in mine]))
        lines.append((f"{mode}: device part", "^:", batches, [r["breakdown"]["device_s"] * 1e3 for r in mine]))
    floor = [r for r in rows if r["mode"] == rows[-1]["mode"]]
    lines.append(("physical floor", "k--", [r["batch"] for r in floor], [r["physical_floor_s"] * 1e3 for r in floor]))
    model = payload["model"]
    _plot(path, f"hmoe decode, {payload['device']}, {model['arch']} {model['expert_format']}", lines)


def plot_variants(payload: dict, path) -> None:
    lines = [
        (f"{run['variant']} ({mode})", "o-", [r["batch"] for r in mine], [r["tpot_s"] * 1e3 for r in mine])
        for run in payload["variants"]
        for mode in dict.fromkeys(r["mode"] for r in run["results"])
        for mine in [[r for r in run["results"] if r["mode"] == mode]]
    ]
    _plot(path, "hmoe decode, one run per environment variant", lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--model", help="a Hugging Face model folder")
    p.add_argument(
        "--make", default="qwen3_moe:30b-a3b:fp8", help="ARCH:PRESET:DTYPE[:LAYERS] made with hmoe make-model"
    )
    p.add_argument("--work-dir", default="/tmp/hmoe-bench")
    p.add_argument("--pack", default=None)
    p.add_argument("--experts", default="native")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument(
        "--modes",
        default="legacy,graphs:never,graphs:always",
        help="engine modes (legacy, static, graphs), each with :never/:always/:auto for the micro-batch split",
    )
    p.add_argument("--legacy-batches", default="1,32", help="the batches the legacy mode (slow) is timed at")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--kv-gib", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=0, help="kernel threads (0: the decode worker's, policy.cpu_threads)")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument(
        "--variants",
        default="",
        help='environments to compare, ";" between them, each "default" or NAME=VALUE ... '
        '(e.g. "default;OMP_WAIT_POLICY=active"): one fresh process each, one file for all',
    )
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.modes = args.modes.split(",")
    args.legacy_batches = [int(b) for b in args.legacy_batches.split(",")]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    name = f"decode-{machine_name()}"
    if args.variants:
        print(run_variants(args.variants, name, args.json_path, plot_variants))
        return
    # Every finished row is written at once, so a run cut short still leaves what it measured.
    args.on_row = lambda rows: write_results(
        name, {"device": device, "partial": True, "results": rows}, None, args.json_path
    )
    payload = run(args)
    print(write_results(name, payload, plot, args.json_path))


if __name__ == "__main__":
    main()
