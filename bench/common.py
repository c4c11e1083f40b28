"""Shared benchmark helpers: the machine's description, its measured memory read bandwidth, results.

Every bench reports ratios against limits measured in the same run (DESIGN.md, "Measuring"), so
each one calls `read_bandwidth_gbs()` beside its own timings and writes `write_results()`.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(model_dir: str | None, env: dict[str, str], http_port: int = 0) -> tuple[subprocess.Popen, str]:
    """`hmoe serve` (the demo model unless model_dir) on a free port with env on top of ours; returns
    (process, frontend endpoint) once it says both workers (and the HTTP API, if http_port) serve."""
    port = free_port()
    cmd = [sys.executable, "-m", "hmoe.runtime.cli", "serve", *([model_dir] if model_dir else [])]
    cmd += ["--port", str(port), "--http-port", str(http_port)]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    deadline = time.monotonic() + 900
    for line in proc.stdout:
        print(line, end="", file=sys.stderr)
        if line.startswith("hmoe serving"):
            return proc, f"tcp://127.0.0.1:{port}"
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit(f"hmoe serve did not come up (exit {proc.poll()}); run it by hand to see why")


def add_model_options(p) -> None:
    """--model-dir, --make, --device: what a bench's `hmoe serve` serves, and where."""
    p.add_argument("--model-dir", help="What hmoe serve serves (default: the demo model).")
    p.add_argument("--make", metavar="ARCH:PRESET:DTYPE:LAYERS", help="Make a random model first (in a temp dir).")
    p.add_argument("--device", default="cpu")


def prepare_model(args, tmp: str | os.PathLike) -> str:
    """With --make, make that model under tmp and point args.model_dir at it; the model's name for results."""
    if not args.make:
        return args.model_dir or "demo"
    args.model_dir = str(made_model(args.make, tmp))
    return args.make


