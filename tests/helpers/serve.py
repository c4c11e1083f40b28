"""`hmoe serve` for end-to-end tests: real router and worker processes on a tiny model, CPU, real shared memory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from helpers.net import free_port

from hmoe.runtime.client import status_once


@dataclass
class Served:
    proc: subprocess.Popen
    endpoint: str
    out_path: Path  # serve's own lines
    log_path: Path  # the children's
    prefix: str = ""  # HMOE_SHM_PREFIX: its weight pack and hand-off segments

    def pid(self, role: str) -> int:
        return next(w["pid"] for w in status_once(self.endpoint, 5.0)["workers"] if w["role"] == role)

    def wait_ready(self, timeout_s: float = 120.0, since_pids: dict | None = None) -> dict:
        """Until both roles are registered (with other pids than `since_pids`, after a restart)."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc.poll() is None, self.out_path.read_text()
            try:
                workers = {w["role"]: w["pid"] for w in status_once(self.endpoint, 1.0)["workers"]}
            except Exception:  # noqa: BLE001  (the router may be restarting)
                workers = {}
            if set(workers) == {"prefill", "decode"} and all(workers[r] != (since_pids or {}).get(r) for r in workers):
                return workers
            assert time.monotonic() < deadline, self.out_path.read_text() + self.log_path.read_text()[-3000:]
            time.sleep(0.2)

    def kv_free(self) -> bool:
        """Every KV block of the decode worker free again (its heartbeat's word) and nothing running."""
        status = status_once(self.endpoint, 2.0)
        decode_worker = next(w for w in status["workers"] if w["role"] == "decode")
        return status["running"] == 0 and decode_worker["kv_free_tokens"] == decode_worker["kv_capacity_tokens"]

    def wait_kv_free(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.kv_free():
            assert time.monotonic() < deadline, status_once(self.endpoint)
            time.sleep(0.1)


def serve(model_dir, tmp, pack: str, ready_line: str = "hmoe serving", **env_overrides: str) -> Iterator[Served]:
    """`hmoe serve MODEL_DIR` on a free port with the test settings (env_overrides on top), ready once it prints
    `ready_line`; stopped with SIGINT."""
    prefix = f"hmoe-test-{uuid.uuid4().hex[:8]}."
    env = (
        dict(
            os.environ,
            HMOE_SHM_PREFIX=prefix,
            HMOE_ROUTER_RUNTIME_DIR=str(tmp),
            HMOE_WORKER_KV_CACHE_GIB="0.02",
            HMOE_WORKER_EXPERTS="torch",
            HMOE_ROUTER_CLIENT_TIMEOUT_S="2",
            HMOE_ROUTER_MAX_PROMPT_TOKENS="512",
            HMOE_WORKER_HANDOFF_SLOT_TOKENS="512",
            HMOE_WORKER_PREFILL_CHUNK_TOKENS="64",
            HMOE_ROUTER_DRAIN_GRACE_S="20",
            HMOE_WORKER_DRAIN_GRACE_S="5",
            OMP_NUM_THREADS="1",
            HMOE_HTTP_PORT="0",  # no HTTP API here (test_http_serve.py has it): port 8000 may be taken
        )
        | env_overrides
    )  # two workers and the test share 2 cores
    port = free_port()
    out_path = tmp / "serve.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hmoe.runtime.cli",
                "serve",
                str(model_dir),
                "--port",
                str(port),
                "--pack",
                pack,
            ],
            stdout=out,
            stderr=out,
            env=env,
        )
    served = Served(proc, f"tcp://127.0.0.1:{port}", out_path, tmp / f"serve-{port}.log", prefix)
    deadline = time.monotonic() + 180
    while ready_line not in out_path.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out_path.read_text()
        time.sleep(0.2)
    try:
        yield served
        proc.send_signal(signal.SIGINT)  # as Ctrl-C: router drains, then the workers, all exit 0
        assert proc.wait(60) == 0, out_path.read_text()
        left = sorted(p.name for p in tmp.iterdir() if p.suffix in (".sock", ".pid"))
        assert left == [], left  # a clean stop leaves no socket and no pid file
    finally:
        if proc.poll() is None:
            proc.kill()  # its children follow (PR_SET_PDEATHSIG)
        from hmoe.shm import ShmConfig, remove_pack

        remove_pack(pack, ShmConfig(prefix=prefix), force=True)
