"""Soak: mixed valid, invalid and cancelled traffic against `hmoe serve` for a while; RSS of every process.

    python bench/soak.py --duration-s 1800 --tag dev        # starts hmoe serve on a tiny random model

Traffic, from --users concurrent clients, each request drawn at random: valid (text or token-id
prompts, greedy or sampled, 4-24 tokens), invalid (bad sampling values, a bool temperature, an empty
prompt, a prompt of 0.1-1 MB refused as too long, garbage frames) and cancelled mid-stream. Every
--sample-s the RSS of the router, the prefill and the decode worker (by role, across restarts) is read
from /proc. Growth is the median of the last 5 samples over the median of the first 5 after --warmup-s.
Writes bench/results/soak-TAG.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

from hmoe.runtime import AsyncClient, RouterError
from hmoe.runtime.client import RouterUnreachable, status_once
from hmoe.runtime.protocol import Generate, encode
from hmoe.runtime.worker_pool import ROLES as WORKER_ROLES
from hmoe.runtime.worker_pool import roles_served

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

ROLES = {"router": "hmoe.runtime.router", "prefill": "--role prefill", "decode": "--role decode"}
WORDS = "the quick brown fox jumps over a lazy dog while seven tired wizards quietly hum".split()


def _unknown_sampling_key() -> bytes:
    """A well-formed Generate whose params carry a key no version knows (sent raw: encode() would refuse it)."""
    body = msgpack.unpackb(encode(Generate("g1", token_ids=[1])))
    body["params"] = {"evil": 1}
    return msgpack.packb(body)


GARBAGE = [b"\xc1 not msgpack", _unknown_sampling_key(), b"\x80"]


def rss_mb(serve_pid: int) -> dict[str, float]:
    """RSS of hmoe serve (supervisor) and of each child, by role."""
    out = subprocess.run(["ps", "-o", "pid=,rss=,args=", "--ppid", str(serve_pid)], capture_output=True, text=True)
    found = {"supervisor": _rss_kb(serve_pid) / 1024}
    for line in out.stdout.splitlines():
        pid, rss, args = line.split(None, 2)
        for role, needle in ROLES.items():
            if needle in args:
                found[role] = int(rss) / 1024
    return found


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def start_serve(model_dir: Path, runtime_dir: Path, prefix: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        HMOE_SHM_PREFIX=prefix,
        HMOE_ROUTER_RUNTIME_DIR=str(runtime_dir),
        HMOE_WORKER_KV_CACHE_GIB="0.05",
        HMOE_WORKER_EXPERTS="torch",
        HMOE_ROUTER_MAX_PROMPT_TOKENS="2048",
        HMOE_WORKER_HANDOFF_SLOT_TOKENS="2048",
        OMP_NUM_THREADS="1",
    )
    cmd = [sys.executable, "-m", "hmoe.runtime.cli", "serve", str(model_dir), "--port", str(port), "--pack", "soak"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint, deadline = f"tcp://127.0.0.1:{port}", time.monotonic() + 600
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"hmoe serve did not come up (exit {proc.poll()}); logs in {runtime_dir}")
        try:
            if {r for w in status_once(endpoint, 1.0)["workers"] for r in roles_served(w["role"])} >= set(WORKER_ROLES):
                return proc, endpoint
        except RouterUnreachable:
            pass
        time.sleep(0.5)


async def one(client: AsyncClient, raw: zmq.asyncio.Socket, rng: random.Random) -> str:
    """One request of a random kind; its outcome's name."""
    kind = rng.choices(["valid", "invalid", "huge", "garbage", "cancel"], [55, 15, 5, 5, 20])[0]
    text = " ".join(rng.choices(WORDS, k=rng.randint(1, 60)))
    try:
        if kind == "valid":
            sampled = rng.random() < 0.5
            params = dict(temperature=0.8, top_p=0.9, top_k=20) if sampled else {}
            prompt = dict(token_ids=[rng.randrange(2, 200) for _ in range(20)]) if rng.random() < 0.3 else {}
            result = await client.complete(
                None if prompt else text, max_tokens=rng.randint(4, 24), ignore_eos=True, **params, **prompt
            )
            return f"valid:{result.finish_reason}"
        if kind == "invalid":
            bad = rng.choice([dict(temperature=True), dict(top_p=0.0), dict(max_tokens=0), dict(temperature=-1)])
            await client.complete(rng.choice([text, ""]), **bad)
        elif kind == "huge":
            await client.complete("x" * rng.randint(100_000, 1_000_000), max_tokens=4)
        elif kind == "garbage":
            await raw.send(rng.choice(GARBAGE))
            await raw.recv()
            return "garbage:answered"
        else:
            async with client.generate(text, max_tokens=200, ignore_eos=True) as stream:
                async for n, _ in _enumerate(stream):
                    if n >= rng.randint(1, 3):
                        break
            return "cancelled"
    except RouterError as exc:
        return f"{kind}:{exc.code}"
    return f"{kind}:accepted"