def made_model(make: str, work_dir: str | os.PathLike) -> Path:
    """The model ARCH:PRESET:DTYPE[:LAYERS] (hmoe make-model, seed 0) in work_dir/ARCH-PRESET-DTYPE[-LAYERS],
    made there unless an earlier run left it."""
    from hmoe.workers.weights.make_model import make_model

    arch, preset, dtype, *layers = make.split(":")
    model_dir = Path(work_dir) / "-".join([arch, preset, dtype, *layers])
    if not (model_dir / "config.json").exists():
        started = time.perf_counter()
        make_model(model_dir, arch, preset, dtype, seed=0, num_layers=int(layers[0]) if layers else None)
        print(f"made {make} in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return model_dir


def machine_name() -> str:
    """Short name of this machine for result files: the GPU's model ("h200", "h100") where one is visible,
    else "dev"."""
    try:
        import torch

        if torch.cuda.is_available():
            words = torch.cuda.get_device_name(0).lower().replace("nvidia", "").split()
            return next((w for w in words if any(c.isdigit() for c in w)), words[0] if words else "gpu")
    except ImportError:
        pass
    return "dev"


def machine() -> dict:
    """CPU model, cores, caches, memory, SIMD features, the pages packs get here, load, torch and numba
    versions, GPU if any (every bench's header)."""
    from hmoe.kernels import jit
    from hmoe.kernels.moe import physical_cores
    from hmoe.shm import ShmConfig
    from hmoe.shm.segment import huge_page_policy

    flags = cpu_flags()
    info = {
        "name": machine_name(),
        "cpu_model": cpu_model(),
        "logical_cpus": len(os.sched_getaffinity(0)),
        "physical_cores": physical_cores(),
        "l3_mib": l3_bytes() >> 20,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "pack_pages": huge_page_policy(ShmConfig()),
        "load_average": os.getloadavg(),
        "simd": sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "f16c", "fma")),
        "llvm_cpu": __import__("llvmlite.binding", fromlist=["x"]).get_host_cpu_name(),
        "numba_features_no_prefer_256": jit.NO_PREFER_256 in jit.codegen_features(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": __import__("numba").__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except ImportError:
        info["torch"] = None
    return info


def _sum_kernel():
    from numba import njit, prange

    from hmoe.kernels.simd import vadd, vload, vsum, vzero

    @njit(parallel=True, nogil=True, cache=True)
    def parallel_sum(a, num_threads, partial):
        """Sum of a float32 array, `num_threads` contiguous slices, 4 independent vector accumulators."""
        n = a.size // num_threads // 64 * 64
        for t in prange(num_threads):
            s = a[t * n : (t + 1) * n]
            a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
            for i in range(0, n, 64):
                a0, a1 = vadd(a0, vload(s, i)), vadd(a1, vload(s, i + 16))
                a2, a3 = vadd(a2, vload(s, i + 32)), vadd(a3, vload(s, i + 48))
            partial[t] = vsum(vadd(vadd(a0, a1), vadd(a2, a3)))

    return parallel_sum


def stream_bytes() -> int:
    """A read buffer far larger than the last-level cache (8x, at least 1 GiB), within 1/8 of RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(min(max(8 * l3_bytes(), 2**30), ram // 8)) // 256 * 256


class ReadBandwidth:
    """The machine's memory read bandwidth, measured as STREAM does: the best of several timed passes of a
    parallel read (a Numba sum, `num_threads` contiguous slices) over a buffer far larger than the caches.

    Every `measure()` is kept as a reading (time, best, median, worst), so a result can be set against the
    run's best reading and against the reading nearest it in time (`nearest()`).
    """

    def __init__(self, nbytes: int | None = None, num_threads: int | None = None):
        import numba

        from hmoe.kernels.moe import physical_cores

        self.num_threads = min(num_threads or physical_cores(), numba.config.NUMBA_NUM_THREADS)
        self.buffer = np.ones((nbytes or stream_bytes()) // 4, np.float32)
        self.partial = np.zeros(self.num_threads, np.float32)
        self.kernel = _sum_kernel()
        self.readings: list[dict] = []
        self._t0 = time.perf_counter()

    @property
    def best_gbs(self) -> float:
        return max((r["best_gbs"] for r in self.readings), default=0.0)

    def now_s(self) -> float:
        """Seconds since this object was made (the clock readings and results are placed on)."""
        return time.perf_counter() - self._t0

    def measure(self, repeats: int = 5) -> float:
        """Best of `repeats` passes in GB/s (kept as a reading too)."""
        return self.read(repeats)["best_gbs"]

    def read(self, passes: int = 5, label: str = "") -> dict:
        """One reading: `passes` timed passes after an untimed one; GB/s best, median and worst."""
        import numba

        numba.set_num_threads(self.num_threads)
        self.kernel(self.buffer, self.num_threads, self.partial)
        gbs = []
        for _ in range(passes):
            start = time.perf_counter()
            self.kernel(self.buffer, self.num_threads, self.partial)
            gbs.append(self.buffer.nbytes / (time.perf_counter() - start) / 1e9)
        reading = {
            "t_s": round(self.now_s(), 3),
            "label": label,
            "threads": self.num_threads,
            "passes": passes,
            "buffer_mib": self.buffer.nbytes >> 20,
            "best_gbs": max(gbs),
            "median_gbs": float(np.median(gbs)),
            "worst_gbs": min(gbs),
        }
        self.readings.append(reading)
        return reading

    def nearest(self, t_s: float) -> dict:
        """The reading taken nearest in time to `t_s` (seconds on this object's clock)."""
        return min(self.readings, key=lambda r: abs(r["t_s"] - t_s))

    def spread(self) -> dict:
        """Best readings of the run: best, median and worst (how far the denominator moved)."""
        best = [r["best_gbs"] for r in self.readings]
        return {
            "readings": len(best),
            "best_gbs": max(best),
            "median_gbs": float(np.median(best)),
            "worst_gbs": min(best),
        }

    def evict(self) -> None:
        """Read the whole buffer once: pushes earlier data out of every cache level (size it past the L3)."""
        import numba

        numba.set_num_threads(self.num_threads)
        self.kernel(self.buffer, self.num_threads, self.partial)


def decode_worker_threads() -> int:
    """Threads the decode worker gives the expert kernels by default here (policy.cpu_threads): most of the
    CPUs where prefill streams to a GPU, half of them where the two workers share them."""
    import torch

    from hmoe.runtime.policy import cpu_threads

    return cpu_threads("decode", len(os.sched_getaffinity(0)), prefill_streams=torch.cuda.is_available())


def _without(argv: list[str], *flags: str) -> list[str]:
    """argv less each of `flags` and its value (`--flag V` or `--flag=V`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in flags)):
            out.append(arg)
    return out


def run_variants(variants: str, name: str, json_path: str | os.PathLike | None, plot) -> Path:
    """The running bench (sys.argv) once per environment variant, each in a fresh process (libgomp and Numba
    read their settings when they load), all in one file: NAME-variants.json with {"variant", the run's
    payload...} per variant, drawn by `plot`. `variants`: ";" between them, each "default" (this process's
    environment) or NAME=VALUE ...; the bench's --variants and --json flags are not passed on."""
    import tempfile

    argv = _without(sys.argv[1:], "--variants", "--json")  # the bench's parser must not take abbreviations
    specs = [v.strip() for v in variants.split(";")]
    for item in (item for spec in specs if spec != "default" for item in spec.split()):
        if "=" not in item:
            raise SystemExit(f'--variants: {item!r} is not NAME=VALUE (variants: "default;NAME=VALUE ...;...")')
    runs: list[dict] = []
    path = RESULTS_DIR / f"{name}-variants.json"
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(specs):
            env = dict(os.environ)
            if spec != "default":
                env.update(item.split("=", 1) for item in spec.split())
            out = Path(tmp) / f"{i}.json"
            print(f"== variant {spec}", flush=True)
            rc = subprocess.run([sys.executable, sys.argv[0], *argv, "--json", str(out)], env=env).returncode
            # A variant cut short still leaves the rows it finished; one that failed first is listed with no rows.
            payload = json.loads(out.read_text()) if out.exists() else {"results": []}
            runs.append({"variant": spec, "returncode": rc, **payload})
            path = write_results(f"{name}-variants", {"argv": argv, "variants": runs}, plot, json_path)
    return path


def l3_bytes() -> int:
    """The last-level cache size from sysfs (0 where unknown)."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return 0
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def read_bandwidth_gbs(nbytes: int | None = None, num_threads: int | None = None, passes: int = 5) -> float:
    """Best-of-N parallel read bandwidth in GB/s (see ReadBandwidth)."""
    return ReadBandwidth(nbytes, num_threads).measure(passes)


def read_bandwidth_elsewhere(num_threads: int, passes: int = 5) -> float:
    """read_bandwidth_gbs in a child process, so the measurement's OpenMP team never joins this one's (a bench
    of a worker's expert kernels must hold only the teams a worker holds)."""
    code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); from common import "
        f"read_bandwidth_gbs; print(read_bandwidth_gbs(num_threads={int(num_threads)}, passes={int(passes)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def write_results(name: str, payload: dict, plot=None, json_path: str | os.PathLike | None = None) -> Path:
    """bench/results/NAME.json (or json_path) with the machine's description; `plot(payload, png_path)`
    draws the PNG beside it."""
    path = Path(json_path) if json_path else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"bench": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)
    if plot is not None:
        plot(payload, path.with_suffix(".png"))
    return path
