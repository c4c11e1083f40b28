"""Fused CPU expert layer vs this machine's memory read bandwidth, plain torch and kt-kernel.

    python bench/kernels.py [--quick] [--json PATH] [--threads N] [--worker-threads N] [--no-kt]
    python -m bench.kernels ...   (the same)
    python bench/kernels.py --calls 10 --memory-gib 4 --kt-formats fp8 --kt-max-experts 16 --no-start-times
        (a shorter run for a short device lease: fewer calls, smaller layers, kt-kernel FP8 only)
    python bench/kernels.py --against ../old-checkout ...
        (an A/B: every hmoe case also runs that checkout's kernels on the same calls, the two alternating call
        by call, so that a machine whose bandwidth drifts between runs still compares them fairly)

In one run: the read bandwidth as STREAM measures it (the best of several passes of a parallel Numba
sum over a buffer far larger than L3, all threads; kept with its spread, at the start, between shapes
and after every case: `read_bw`), then the fused layer for the Qwen3-30B-A3B shape (H 2048, I 768, 128 experts)
and the DeepSeek-V3 shape (H 7168, I 2048, 256 experts), top-8, T = 1, 2, 4, 8, 16, every format,
beside plain torch (bf16 F.linear over the same gathered experts) and kt-kernel (KTransformers' CPU
kernels, when `import kt_kernel` works; each of its cases runs in a child process, as a crash
there must not end the bench). Routing is random (distinct experts per token, fresh every call), so
weights come from DRAM; `gbs` counts the bytes of the experts actually read. Where RAM is short the
layer holds fewer experts than the model but reads the same bytes per token (`experts_in_memory`).
Every row carries `roofline_frac` (its GB/s over the run's best reading at its thread count) and
`roofline_frac_nearest` (over the reading taken nearest it in time). T=1 also runs with the thread
count the decode worker uses (policy.cpu_threads), against its own readings. The caches are emptied
before every call (time_calls), the code and scratch too; T=1 also runs in decode order (routing
"decode order", bench_decode_order): back to back over enough layers that the experts still come from
DRAM, while the code and the scratch stay as warm as a decode step leaves them.
Also: where a call's time goes (`call_timeline`, T=1 and 8 tokens on the same experts, and T=1 in
decode order: Python and dispatch, set-up, each phase, from the kernel's time stamps), per
parallel-region cost, cold vs warm start, per-core FP8 decode rate, T=8 vs T=1, and the issue's
targets checked (`targets`). Writes bench/results/kernels-<machine>.json (machine: the GPU's model,
e.g. h200, or "dev" without one; or --json) and a PNG beside it.

NOTE: past 400 lines: the three engines (hmoe, torch, a kt-kernel child) and the side measurements
live in one file so that one command reproduces every figure of the kernels' report.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # `python bench/kernels.py`: this folder is sys.path[0], `bench` is not importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    ReadBandwidth,
    decode_worker_threads,
    l3_bytes,
    machine_name,
    stream_bytes,
    write_results,
)

SHAPES = {
    "qwen3-30b-a3b": dict(hidden=2048, inter=768, experts=128, top_k=8),
    "deepseek-v3": dict(hidden=7168, inter=2048, experts=256, top_k=8),
}
FORMATS = ("bf16", "fp8", "int4-g32", "int4-g128")
TOKENS = (1, 2, 4, 8, 16)
EVICT_BYTES = max(2 * l3_bytes(), 64 << 20)  # read between timed calls (see time_calls)
KT_DIR = Path(os.environ.get("HMOE_BENCH_KT_DIR", Path(__file__).resolve().parent.parent / ".kt"))  # kt-kernel unpacked


def _fill_kernel():
    from numba import njit, prange

    @njit(parallel=True, nogil=True, cache=True)
    def fill_random(words, seed, kind):
        """Random 64-bit words, in parallel (xorshift): kind 0 any bytes, 1 E4M3 codes without NaN,
        2 bf16 in ±[2^-7, 2^-3)."""
        n = words.size
        chunk = -(-n // 64)
        for c in prange(64):
            x = np.uint64(seed * 0x9E3779B97F4A7C15 + c * 0xBF58476D1CE4E5B9 + 1)
            for i in range(c * chunk, min(n, (c + 1) * chunk)):
                x ^= x << np.uint64(13)
                x ^= x >> np.uint64(7)
                x ^= x << np.uint64(17)
                v = x
                if kind == 1:  # clear bit 0 of every byte whose low 7 bits are all set (0x7F/0xFF -> 0x7E/0xFE)
                    nan = v & (v >> np.uint64(1)) & (v >> np.uint64(2)) & (v >> np.uint64(3))
                    nan &= (v >> np.uint64(4)) & (v >> np.uint64(5)) & (v >> np.uint64(6))
                    v &= ~(nan & np.uint64(0x0101010101010101))
                elif kind == 2:  # per 16 bits: sign, exponent 120..123, 7 random mantissa bits
                    v = (
                        (v & np.uint64(0x807F807F807F807F))
                        | np.uint64(0x3C003C003C003C00)
                        | ((v >> np.uint64(3)) & np.uint64(0x0180018001800180))
                    )
                words[i] = v

    return fill_random


def random_layer(fmt_name: str, num_experts: int, hidden: int, inter: int, seed: int):
    """A LayerExperts of random valid weights (no NaN codes), filled in parallel at memory speed."""
    from hmoe.kernels.formats import ExpertFormat, LayerExperts, aligned_zeros, layer_arrays

    fmt = ExpertFormat.parse(fmt_name)
    fill = _fill_kernel()
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, (dtype, shape) in layer_arrays(fmt, num_experts, hidden, inter).items():
        a = aligned_zeros(shape, dtype)  # as the pack aligns them
        if name.endswith("_scale"):
            a[...] = (rng.random(shape, dtype=np.float32) * 2e-3 + 1e-3).astype(dtype)
        else:
            fill(a.reshape(-1).view(np.uint64), seed * 7 + len(arrays), {"fp8": 1, "bf16": 2}.get(fmt.kind, 0))
        arrays[name] = a
    return LayerExperts(fmt, num_experts, hidden, inter, arrays)


def routings(rng, num_calls: int, tokens: int, num_experts: int, top_k: int, shared: bool = False) -> list:
    """Per call: ids [T, K] int64 (distinct experts per token) and weights [T, K] float32."""
    calls = []
    for _ in range(num_calls):
        if shared:
            ids = np.tile(rng.choice(num_experts, top_k, replace=False), (tokens, 1))
        else:
            ids = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :top_k]
        calls.append((np.ascontiguousarray(ids, np.int64), rng.random((tokens, top_k), dtype=np.float32)))
    return calls


def time_calls(fns, calls, bytes_of, evict, warm: bool = True) -> list[dict]:
    """Per function of `fns`: best and median over the calls; gbs from the best call's bytes actually read.
    With several functions each call runs them one after another, the first of them going last on the
    next call: an A/B on the same calls under the same conditions, however the machine drifts (--against;
    the one that runs second reads experts the first has just read, and the eviction does not clear all of
    them from a large L3: on the dev machine the same kernel measured 0.86x itself when always first).

    `evict()` runs before each call: in a model, a layer's experts meet the caches again only after
    every other layer passed through them, so no call may find weights left in L3 by an earlier one.
    `warm`: one untimed call of each function on the first call's arguments first.
    """
    times, nbytes = [[] for _ in fns], [[] for _ in fns]
    for fn in fns if warm else ():
        fn(*calls[0])
    for j, c in enumerate(calls):
        for i in range(len(fns)) if j % 2 == 0 else reversed(range(len(fns))):  # each goes first every other call
            evict()
            start = time.perf_counter()
            n = fns[i](*c)
            times[i].append(time.perf_counter() - start)
            nbytes[i].append(bytes_of(n))
    rows = []
    for t, b in zip(times, nbytes):
        best = int(np.argmin(t))
        gbs = b[best] / t[best] / 1e9
        rows.append({"seconds": t[best], "seconds_median": float(np.median(t)), "bytes": b[best], "gbs": gbs})
    return rows


def _kernels_folder(path: str | os.PathLike) -> Path | None:
    """The kernels folder --against names: `path` itself, or its kernels/ (None: neither holds moe.py)."""
    root = Path(path).resolve()
    folder = root / "kernels" if (root / "kernels" / "moe.py").is_file() else root
    return folder if (folder / "moe.py").is_file() else None


def load_kernels(path: str | os.PathLike):
    """The `moe` module of another checkout's kernels (`path`: that checkout, or its kernels/ folder),
    imported as a package of its own, so that both versions run in this process on the same layers (their
    pack formats must agree)."""
    import importlib
    import importlib.util

    folder = _kernels_folder(path)
    if folder is None:
        raise SystemExit(f"--against {path}: no kernels/moe.py there")
    name = "hmoe_against_kernels"
    for loaded in [n for n in sys.modules if n == name or n.startswith(name + ".")]:
        del sys.modules[loaded]  # an earlier call's checkout: never hand back another folder's kernels
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.moe")


# ---------------------------------------------------------------- engines


def bench_hmoe(
    layer, shape: dict, tokens: int, calls, threads: int, evict, amx: bool | None = None, against=None
) -> dict:
    """hmoe's layer on the calls; with `against` (load_kernels' module) that version on the same calls,
    alternating call by call: row["against"] holds its times, row["against_speedup"] its median time over
    this one's (above 1: this checkout is faster)."""
    kernels = [
        v.MoeKernel(layer.hidden, layer.inter, max(tokens, 16), shape["top_k"], threads, amx=amx)
        for v in _versions(against)
    ]
    x = np.random.default_rng(1).standard_normal((tokens, layer.hidden), dtype=np.float32)
    out = np.empty_like(x)
    rows = time_calls(
        [lambda ids, w, k=k: k.run(x, ids, w, layer, out) for k in kernels],
        calls,
        lambda n: n * layer.nbytes_per_expert,
        evict,
    )
    return _ab_row(rows)