async def _enumerate(stream):
    n = 0
    async for chunk in stream:
        n += 1
        yield n, chunk


async def traffic(endpoint: str, users: int, until: float, outcomes: Counter, seed: int) -> None:
    async def user(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        raw = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        raw.connect(endpoint)
        async with AsyncClient(endpoint) as client:
            while time.monotonic() < until:
                outcomes[await one(client, raw, rng)] += 1
                await asyncio.sleep(rng.uniform(0.0, 0.2))
        raw.close(linger=0)

    await asyncio.gather(*(user(i) for i in range(users)))


async def sample(serve_pid: int, every_s: float, until: float, samples: list, start: float) -> None:
    while time.monotonic() < until:
        samples.append({"t_s": round(time.monotonic() - start, 1), "rss_mb": rss_mb(serve_pid)})
        await asyncio.sleep(every_s)


def growth(samples: list, warmup_s: float) -> dict:
    after = [s for s in samples if s["t_s"] >= warmup_s]
    result = {}
    for role in ("supervisor", *ROLES):
        values = [s["rss_mb"][role] for s in after if role in s["rss_mb"]]
        if len(values) >= 10:
            first, last = statistics.median(values[:5]), statistics.median(values[-5:])
            result[role] = {"after_warmup_mb": round(first, 1), "end_mb": round(last, 1), "max_mb": max(values)}
            result[role]["growth_pct"] = round(100 * (last - first) / first, 1)
    return result


def plot(payload: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for role in ("supervisor", *ROLES):
        points = [(s["t_s"] / 60, s["rss_mb"][role]) for s in payload["samples"] if role in s["rss_mb"]]
        ax.plot(*zip(*points), label=f"{role} ({payload['growth'].get(role, {}).get('growth_pct', '?')}%)")
    ax.axvline(payload["warmup_s"] / 60, color="grey", ls=":", label="end of warm-up")
    ax.set(xlabel="minutes", ylabel="RSS (MB)", title=f"soak: {sum(payload['outcomes'].values())} requests")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration-s", type=float, default=1800.0)
    ap.add_argument("--warmup-s", type=float, default=120.0)
    ap.add_argument("--sample-s", type=float, default=10.0)
    ap.add_argument("--users", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="dev")
    args = ap.parse_args()
    from hmoe.workers.weights.make_model import make_model

    tmp = Path(tempfile.mkdtemp(prefix="hmoe-soak-"))
    model_dir = make_model(tmp / "model", "deepseek_v3", "tiny", "fp32", seed=1)
    prefix = f"hmoe-soak-{uuid.uuid4().hex[:8]}."
    proc, endpoint = start_serve(model_dir, tmp, prefix)
    outcomes: Counter = Counter()
    samples: list = []
    start = time.monotonic()
    until = start + args.duration_s

    async def run():
        await asyncio.gather(
            traffic(endpoint, args.users, until, outcomes, args.seed),
            sample(proc.pid, args.sample_s, until + args.sample_s, samples, start),
        )

    try:
        asyncio.run(run())
    finally:
        proc.send_signal(signal.SIGINT)
        exit_code = proc.wait(120)
        from hmoe.shm import ShmConfig, remove_pack

        remove_pack("soak", ShmConfig(prefix=prefix), force=True)
    payload = {
        "duration_s": args.duration_s,
        "warmup_s": args.warmup_s,
        "users": args.users,
        "outcomes": dict(sorted(outcomes.items())),
        "serve_exit_code": exit_code,
        "restarts_seen": (tmp / f"serve-{endpoint.rsplit(':', 1)[1]}.log").read_text().count("worker_registered") - 2,
        "growth": growth(samples, args.warmup_s),
        "samples": samples,
    }
    path = write_results(f"soak-{args.tag}", payload, plot)
    print(f"{sum(outcomes.values())} requests; growth after warm-up: {payload['growth']}; {path}")


if __name__ == "__main__":
    main()
