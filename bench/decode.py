"""Decode speed of the hybrid step against its roofline, batch 1..16, measured in one run.

    python bench/decode.py [--model DIR | --make ARCH:PRESET:DTYPE[:LAYERS]] [--device cuda]
                           [--batches 1,2,4,8,16] [--steps 24] [--json PATH]

Per batch size B: B requests with random prompts are prefilled in-process, then `steps` decode
steps of the worker's DecodeEngine (two micro-batches, routed experts on the CPU kernels reading
the weight pack, the rest on the device) are timed. The same steps are timed again with a null
expert backend (zeros, no CPU work) to measure the device's part of a step.

    expert_bytes   bytes of the distinct experts the step's routing touched (read by the kernels)
    roofline_s     expert_bytes / read_bw  +  device part of the step   (batch 1 cannot overlap them)
    ratio          tpot_s / roofline_s
    breakdown      device (null-expert step), cpu_experts (kernel time), copies+python (the rest)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ReadBandwidth, write_results  # noqa: E402

from hmoe.runtime.sampling_params import SamplingParams  # noqa: E402
from hmoe.shm import ShmConfig  # noqa: E402
from hmoe.workers.engine.decode import DecodeEngine, DecodeRequest  # noqa: E402
from hmoe.workers.experts.cpu import CpuExperts  # noqa: E402
from hmoe.workers.model.batch import ForwardBatch  # noqa: E402
from hmoe.workers.model.causal_lm import load_model  # noqa: E402
from hmoe.workers.model.kv_cache import KVPool  # noqa: E402
from hmoe.workers.model.sampler import sample  # noqa: E402
from hmoe.workers.weights.make_model import make_model  # noqa: E402
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


def run(args) -> dict:
    device = torch.device(args.device)
    model_dir = Path(args.model) if args.model else None
    if model_dir is None:
        arch, preset, dtype, *layers = args.make.split(":")
        model_dir = Path(args.work_dir) / f"{arch}-{preset}-{dtype}{'-' + layers[0] if layers else ''}"
        if not (model_dir / "config.json").exists():
            start = time.perf_counter()
            make_model(model_dir, arch, preset, dtype, seed=0, num_layers=int(layers[0]) if layers else None)
            print(f"made {model_dir} in {time.perf_counter() - start:.0f} s", flush=True)
    shm = ShmConfig()
    start = time.perf_counter()
    pack, built = load_pack(model_dir, args.pack, experts=args.experts, config=shm, stream=sys.stderr)
    print(f"pack {pack.name} {'built' if built else 'attached'} in {time.perf_counter() - start:.0f} s", flush=True)
    source = PackSource.attach(pack.name, shm)
    bw = ReadBandwidth(num_threads=args.threads or None)
    read_bw = bw.measure()
    print(f"read bandwidth {read_bw:.1f} GB/s", flush=True)

    experts = CpuExperts.from_source(source, device, args.threads or None)
    recorder = experts.kernel = TimedKernel(experts.kernel)
    model = load_model(source, device, "auto", experts=experts)
    cfg = model.config
    layer = source.layer_experts(cfg.moe_layer_ids[0])
    bytes_per_expert = layer.nbytes_per_expert
    kv = KVPool.from_budget(cfg, int(args.kv_gib * 2**30), 16, model.dtype, device)
    gen = torch.Generator().manual_seed(0)
    results = []
    for batch in args.batches:
        engine = DecodeEngine(model, kv, max_batch=batch, micro_batches=2)
        # Both timed runs (with experts, then null) and their warm-ups must fit, or requests finish early.
        params = SamplingParams(max_tokens=2 * (args.steps + 3) + 4, ignore_eos=True)
        for i in range(batch):
            rid, prompt = f"b{batch}-{i}", torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=gen).tolist()
            kv.reserve(rid, args.prompt_len + params.max_tokens)
            logits = model.forward(ForwardBatch.build(kv, [(rid, prompt, 0)]), kv)
            engine.running[rid] = DecodeRequest(rid, params, len(prompt), -1, "", [sample(logits, [params], [0])[0]])
        recorder.reset()
        tpot = _time_steps(engine, args.steps, device)
        calls_per_step = len(recorder.touched) / (args.steps + 3)
        expert_bytes = sum(recorder.touched) / (args.steps + 3) * bytes_per_expert
        kernel_s = recorder.kernel_s / (args.steps + 3)
        recorder.null = True
        device_s = _time_steps(engine, args.steps, device)
        recorder.null = False
        for rid in list(engine.running):
            engine.cancel(rid)
        read_bw = max(read_bw, bw.measure(repeats=2))  # re-measured between points: the best of the run
        roofline = expert_bytes / (read_bw * 1e9) + device_s
        row = {
            "batch": batch,
            "tpot_s": tpot,
            "tok_s": batch / tpot,
            "roofline_s": roofline,
            "ratio": tpot / roofline,
            "expert_bytes": expert_bytes,
            "expert_calls_per_step": calls_per_step,
            "kernel_gbs": expert_bytes / kernel_s / 1e9 if kernel_s else None,
            "breakdown": {
                "device_s": device_s,
                "cpu_experts_s": kernel_s,
                "copies_python_s": max(tpot - device_s - kernel_s, 0.0),
            },
        }
        results.append(row)
        print(
            f"batch {batch:3d}: tpot {tpot * 1e3:8.2f} ms  {batch / tpot:8.1f} tok/s  "
            f"roofline {roofline * 1e3:8.2f} ms "
            f"ratio {tpot / roofline:5.2f}  (device {device_s * 1e3:.2f} ms, kernels {kernel_s * 1e3:.2f} ms, "
            f"{expert_bytes / 1e9:.3f} GB)",
            flush=True,
        )
    experts.close()
    source.close()
    pack.close()
    return {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "read_bw_gbs": read_bw,
        "model": {
            "dir": str(model_dir),
            "arch": cfg.architecture,
            "layers": cfg.num_layers,
            "moe_layers": len(cfg.moe_layer_ids),
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


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["results"]
    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(batches, [r["tpot_s"] * 1e3 for r in rows], "o-", label="measured time per output token")
    ax.plot(batches, [r["roofline_s"] * 1e3 for r in rows], "s--", label="roofline (expert bytes / read bw + device)")
    ax.plot(batches, [r["breakdown"]["device_s"] * 1e3 for r in rows], "^:", label="device part (null experts)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("decode batch")
    ax.set_ylabel("ms per step")
    ax.set_title(f"hmoe decode, {payload['device']}, {payload['model']['arch']} {payload['model']['expert_format']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a Hugging Face model folder")
    p.add_argument(
        "--make", default="qwen3_moe:30b-a3b:fp8", help="ARCH:PRESET:DTYPE[:LAYERS] made with hmoe make-model"
    )
    p.add_argument("--work-dir", default="/tmp/hmoe-bench")
    p.add_argument("--pack", default=None)
    p.add_argument("--experts", default="native")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", default="1,2,4,8,16")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--kv-gib", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    payload = run(args)
    name = "decode-" + ("h100" if "H100" in payload["device"] else "dev" if payload["device"] == "cpu" else "gpu")
    print(write_results(name, payload, plot, args.json_path))


if __name__ == "__main__":
    main()