def _versions(against) -> list:
    """The kernels' modules an A/B times: this checkout's moe, then `against` (load_kernels') if given."""
    import hmoe.kernels.moe as ours

    return [ours] if against is None else [ours, against]


def _ab_row(rows: list[dict]) -> dict:
    """This checkout's row of time_calls' rows; with a second version, its times under "against" and its
    median time over this one's under "against_speedup" (above 1: this checkout is faster)."""
    if len(rows) > 1:
        rows[0].update(against=rows[1], against_speedup=rows[1]["seconds_median"] / rows[0]["seconds_median"])
    return rows[0]


def decode_order_layers(fmt_name: str, shape: dict, seed: int) -> list:
    """Layers of exactly one T=1 call's experts (top_k each), enough of them that a call back to back after
    the others reads its layer EVICT_BYTES after that layer's last call (see bench_decode_order; 2 more than
    that takes, as the A/B's alternating order brings a layer back one call early)."""
    from hmoe.kernels.formats import ExpertFormat, expert_nbytes

    per_call = shape["top_k"] * expert_nbytes(ExpertFormat.parse(fmt_name), shape["hidden"], shape["inter"])
    count = -(-EVICT_BYTES // per_call) + 2
    return [random_layer(fmt_name, shape["top_k"], shape["hidden"], shape["inter"], seed + i) for i in range(count)]


def decode_order_calls(rng, num_calls: int, top_k: int) -> list:
    """Per call: ids [1, top_k] (every expert of a decode_order_layers layer, in a random order), weights."""
    return [
        (rng.permutation(top_k).reshape(1, top_k).astype(np.int64), rng.random((1, top_k), dtype=np.float32))
        for _ in range(num_calls)
    ]


def bench_decode_order(layers: list, shape: dict, num_calls: int, threads: int, rng, against=None) -> dict:
    """T=1 as a decode step calls the layers: back to back, nothing emptied between calls. Each call takes
    the next of `layers` (decode_order_layers) and routes its token to all top_k experts, so its
    experts come from DRAM (the other layers read EVICT_BYTES since that layer's last call), while the code,
    the kernel's scratch and Python's objects are as warm as the call before left them, as in a step.

    The bench's other rows empty every cache before each call, the code and the scratch too, which a
    small-expert call pays for in fixed costs: Qwen3-30B-A3B INT4-g128 on the H200 box, 16 threads, the
    same process, the last task started 72 µs into a call after the eviction, 36 back to back (the call
    341 against 297 µs, medians). With `against` (load_kernels' module) that version runs too, as in
    bench_hmoe: call by call, each on the next layer, so neither finds the other's experts in L3."""
    top_k = shape["top_k"]
    kernels = [v.MoeKernel(shape["hidden"], shape["inter"], 16, top_k, threads) for v in _versions(against)]
    x = np.random.default_rng(1).standard_normal((1, shape["hidden"]), dtype=np.float32)
    out = np.empty_like(x)
    n, m = len(layers), len(kernels)
    calls = [(j, *call) for j, call in enumerate(decode_order_calls(rng, n + num_calls, top_k))]
    fns = [lambda j, ids, w, i=i: kernels[i].run(x, ids, w, layers[(m * j + i) % n], out) for i in range(m)]
    for call in calls[:n]:  # untimed: every layer read once, the code and the scratch warm
        for fn in fns:
            fn(*call)
    rows = time_calls(fns, calls[n:], lambda k: k * layers[0].nbytes_per_expert, lambda: None, warm=False)
    for row in rows:
        row["layers"] = n
    return _ab_row(rows)


def call_timeline(layers: list, shape: dict, calls, threads: int, evict, untimed: int = 1) -> dict:
    """Where a call's time goes (calls as timed_case runs them, T from their ids; call j on layers[j % len],
    evict() before each, the first `untimed` not counted: a warm-up, or the first round of the layers in
    decode order): medians over the calls of µs since run() began, from the kernel's time stamps
    (MoeKernel.timeline): the jitted kernel entered (Python and Numba's dispatch before it), its region began
    (routing and set-up), the last task started; per phase, the first and the last task done with its own
    items, and the phase done; the tasks' ends; the region ended (every task joined); run() back. (bf16,
    fp8: a task claims its first gate/up item and prefetches its head before its pack wait begins.)"""
    from hmoe.kernels.moe import PHASES, TASK_END, TASK_START, MoeKernel

    now, per_us = _tsc_clock()
    tokens, layer = calls[0][0].shape[0], layers[0]
    kernel = MoeKernel(layer.hidden, layer.inter, max(tokens, 16), shape["top_k"], threads)
    x = np.random.default_rng(1).standard_normal((tokens, layer.hidden), dtype=np.float32)
    out = np.empty_like(x)
    points = []
    for j, (ids, w) in enumerate(calls):
        evict()
        start = now()
        kernel.run(x, ids, w, layers[j % len(layers)], out)
        back = now()
        entered, region, ended, tasks = kernel.timeline()
        point = {"entered": entered, "region": region, "tasks started": tasks[:, TASK_START].max()}
        for name, p in PHASES[layer.fmt.kind]:
            point[f"{name}: first task done"], point[f"{name}: last task done"] = (
                tasks[:, 2 * p].min(),
                tasks[:, 2 * p].max(),
            )
            point[f"{name}: phase done"] = tasks[:, 2 * p + 1].max()
        point.update(
            {
                "down: first task done": tasks[:, TASK_END].min(),
                "down: last task done": tasks[:, TASK_END].max(),
                "region ended": ended,
            }
        )
        points.append({k: (v - start) / per_us for k, v in point.items()} | {"returned": (back - start) / per_us})
    return {k: float(np.median([p[k] for p in points[untimed:]])) for k in points[0]}


@functools.cache
def _tsc_clock():
    """(a jitted read of simd.cycles, its ticks per µs), compiled and calibrated once per process."""
    from numba import njit

    from hmoe.kernels.simd import cycles

    now = njit(lambda: cycles())
    now()
    t0, c0 = time.perf_counter(), now()
    time.sleep(0.05)
    return now, (now() - c0) / (time.perf_counter() - t0) / 1e6


def torch_layer(num_experts: int, hidden: int, inter: int, seed: int):
    import torch

    fill = _fill_kernel()
    mats = []
    for shape in ((num_experts, inter, hidden), (num_experts, inter, hidden), (num_experts, hidden, inter)):
        a = np.empty(shape, np.uint16)
        fill(a.reshape(-1).view(np.uint64), seed + len(mats), 2)
        mats.append(torch.from_numpy(a).view(torch.bfloat16))
    return tuple(mats)


def bench_torch(weights, tokens: int, calls, threads: int, evict) -> dict:
    """Plain torch: per active expert, F.linear over its gathered tokens (bf16), as a model without kernels runs."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    gate, up, down = weights
    hidden, inter = down.shape[1], down.shape[2]
    x = torch.randn(tokens, hidden).bfloat16()
    per_expert = 3 * hidden * inter * 2

    def call(ids, w):
        ids_t, w_t = torch.from_numpy(ids), torch.from_numpy(w)
        with torch.inference_mode():
            out = torch.zeros_like(x)
            for e in np.unique(ids).tolist():
                tok, slot = torch.where(ids_t == e)
                h = F.silu(F.linear(x[tok], gate[e])) * F.linear(x[tok], up[e])  # [n, I]
                out.index_add_(0, tok, F.linear(h, down[e]) * w_t[tok, slot, None].to(h.dtype))
        return len(np.unique(ids))

    return time_calls([call], calls, lambda n: n * per_expert, evict)[0]


KT_CHILD = r"""
import json, sys, time, numpy as np, torch
import kt_kernel
ext = kt_kernel.kt_kernel_ext
spec = json.loads(sys.argv[1])
E, K, H, I = spec["experts"], spec["top_k"], spec["hidden"], spec["inter"]
fmt, threads = spec["format"], spec["threads"]
cpu = ext.CPUInfer(threads)
c = ext.moe.MOEConfig(E, K, H, I, 0)
c.max_len = 64
c.pool = cpu.backend_
g = torch.randint(0, 126, (E, I, H), dtype=torch.uint8) if fmt == "fp8" else (torch.randn(E, I, H) * 0.02).bfloat16()
u = torch.randint(0, 126, (E, I, H), dtype=torch.uint8) if fmt == "fp8" else (torch.randn(E, I, H) * 0.02).bfloat16()
d = torch.randint(0, 126, (E, H, I), dtype=torch.uint8) if fmt == "fp8" else (torch.randn(E, H, I) * 0.02).bfloat16()
c.gate_proj, c.up_proj, c.down_proj = g.data_ptr(), u.data_ptr(), d.data_ptr()
keep = [g, u, d]
if fmt == "fp8":
    s = [torch.rand(E, a.shape[1] // 128, a.shape[2] // 128) * 1e-3 for a in (g, u, d)]
    keep += s
    c.gate_scale, c.up_scale, c.down_scale = (t.data_ptr() for t in s)
    c.quant_config.bits, c.quant_config.group_size, c.quant_config.zero_point = 8, 128, False
    moe = ext.moe.AMXFP8_MOE(c)
elif fmt == "bf16":
    moe = ext.moe.AMXBF16_MOE(c)
elif spec["kt_class"] == "AMXInt4_MOE":  # per-channel int4, quantized online from bf16
    moe = ext.moe.AMXInt4_MOE(c)
else:  # int4 with a zero point per group of 32/128, quantized online from bf16
    c.quant_config.bits, c.quant_config.group_size, c.quant_config.zero_point = 4, int(fmt.split("-g")[1]), True
    moe = getattr(ext.moe, spec["kt_class"])(c)
p2l = torch.arange(E, dtype=torch.int64)
cpu.submit(moe.load_weights_task(p2l.data_ptr())); cpu.sync()
del g, u, d, keep
flush = torch.ones(spec["evict_bytes"] // 4)  # read before each call: no weights left in L3 by the last one
rows = []
for tokens, calls in spec["calls"]:
    x = torch.randn(tokens, H).bfloat16(); out = torch.empty(tokens, H, dtype=torch.bfloat16)
    qlen = torch.tensor([tokens], dtype=torch.int32)
    times, actives = [], []
    for ids, w in [(torch.tensor(i, dtype=torch.int64).contiguous(),
                    torch.tensor(w, dtype=torch.float32).contiguous()) for i, w in calls]:
        flush.sum()
        t0 = time.perf_counter()
        task = moe.forward_task(qlen.data_ptr(), K, ids.data_ptr(), w.data_ptr(), x.data_ptr(), out.data_ptr(), False)
        cpu.submit(task)
        cpu.sync()
        times.append(time.perf_counter() - t0); actives.append(len(set(ids.reshape(-1).tolist())))
    rows.append({"tokens": tokens, "times": times[1:], "actives": actives[1:]})
print("KTJSON" + json.dumps({"variant": kt_kernel.__cpu_variant__, "rows": rows}))
"""


def bench_kt(
    shape: dict, fmt: str, num_experts: int, per_tokens: dict, threads: int, bytes_per_expert: int
) -> list[dict]:
    """kt-kernel in a child process (PYTHONPATH=.kt); for int4 its group-quantized class, else its per-channel one."""
    rows = []
    for kt_class in ["AMXInt4_1KGroup_MOE", "AMXInt4_MOE"] if fmt.startswith("int4") else [None]:
        rows = _bench_kt_class(shape, fmt, num_experts, per_tokens, threads, bytes_per_expert, kt_class)
        if "error" not in rows[0]:
            break
    return rows


def _bench_kt_class(shape, fmt, num_experts, per_tokens, threads, bytes_per_expert, kt_class) -> list[dict]:
    spec = {
        **shape,
        "experts": num_experts,
        "format": fmt,
        "threads": threads,
        "kt_class": kt_class,
        "evict_bytes": EVICT_BYTES,
        "calls": [[t, [[ids.tolist(), w.tolist()] for ids, w in calls]] for t, calls in per_tokens.items()],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(KT_DIR), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", KT_CHILD, json.dumps(spec)], env=env, capture_output=True, text=True, timeout=900
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("KTJSON")), None)
    if line is None:
        print(
            f"  kt-kernel {fmt} ({kt_class}): failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-200:]}",
            flush=True,
        )
        return [
            {
                "format": fmt,
                "kt_class": kt_class,
                "error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-300:]}",
            }
        ]
    out = json.loads(line[6:])
    rows = []
    for r in out["rows"]:
        best = int(np.argmin(r["times"]))
        nbytes = r["actives"][best] * bytes_per_expert
        rows.append(
            {
                "format": fmt,
                "tokens": r["tokens"],
                "seconds": r["times"][best],
                "seconds_median": float(np.median(r["times"])),
                "gbs": nbytes / r["times"][best] / 1e9,
                "variant": out["variant"],
                "kt_class": kt_class,
            }
        )
    return rows


def kt_available() -> str | None:
    """None if kt-kernel imports from .kt/, else why not."""
    if not KT_DIR.is_dir():
        return f"{KT_DIR} missing (unpack kt_kernel/, kt_kernel.libs/ and gguf/ of the kt-kernel wheel there)"
    env = {**os.environ, "PYTHONPATH": str(KT_DIR)}
    proc = subprocess.run(
        [sys.executable, "-c", "import kt_kernel; print(kt_kernel.__cpu_variant__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


# ---------------------------------------------------------------- side measurements


def region_overhead_us(threads: int) -> dict:
    """Cost of one parallel region (a prange over `threads` tasks, a little work in each) and of a whole layer call."""
    from numba import njit, prange

    from hmoe.kernels.formats import ExpertFormat, LayerExperts
    from hmoe.kernels.moe import MoeKernel

    @njit(parallel=True, nogil=True)
    def region(out, n):
        for t in prange(n):
            out[t] += 1.0

    import numba

    numba.set_num_threads(threads)
    out = np.zeros(threads)
    region(out, threads)
    reps = 20000
    start = time.perf_counter()
    for _ in range(reps):
        region(out, threads)
    per_region = (time.perf_counter() - start) / reps * 1e6
    kernel = MoeKernel(128, 128, 1, 1, threads)
    layer = LayerExperts.allocate(ExpertFormat("bf16"), 1, 128, 128)
    x, ids, w = np.ones((1, 128), np.float32), np.zeros((1, 1), np.int64), np.ones((1, 1), np.float32)
    y = np.empty_like(x)
    kernel.run(x, ids, w, layer, y)
    start = time.perf_counter()
    for _ in range(reps // 4):
        kernel.run(x, ids, w, layer, y)
    per_call = (time.perf_counter() - start) / (reps // 4) * 1e6
    return {
        "per_region_us": per_region,
        "tiny_layer_call_us": per_call,
        "threads": threads,
        "note": "tiny_layer_call = Python wrapper + routing + the one region of a call on a 128x128 bf16 expert",
    }


def start_times() -> dict:
    """Seconds to import and warm up every kernel signature: cold (empty cache dir) and warm (cache filled)."""
    code = (
        "import time; t = time.perf_counter(); from hmoe.kernels.moe import MoeKernel; "
        "MoeKernel(256, 256, 4, 2).warm_up(); print(time.perf_counter() - t)"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        cold = float(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
        warm = float(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout.split()[-1]
        )
    return {
        "cold_s": cold,
        "warm_s": warm,
        "note": "import + warm_up() of bf16, fp8, int4-g32, int4-g128 in a fresh process",
    }


def fp8_decode_rate_per_core() -> dict:
    """One core: FP8 tile kernel over weights that stay in L2 (decode rate) and over DRAM-resident experts
    (with and without prefetch)."""
    from numba import njit

    from hmoe.kernels.dots import fp8_tile
    from hmoe.kernels.moe import PREFETCH_BYTES

    @njit(nogil=True)
    def gemv(w, first_row, rows, cols, xs, res, pf):
        for r in range(first_row, first_row + rows, 16):
            fp8_tile(w, r * cols, cols, xs, 0, res, pf, (first_row + rows) * cols)

    cols, hot_rows = 7168, 64
    big = random_layer("fp8", 16, 7168, 2048, 5)
    w = big.arrays["gate"].reshape(-1)
    xs, res = np.ones(cols, np.float32), np.zeros(128, np.float32)
    gemv(w, 0, hot_rows, cols, xs, res, 0)
    best = min(_timed(lambda: gemv(w, 0, hot_rows, cols, xs, res, 0)) for _ in range(200))
    rng = np.random.default_rng(3)
    rows, out = 2048, {"hot_l2_gbs": hot_rows * cols / best / 1e9}
    for name, pf in (("dram_one_core_gbs", PREFETCH_BYTES), ("dram_one_core_no_prefetch_gbs", 0)):
        out[name] = (
            rows
            * cols
            / min(
                _timed(lambda e=e, pf=pf: gemv(w, e * rows, rows, cols, xs, res, pf)) for e in rng.integers(0, 16, 30)
            )
            / 1e9
        )
    return out


def thread_scaling(counts=(1, 2, 4, 8, 12, 16)) -> list[dict]:
    """Qwen3 shape, T=1, per format: GB/s and the read bandwidth at each thread count (SMT and frequency show here)."""
    from hmoe.kernels.moe import physical_cores

    shape = SHAPES["qwen3-30b-a3b"]
    rows, rng = [], np.random.default_rng(9)
    evict = ReadBandwidth(EVICT_BYTES)
    counts = [c for c in counts if c <= physical_cores()]
    for fmt_name in ("bf16", "fp8", "int4-g128"):
        layer = random_layer(fmt_name, shape["experts"], shape["hidden"], shape["inter"], seed=3)
        for threads in counts:
            row = bench_hmoe(
                layer, shape, 1, routings(rng, 15, 1, shape["experts"], shape["top_k"]), threads, evict.evict
            )
            rows.append(
                {
                    "format": fmt_name,
                    "threads": threads,
                    "seconds": row["seconds"],
                    "gbs": row["gbs"],
                    "read_bw_gbs": ReadBandwidth(2**30, threads).measure(3),
                }
            )
            print(
                f"scaling {fmt_name:9s} threads {threads:2d}: {row['gbs']:6.1f} GB/s "
                f"(read {rows[-1]['read_bw_gbs']:6.1f})",
                flush=True,
            )
        del layer
    return rows


def omp_wait_policies(threads: int) -> dict:
    """Per-region cost under each OMP_WAIT_POLICY (set before libgomp starts), in fresh processes."""
    code = (
        f"import json, runpy; k = runpy.run_path({__file__!r}, run_name='bench_kernels'); "
        f"print(json.dumps(k['region_overhead_us']({threads})))"
    )
    out = {}
    for policy in ("default", "active", "passive"):
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy != "default":
            env["OMP_WAIT_POLICY"] = policy
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        out[policy] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else proc.stderr[-300:]
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------- main


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer calls, tokens 1 and 8, the 32-expert DeepSeek layer"
    )
    parser.add_argument("--json", help="output path (default bench/results/kernels-<machine>.json)")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: physical cores)")
    parser.add_argument(
        "--worker-threads", type=int, default=None, help="a worker's threads, for T=1 (default: decode's; 0: skip)"
    )
    parser.add_argument("--no-kt", action="store_true", help="skip kt-kernel")
    parser.add_argument("--kt-threads", type=int, default=None, help="kt-kernel threads (default: --threads - 1)")
    parser.add_argument(
        "--kt-max-experts",
        type=int,
        default=64,
        help="experts kt-kernel holds (its loading is slow); same bytes per token",
    )
    parser.add_argument(
        "--memory-gib", type=float, default=None, help="bytes one layer may hold (default: 45%% of RAM)"
    )
    parser.add_argument("--calls", type=int, default=None, help="timed calls per case (default 30, --quick 12)")
    parser.add_argument("--tokens", default=None, help="token counts (default 1,2,4,8,16; --quick 1,8)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--kt-formats", default="bf16,fp8,int4-g32", help="formats kt-kernel runs")
    parser.add_argument(
        "--no-side", action="store_true", help="skip the side measurements (region cost, start times, per-core decode)"
    )
    parser.add_argument(
        "--no-start-times", action="store_true", help="skip the cold/warm start measurement (two fresh compiles)"
    )
    parser.add_argument("--diagnose", action="store_true", help="also: thread scaling and OMP wait policies")
    parser.add_argument(
        "--against",
        metavar="DIR",
        help="also time another checkout's kernels (DIR, or its kernels/ folder) on every hmoe case, call by call",
    )
    args = parser.parse_args(argv)

    import numba

    from hmoe.kernels.formats import ExpertFormat, expert_nbytes
    from hmoe.kernels.jit import amx_usable
    from hmoe.kernels.moe import MoeKernel, physical_cores

    threads = min(args.threads or physical_cores(), numba.config.NUMBA_NUM_THREADS)
    w_threads = decode_worker_threads() if args.worker_threads is None else args.worker_threads
    w_threads = w_threads if 0 < w_threads < threads else 0
    kt_threads = args.kt_threads or max(1, threads - 1)
    num_calls = args.calls or (12 if args.quick else 30)
    tokens_list = tuple(int(t) for t in args.tokens.split(",")) if args.tokens else ((1, 8) if args.quick else TOKENS)
    total_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    budget = (args.memory_gib or 0.45 * total_gib) * 2**30
    if args.quick:
        budget = min(budget, 2 * 2**30)
    bw = ReadBandwidth(stream_bytes(), threads)
    bw_worker = ReadBandwidth(stream_bytes(), w_threads) if w_threads else None
    first = bw.read(10, "start")
    print(
        f"threads {threads} (worker {w_threads or '-'}); read bandwidth best {first['best_gbs']:.1f} GB/s "
        f"(median {first['median_gbs']:.1f}, worst {first['worst_gbs']:.1f}) over {first['buffer_mib']} MiB; "
        f"L3 {l3_bytes() >> 20} MiB",
        flush=True,
    )
    if bw_worker:
        r = bw_worker.read(10, "start")
        print(f"read bandwidth with {w_threads} threads: best {r['best_gbs']:.1f} GB/s", flush=True)
    evict = ReadBandwidth(EVICT_BYTES, threads).evict
    kt_reason = "--no-kt" if args.no_kt else kt_available()
    print(f"kt-kernel: {'available' if kt_reason is None else 'not run: ' + kt_reason}", flush=True)
    MoeKernel(2048, 768, 16, 8, threads).warm_up()
    against = load_kernels(args.against) if args.against else None
    if against is not None:
        against.MoeKernel(2048, 768, 16, 8, threads).warm_up()
        print(f"against: {against.__file__}", flush=True)

    results, torch_rows, kt_rows, notes = [], [], [], {}
    rng = np.random.default_rng(0)

    def timed_case(layer, shape, shape_name, fmt_name, tokens, calls, routing, n_threads, meter):
        """One row: `calls` on `layer`, caches emptied before each; routing "decode order": bench_decode_order
        (`layer` the list of decode_order_layers, `calls` unused)."""
        t0 = meter.now_s()
        if routing == "decode order":
            row = bench_decode_order(layer, shape, num_calls, n_threads, rng, against=against)
        else:
            row = bench_hmoe(layer, shape, tokens, calls, n_threads, evict, against=against)
        row.update(
            shape=shape_name,
            format=fmt_name,
            tokens=tokens,
            routing=routing,
            threads=n_threads,
            experts_in_memory=shape["top_k"] if routing == "decode order" else layer.num_experts,
            t_s=round((t0 + meter.now_s()) / 2, 3),
        )
        reading = meter.read(3, f"after {shape_name} {fmt_name} T={tokens} {routing} {n_threads}t")
        ab = f"; against {row['against']['seconds'] * 1e3:8.3f} ms: x{row['against_speedup']:.2f}" if against else ""
        print(
            f"{shape_name:14s} {fmt_name:9s} T={tokens:2d} {routing:12s} {n_threads:2d}t "
            f"{row['seconds'] * 1e3:8.3f} ms {row['gbs']:6.1f} GB/s (read bw now {reading['best_gbs']:5.1f}){ab}",
            flush=True,
        )
        return row

    for shape_name in args.shapes.split(","):
        shape = SHAPES[shape_name]
        hidden, inter, top_k = shape["hidden"], shape["inter"], shape["top_k"]
        bw.read(5, f"before {shape_name}")
        for fmt_name in args.formats.split(","):
            per_expert = expert_nbytes(ExpertFormat.parse(fmt_name), hidden, inter)
            num_experts = int(min(shape["experts"], max(4 * top_k, budget // per_expert)))
            if args.quick and shape_name == "deepseek-v3":
                num_experts = min(num_experts, 32)
            layer = random_layer(fmt_name, num_experts, hidden, inter, seed=len(results))
            per_tokens = {t: routings(rng, num_calls, t, num_experts, top_k) for t in tokens_list}
            for tokens, calls in per_tokens.items():
                results.append(timed_case(layer, shape, shape_name, fmt_name, tokens, calls, "random", threads, bw))
            shared = routings(rng, num_calls, 8, num_experts, top_k, shared=True) if 8 in tokens_list else None
            if shared is not None:
                results.append(timed_case(layer, shape, shape_name, fmt_name, 8, shared, "shared", threads, bw))
            decode_layers = decode_order_layers(fmt_name, shape, seed=17) if 1 in tokens_list else None
            if decode_layers:
                results.append(
                    timed_case(decode_layers, shape, shape_name, fmt_name, 1, None, "decode order", threads, bw)
                )
            if amx_usable() and fmt_name != "int4-g32":  # the same calls with AMX and without: what it buys
                for tokens, routing in ((8, "shared"), (16, "random"), (128, "random")):
                    calls = routings(rng, 5, tokens, num_experts, top_k, shared=routing == "shared")
                    on, off = (bench_hmoe(layer, shape, tokens, calls, threads, evict, amx=a) for a in (True, False))
                    row = dict(shape=shape_name, format=fmt_name, tokens=tokens, routing=routing, threads=threads)
                    row.update(amx_s=on["seconds"], avx512_s=off["seconds"], speedup=off["seconds"] / on["seconds"])
                    notes.setdefault("amx_ab", []).append(row)
                    print(
                        f"{shape_name:14s} {fmt_name:9s} T={tokens:3d} {routing:6s} AMX {on['seconds'] * 1e3:8.2f} ms, "
                        f"AVX-512 {off['seconds'] * 1e3:8.2f} ms: x{row['speedup']:.2f}",
                        flush=True,
                    )
            timelines = []
            for tokens, routing, calls in ((1, "random", per_tokens.get(1)), (8, "shared", shared)):
                if calls is not None:
                    line = call_timeline([layer], shape, [calls[0], *calls[:10]], threads, evict)
                    timelines.append((tokens, routing, line))
            if decode_layers:
                calls = decode_order_calls(rng, len(decode_layers) + 10, top_k)
                line = call_timeline(decode_layers, shape, calls, threads, lambda: None, untimed=len(decode_layers))
                timelines.append((1, "decode order", line))
            del decode_layers
            for tokens, routing, line in timelines:
                notes.setdefault("call_timeline", []).append(
                    dict(shape=shape_name, format=fmt_name, tokens=tokens, routing=routing, threads=threads, us=line)
                )
                names = dict.fromkeys(k.split(":")[0] for k in line if ": " in k)
                steps = [f"{k} {line[k]:.0f}" for k in ("entered", "region", "tasks started")] + [
                    f"{n} {line[n + ': first task done']:.0f}-{line[n + ': last task done']:.0f}" for n in names
                ]
                print(
                    f"{shape_name:14s} {fmt_name:9s} T={tokens:2d} {routing:12s} µs: {', '.join(steps)}, "
                    f"region ended {line['region ended']:.0f}, returned {line['returned']:.0f}",
                    flush=True,
                )
            if w_threads and 1 in per_tokens:
                results.append(
                    timed_case(layer, shape, shape_name, fmt_name, 1, per_tokens[1], "random", w_threads, bw_worker)
                )
            if fmt_name == "fp8" and 1 in per_tokens:
                row = bench_hmoe(layer, shape, 1, per_tokens[1], 1, evict)
                row.update(
                    shape=shape_name,
                    format=fmt_name,
                    tokens=1,
                    routing="random",
                    threads=1,
                    experts_in_memory=num_experts,
                )
                notes.setdefault("one_thread", []).append(row)
            if kt_reason is None and fmt_name in args.kt_formats.split(","):
                kt_experts = min(num_experts, args.kt_max_experts)
                kt_per_tokens = {t: routings(rng, min(num_calls, 16), t, kt_experts, top_k) for t in tokens_list}
                t0 = bw.now_s()
                for r in bench_kt(shape, fmt_name, kt_experts, kt_per_tokens, kt_threads, per_expert):
                    r.update(
                        shape=shape_name,
                        threads=kt_threads,
                        experts_in_memory=kt_experts,
                        t_s=round((t0 + bw.now_s()) / 2, 3),
                    )
                    kt_rows.append(r)
                    if "gbs" in r:
                        print(
                            f"{shape_name:14s} {fmt_name:9s} T={r['tokens']:2d} kt-kernel "
                            f"{r['seconds'] * 1e3:8.3f} ms {r['gbs']:6.1f} GB/s",
                            flush=True,
                        )
                bw.read(3, f"after {shape_name} {fmt_name} kt-kernel")
            del layer
            if args.json:  # partial results, in case the run is cut short
                Path(args.json + ".partial").write_text(
                    json.dumps({"read_bw": bw.readings, "results": results, "torch": torch_rows, "kt_kernel": kt_rows})
                )
        num_torch = int(min(shape["experts"], max(4 * top_k, budget // (3 * hidden * inter * 2))))
        if args.quick:
            num_torch = min(num_torch, 32)
        weights = torch_layer(num_torch, hidden, inter, 11)
        for tokens in tokens_list:
            t0 = bw.now_s()
            row = bench_torch(weights, tokens, routings(rng, num_calls, tokens, num_torch, top_k), threads, evict)
            row.update(
                shape=shape_name,
                format="bf16",
                tokens=tokens,
                threads=threads,
                experts_in_memory=num_torch,
                t_s=round((t0 + bw.now_s()) / 2, 3),
            )
            torch_rows.append(row)
            print(
                f"{shape_name:14s} torch bf16 T={tokens:2d} {row['seconds'] * 1e3:8.3f} ms {row['gbs']:6.1f} GB/s",
                flush=True,
            )
        del weights
    bw.read(5, "end")

    meters = {threads: bw, **({w_threads: bw_worker} if w_threads else {})}
    for row in results + torch_rows + kt_rows + notes.get("one_thread", []):
        meter = meters.get(row.get("threads"), bw)
        if "gbs" in row:
            row["roofline_frac"] = row["gbs"] / meter.best_gbs
            if "t_s" in row:
                row["roofline_frac_nearest"] = row["gbs"] / meter.nearest(row["t_s"])["best_gbs"]
            if meter is not bw:
                row["roofline_frac_all_cores"] = row["gbs"] / bw.best_gbs
    extra = (
        {}
        if args.no_side
        else {"region_overhead": region_overhead_us(threads), "fp8_decode_per_core": fp8_decode_rate_per_core()}
    )
    if not (args.no_side or args.no_start_times):
        extra["start"] = start_times()
    if args.diagnose:
        extra["thread_scaling"] = thread_scaling()
        extra["omp_wait_policy"] = omp_wait_policies(threads)
    for shape_name in args.shapes.split(","):
        for fmt_name in args.formats.split(","):
            by_t = {
                (r["tokens"], r["routing"]): r["seconds"]
                for r in results
                if r["shape"] == shape_name and r["format"] == fmt_name and r["threads"] == threads
            }
            if (1, "random") in by_t and (8, "random") in by_t:
                extra.setdefault("t8_over_t1", {})[f"{shape_name}/{fmt_name}"] = {
                    "random": by_t[(8, "random")] / by_t[(1, "random")],
                    "shared": by_t.get((8, "shared"), float("nan")) / by_t[(1, "random")],
                }
    name = f"kernels-{machine_name()}"
    payload = {
        "read_bw_gbs": bw.best_gbs,
        "read_bw": {"spread": bw.spread(), "readings": bw.readings},
        "read_bw_worker": {"spread": bw_worker.spread(), "readings": bw_worker.readings} if bw_worker else None,
        "threads": threads,
        "worker_threads": w_threads,
        "amx": amx_usable(),  # experts with enough slots run on AMX tiles, but int4-g32's (amx_ab: A/B)
        "quick": args.quick,
        "calls": num_calls,
        "results": results,
        "torch": torch_rows,
        "kt_kernel": kt_rows if kt_reason is None else {"not_run": kt_reason},
        "kt_threads": kt_threads,
        **(
            {"against": {"path": str(Path(args.against).resolve()), "commit": _commit(args.against)}}
            if args.against
            else {}
        ),
        **notes,
        **extra,
        "targets": targets(results, kt_rows, threads, name),
        "note": "seconds = best of the calls (fresh random routing each); "
        "gbs = bytes of the experts that call read / seconds; "
        "roofline_frac = gbs / the best read bandwidth of the run at the row's thread count; roofline_frac_nearest = "
        "gbs / the reading taken nearest the row in time (read_bw.readings); read bandwidth = best of several passes "
        "of a parallel sum over a buffer far larger than L3, as STREAM measures",
    }
    path = write_results(name, payload, plot=plot, json_path=args.json)
    if args.json:
        Path(args.json + ".partial").unlink(missing_ok=True)  # the whole run is in the file now
    for t in payload["targets"]:
        print(
            f"target {t['name']:60s} {t['value']:6.3f} (goal {t['op']} {t['goal']}): {'met' if t['met'] else 'NOT met'}"
        )
    print(
        json.dumps(
            {
                "read_bw": payload["read_bw"]["spread"],
                **{k: extra[k] for k in ("region_overhead", "fp8_decode_per_core") if k in extra},
            },
            indent=1,
        )
    )
    print(f"wrote {path}")


def _commit(path: str) -> str | None:
    """The git commit checked out at `path`, a checkout or its kernels/ folder as --against takes them;
    None for any other folder (kernels exported into a folder inside this checkout reported its commit)."""
    folder = _kernels_folder(path)
    root = folder.parent if folder is not None else Path(path).resolve()
    git = ["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"]
    r = subprocess.run(git, capture_output=True, text=True)
    top, _, head = r.stdout.strip().partition("\n")
    return head if r.returncode == 0 and Path(top).resolve() == root else None


def targets(results: list[dict], kt_rows: list[dict], threads: int, name: str) -> list[dict]:
    """Issue 14's goals, checked on this run's rows (all threads; the DeepSeek-V3 goals need its full layer)."""
    out = []

    def check(label, value, op, goal):
        if value is not None and np.isfinite(value):
            out.append(
                {
                    "name": label,
                    "value": float(value),
                    "op": op,
                    "goal": goal,
                    "met": bool(value >= goal if op == ">=" else value <= goal),
                }
            )

    rows = {(r["shape"], r["format"], r["tokens"], r["routing"]): r for r in results if r["threads"] == threads}
    for (shape, fmt, tokens, routing), r in rows.items():
        if tokens == 1 and routing in ("random", "decode order"):
            goal = (
                {"deepseek-v3": 0.85, "qwen3-30b-a3b": 0.75}[shape]
                if name != "kernels-dev"
                else (0.65 if fmt == "fp8" else None)
            )
            order = " in decode order" if routing == "decode order" else ""
            if goal:
                check(f"{shape} {fmt} T=1{order} roofline_frac_nearest", r.get("roofline_frac_nearest"), ">=", goal)
        elif routing == "random" and (shape, fmt, 1, "random") in rows:
            check(
                f"{shape} {fmt} T={tokens} random GB/s over T=1's",
                r["gbs"] / rows[(shape, fmt, 1, "random")]["gbs"],
                ">=",
                0.8,
            )
        elif routing == "shared" and (shape, fmt, 1, "random") in rows:
            check(
                f"{shape} {fmt} T=8 shared time over T=1's",
                r["seconds"] / rows[(shape, fmt, 1, "random")]["seconds"],
                "<=",
                1.5,
            )
    for r in kt_rows:
        mine = rows.get((r.get("shape"), r.get("format"), r.get("tokens"), "random"))
        if mine and "seconds" in r and r["format"] == "fp8" and r["tokens"] == 1:
            check(f"{r['shape']} fp8 T=1 kt-kernel time over hmoe's", r["seconds"] / mine["seconds"], ">=", 1.5)
    return out


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({r["shape"] for r in payload["results"]})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for fmt in FORMATS:

            def fracs(routing, fmt=fmt, shape=shape):
                return sorted(
                    (r["tokens"], r["roofline_frac"])
                    for r in payload["results"]
                    if r["shape"] == shape
                    and r["format"] == fmt
                    and r["routing"] == routing
                    and "roofline_frac" in r
                    and r["threads"] == payload["threads"]
                )

            rows, order = fracs("random"), fracs("decode order")
            if rows:
                (line,) = ax.plot(*zip(*rows), marker="o", label=f"hmoe {fmt}")
                if order:  # T=1 back to back over layers, as a decode step calls them (bench_decode_order)
                    ax.plot(*zip(*order), marker="*", markersize=11, linestyle="", color=line.get_color())
        rows = sorted((r["tokens"], r["roofline_frac"]) for r in payload["torch"] if r["shape"] == shape)
        if rows:
            ax.plot(*zip(*rows), marker="x", linestyle="--", color="gray", label="torch bf16")
        if isinstance(payload["kt_kernel"], list):
            for fmt in FORMATS:
                rows = sorted(
                    (r["tokens"], r["roofline_frac"])
                    for r in payload["kt_kernel"]
                    if r.get("shape") == shape and r["format"] == fmt and "roofline_frac" in r
                )
                if rows:
                    ax.plot(*zip(*rows), marker="s", linestyle=":", label=f"kt-kernel {fmt}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per call (top-8, random routing; *: T=1 in decode order)")
        spread = payload["read_bw"]["spread"]
        ax.set_ylabel(
            f"expert bytes read / s  ÷  {spread['best_gbs']:.0f} GB/s "
            f"(readings {spread['worst_gbs']:.0f}-{spread['best_gbs']:.0f})"
        )
        ax.set_title(f"{shape} ({payload['machine']['cpu_model'][:40]}, {payload['threads']} threads)")
        ax.set_ylim(0, 1.15)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
