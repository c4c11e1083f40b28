"""A model too big for this box, measured on a real-width slice and extrapolated to all its layers.

    python bench/slice.py [--make ARCH:PRESET:DTYPE] [--moe-layers 2] [--lengths 1024,...] [--batches 1,4,16]

The preset's dense layers plus --moe-layers MoE layers (N layers in all; DeepSeek-V3: 3 + 2) are made once
at their real width, and the same checkpoint is also seen with N-1 layers (links to its files, a config
with one layer fewer). bench/prefill.py and bench/decode.py run on both, one after the other, in this run.
Per prefill (mode, prompt length) and per decode batch:

    per_moe_layer_s   seconds(N) - seconds(N-1): what one more MoE layer adds (its attention, router,
                      experts, copies)
    full_s            seconds(N) + (the preset's layers - N) x per_moe_layer_s: the whole model's time
                      (prefill: the prompt's first token; decode: one step, a token of every row)
    full_tok_s        prompt tokens / full_s (prefill), batch / full_s (decode)
    stream_floor_s    (slp) the whole model's MoE layers x one layer's expert bytes / this run's H2D bandwidth
    full_floor_s      (decode) physical_floor_s extrapolated the same way; full_floor_ratio = full_s / it

The two runs' own results are written beside this one (SLICE-prefill-Nlayers.json, ...).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine_name, made_model, write_results  # noqa: E402

from hmoe.shm import ShmConfig  # noqa: E402
from hmoe.shm.registry import remove_pack  # noqa: E402
from hmoe.workers.weights.make_model import PRESETS  # noqa: E402

HERE = Path(__file__).resolve().parent


def fewer_layers(model_dir: Path, layers: int) -> Path:
    """model_dir seen with its first `layers` layers: a folder of links to its files and its config with
    num_hidden_layers = layers (the loaders skip the tensors of the layers past it)."""
    view = model_dir.with_name(f"{model_dir.name}-as-{layers}")
    view.mkdir(exist_ok=True)
    for path in model_dir.iterdir():
        if path.name != "config.json" and not (view / path.name).exists():
            (view / path.name).symlink_to(path)
    config = json.loads((model_dir / "config.json").read_text())
    (view / "config.json").write_text(json.dumps(config | {"num_hidden_layers": layers}, indent=2) + "\n")
    return view


def bench(script: str, model_dir: Path, json_path: Path, *options: str) -> dict:
    """Run bench/SCRIPT on model_dir in its own process (each frees its GPU memory and pack); its results."""
    argv = [sys.executable, str(HERE / script), "--model", str(model_dir), "--json", str(json_path), *options]
    print("$", " ".join(argv[1:]), flush=True)
    subprocess.run(argv, check=True)
    return json.loads(json_path.read_text())


def extrapolate(small: float, large: float, large_layers: int, full_layers: int) -> tuple[float, float]:
    """(one more MoE layer's seconds, the full model's seconds) from runs of large_layers - 1 and large_layers."""
    per_layer = large - small
    return per_layer, large + (full_layers - large_layers) * per_layer


def paired(runs: dict[int, dict], layers: int, key: tuple[str, ...]):
    """(row of the `layers` run, the same row of the run with one layer fewer), matched on `key`."""
    fewer = {tuple(r[k] for k in key): r for r in runs[layers - 1]["results"]}
    for row in runs[layers]["results"]:
        match = fewer.get(tuple(row[k] for k in key))
        if match is not None:  # a run cut short lacks its last rows
            yield row, match


def extrapolated(row: dict, fewer: dict, field: str, tokens: int, layers: int, full_layers: int) -> dict:
    """row's key fields, its `field` in both runs, and the full model's seconds and tokens per second."""
    per_layer, full_s = extrapolate(fewer[field], row[field], layers, full_layers)
    out = {k: row[k] for k in ("mode", "tokens", "batch") if k in row}
    out[field] = {layers - 1: fewer[field], layers: row[field]}
    return out | {"per_moe_layer_s": per_layer, "full_s": full_s, "full_tok_s": tokens / full_s}


def run(args) -> dict:
    arch, preset, dtype = args.make.split(":")
    shape = PRESETS[arch][preset]
    dense, full_layers = shape.get("first_k_dense_replace", 0), shape["num_hidden_layers"]
    layers = dense + args.moe_layers
    stem = Path(args.json).with_suffix("") if args.json else RESULTS_DIR / f"slice-{machine_name()}"
    paths = {
        (kind, n): Path(f"{stem}-{kind}-{n}layers.json") for kind in ("prefill", "decode") for n in (layers, layers - 1)
    }
    runs = {"prefill": {}, "decode": {}}
    if args.reuse:
        missing = [str(path) for path in paths.values() if not path.exists()]
        if missing:
            raise SystemExit(f"--reuse: no run at {', '.join(missing)}")
        for (kind, n), path in paths.items():
            runs[kind][n] = json.loads(path.read_text())
        return summary(args, runs, layers, dense, full_layers)
    model_dir = made_model(f"{args.make}:{layers}", args.work_dir)
    dirs = {layers: model_dir, layers - 1: fewer_layers(model_dir, layers - 1)}
    prefill_options = ["--lengths", args.lengths, "--cpu-max", str(args.cpu_max), "--pack", "bench-slice"]
    for n in sorted(dirs, reverse=True):
        runs["prefill"][n] = bench("prefill.py", dirs[n], paths["prefill", n], *prefill_options)
    for n in sorted(dirs, reverse=True):
        options = ["--batches", args.batches, "--steps", str(args.steps), "--modes", args.decode_mode]
        runs["decode"][n] = bench("decode.py", dirs[n], paths["decode", n], *options, "--pack", "bench-slice")
        remove_pack("bench-slice", ShmConfig(), force=True)  # decode.py leaves its pack for the next run
    return summary(args, runs, layers, dense, full_layers)


def summary(args, runs: dict, layers: int, dense: int, full_layers: int) -> dict:
    """The extrapolated rows of the two runs of each bench (rows only one of them has are left out)."""
    arch, preset, dtype = args.make.split(":")
    stream_floor_s = (full_layers - dense) * runs["prefill"][layers]["layer_bytes"]
    stream_floor_s /= runs["prefill"][layers]["h2d_gbs"] * 1e9
    prefill = []
    for row, fewer in paired(runs["prefill"], layers, ("mode", "tokens")):
        extra = {"stream_floor_s": stream_floor_s} if row["mode"] == "slp" else {}
        prefill.append(extrapolated(row, fewer, "seconds", row["tokens"], layers, full_layers) | extra)
        if extra:
            prefill[-1]["full_ratio"] = prefill[-1]["full_s"] / stream_floor_s
    decode = []
    for row, fewer in paired(runs["decode"], layers, ("mode", "batch")):
        _, floor_s = extrapolate(fewer["physical_floor_s"], row["physical_floor_s"], layers, full_layers)
        decode.append(extrapolated(row, fewer, "tpot_s", row["batch"], layers, full_layers) | {"full_floor_s": floor_s})
        decode[-1]["full_floor_ratio"] = decode[-1]["full_s"] / floor_s
    for row in prefill:
        print(
            f"prefill {row['mode']:9s} {row['tokens']:6d} tokens: "
            f"{row['per_moe_layer_s'] * 1e3:8.1f} ms per MoE layer, "
            f"{full_layers} layers {row['full_s']:7.2f} s {row['full_tok_s']:8.0f} tok/s",
            flush=True,
        )
    for row in decode:
        print(
            f"decode  batch {row['batch']:3d}: {row['per_moe_layer_s'] * 1e3:7.2f} ms per MoE layer, "
            f"{full_layers} layers {row['full_s'] * 1e3:7.1f} ms per step {row['full_tok_s']:6.1f} tok/s "
            f"(x {row['full_floor_ratio']:.2f} its floor)",
            flush=True,
        )
    return {
        "machine": runs["prefill"][layers]["machine"],  # where the runs ran (also when --reuse reads them here)
        "device": runs["prefill"][layers]["device"],
        "model": {"arch": arch, "preset": preset, "dtype": dtype, "dense_layers": dense, "full_layers": full_layers}
        | {"slice_layers": [layers - 1, layers]},
        "h2d_gbs": runs["prefill"][layers]["h2d_gbs"],
        "read_bw_gbs": runs["decode"][layers]["read_bw_gbs"],
        "cut_short": sorted(f"{kind} {n} layers" for kind in runs for n in runs[kind] if runs[kind][n].get("partial")),
        "prefill": prefill,
        "decode": decode,
    }


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = payload["model"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for mode, style in (("cpu", "o-"), ("slp", "s-"), ("resident", "^--")):
        points = [(r["tokens"], r["full_s"]) for r in payload["prefill"] if r["mode"] == mode]
        if points:
            left.plot(*zip(*points), style, label=mode)
    floor = next((r["stream_floor_s"] for r in payload["prefill"] if r["mode"] == "slp"), None)
    if floor:
        left.axhline(floor, color="k", linestyle=":", label="stream floor")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("prompt tokens")
    left.set_ylabel(f"first token, {m['full_layers']} layers (s)")
    left.legend()
    rows = payload["decode"]
    right.plot([r["batch"] for r in rows], [r["full_tok_s"] for r in rows], "s-", label="extrapolated")
    right.plot([r["batch"] for r in rows], [r["batch"] / r["full_floor_s"] for r in rows], "k:", label="floor")
    right.set_xscale("log", base=2)
    right.set_xlabel("decode batch")
    right.set_ylabel(f"tok/s, {m['full_layers']} layers")
    right.legend()
    fig.suptitle(
        f"hmoe {m['arch']} {m['preset']} {m['dtype']}, {payload['device']}: "
        f"layers {m['slice_layers'][0]} and {m['slice_layers'][1]} measured, {m['full_layers']} extrapolated"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make", default="deepseek_v3:v3:fp8", help="ARCH:PRESET:DTYPE for hmoe make-model")
    p.add_argument("--moe-layers", type=int, default=2, help="MoE layers in the slice, after the dense ones")
    p.add_argument("--work-dir", default="/tmp/hmoe-bench")
    p.add_argument("--lengths", default="1024,4096,8192,16384,32768")
    p.add_argument("--cpu-max", type=int, default=4096, help="longest prompt the prefill cpu mode runs")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--decode-mode", default="graphs:auto")
    p.add_argument("--json", default=None, help="default: bench/results/slice-MACHINE.json")
    p.add_argument(
        "--reuse", action="store_true", help="extrapolate from the four runs' files already beside --json, run nothing"
    )
    args = p.parse_args()
    if args.moe_layers < 2:
        p.error("--moe-layers must be at least 2: the slice less one layer needs a MoE layer too")
    write_results(Path(args.json).stem if args.json else f"slice-{machine_name()}", run(args), plot, args.json)


if __name__ == "__main__":
    main()
