"""`hmoe serve`: run the service on this machine.

(a tiny random demo model, made once in the cache folder, when no MODEL_DIR is given) -> its weight
pack in shared memory -> the HTTP API (hmoe-http, unless --http-port 0) + router + prefill worker +
decode worker under a Supervisor -> "serving ... at ENDPOINT" and the HTTP URL once both workers
registered and the HTTP API listens. Ctrl-C / SIGTERM stops them in order: the HTTP API first (its
streams finish), then the router, then the workers. The clients that
talk to it (`hmoe generate`, `hmoe status`) live in hmoe.runtime.cli.requests and import no torch.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from pathlib import Path

import click

from hmoe.runtime.config import load_config
from hmoe.runtime.errors import HmoeError

DEMO = ("deepseek_v3", "tiny", "bf16")
ROUTER_WATCHDOG_S = 30.0  # as WatchdogSec= of deploy/systemd/hmoe-router.service


def demo_model_dir() -> Path:
    """Where the demo model lives: $XDG_CACHE_HOME/hmoe (or ~/.cache/hmoe)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hmoe"
    return cache / "demo-{}-{}".format(*DEMO[:2])  # the pack adds the expert format: demo-deepseek_v3-tiny-bf16


def ensure_demo_model(say) -> Path:
    """Make the demo model on first use (under a lock; written aside, then renamed into place)."""
    from hmoe.workers.weights.make_model import make_model  # (torch: only when serving)

    path = demo_model_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "tokenizer_config.json").is_file():  # (made before chat templates: make it again)
            say(f"making the tiny random demo model in {path} (once)")
            scratch = path.with_name(path.name + f".tmp-{os.getpid()}")
            shutil.rmtree(scratch, ignore_errors=True)
            make_model(scratch, *DEMO)
            shutil.rmtree(path, ignore_errors=True)
            scratch.rename(path)
    return path


@click.command("serve")
@click.argument("model_dir", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--port", type=int, help="Serve clients on tcp://127.0.0.1:PORT (default: [router] frontend, port 5555).")
@click.option("--device", help="cpu | cuda | cuda:N for both workers (default: [worker] device).")
@click.option("--pack", "pack_name", help="Weight pack name (default: from the model folder and expert format).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--http-host", help="The OpenAI-compatible HTTP API's address (default: [http] host, 127.0.0.1).")
@click.option("--http-port", type=int, help="Its port (default: [http] port, 8000); 0 turns it off.")
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), help="[http] chat_template file.")
@click.option("--served-model-name", help="[http] served_model_name (default: the weight pack's name).")
def serve_cmd(model_dir, port, device, pack_name, config_path, http_host, http_port, chat_template, served_model_name):
    """Serve MODEL_DIR (default: a tiny random demo model) with a router and two workers on this machine."""
    from hmoe.runtime.supervisor import ChildSpec, Supervisor
    from hmoe.shm import remove_pack
    from hmoe.workers.weights.pack_loader import load_pack

    def say(text: str) -> None:
        click.echo(f"hmoe serve: {text}", err=True)

    frontend = f"tcp://127.0.0.1:{port}" if port else None
    http = {"host": http_host, "port": http_port, "served_model_name": served_model_name}
    http["chat_template"] = str(Path(chat_template).resolve()) if chat_template else None
    config = load_config(
        config_path,
        overrides={"router": {"frontend": frontend}, "worker": {"device": device, "pack": pack_name}, "http": http},
    )
    demo = not model_dir
    model_dir = Path(model_dir) if model_dir else ensure_demo_model(say)
    try:
        pack, built = load_pack(model_dir, config.worker.pack or None, config=config.shm)
    except HmoeError as exc:
        if not (demo and exc.code == "pack_mismatch"):
            raise
        stale = config.worker.pack or f"{model_dir.name}-{DEMO[2]}"  # the demo was made again by a newer hmoe
        say(f"the demo model changed; removing its stale weight pack {stale}")
        remove_pack(stale, config.shm)
        pack, built = load_pack(model_dir, config.worker.pack or None, config=config.shm)
    name = pack.name
    pack.close()
    say(f"{'loaded' if built else 'found'} weight pack {name} (hmoe shm rm {name} frees it)")
    frontend = config.router.frontend
    backend = (
        config.router.backend or f"ipc://{config.runtime_dir}/backend-{frontend.rsplit(':', 1)[-1].strip('/')}.sock"
    )
    common = (*(("--config", config_path) if config_path else ()),)
    stuck_s = config.router.stuck_after_s
    worker = (
        sys.executable,
        "-m",
        "hmoe.workers.engine.worker",
        "--pack",
        name,
        "--router",
        backend,
        "--device",
        config.worker.device,
        *common,
    )
    http_flags = (f"--{k.replace('_', '-')}={v}" for k, v in http.items() if v is not None)
    http_child = (sys.executable, "-m", "hmoe.runtime.http.server", "--router", frontend, "--pack", name)
    specs = [
        *(
            [ChildSpec("http", (*http_child, *http_flags, *common), config.router.drain_grace_s + 10)]
            if config.http.port
            else []
        ),
        ChildSpec(
            "router",
            (
                sys.executable,
                "-m",
                "hmoe.runtime.router",
                "--frontend",
                frontend,
                "--backend",
                backend,
                "--pack",
                name,
                *common,
            ),
            config.router.drain_grace_s + 10,
            ROUTER_WATCHDOG_S,
        ),
        # The workers' watchdog is the router's stuck_after_s: a hung main loop is restarted either way.
        ChildSpec("prefill", (*worker, "--role", "prefill"), config.worker.drain_grace_s + 10, stuck_s),
        ChildSpec("decode", (*worker, "--role", "decode"), config.worker.drain_grace_s + 10, stuck_s),
    ]
    Path(config.runtime_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = Path(config.runtime_dir) / f"serve-{frontend.rsplit(':', 1)[-1].strip('/')}.log"
    with open(log_path, "ab") as log_file:
        supervisor = Supervisor(specs, log_file, say=say, notify_dir=config.runtime_dir)
        supervisor.start()
        say(f"starting {', '.join(f'{n} (pid {p})' for n, p in supervisor.pids().items())}; logs in {log_path}")
        url = f"http://{config.http.host}:{config.http.port}" if config.http.port else ""
        code = supervisor.run(on_tick=_Readiness(frontend, name, url, supervisor, say))
    if code != 0:
        lines = log_path.read_text(errors="replace").splitlines(keepends=True)
        failed = [line for line in lines if "start-up failed" in line or '"startup_failed"' in line]
        if failed:  # the one line that says why (a missing GPU, pack or setting): restarting cannot fix it
            say(f"stopped: a child could not start: {_message(failed[-1])}")
        say(f"stopped with status {code}; the last lines of {log_path}:")
        click.echo("".join(lines[-15:]), err=True)
    sys.exit(code)


def _message(line: str) -> str:
    """A JSON log line's message (the children log one JSON object per line), else the line."""
    try:
        record = json.loads(line)
    except ValueError:
        return line.strip()
    text = record.get("reason") or record.get("event") or record.get("message") or line.strip()
    return f"{record['process']}: {text}" if record.get("process") else str(text)


class _Readiness:
    """on_tick: ask the router until both workers registered, then say where we listen (once per readiness)."""

    def __init__(self, frontend: str, name: str, url: str, supervisor, say):
        self.frontend, self.name, self.url, self.supervisor, self.say = frontend, name, url, supervisor, say
        self.ready = False
        self.next_s = 0.0

    def __call__(self) -> None:
        from hmoe.runtime.client import RouterUnreachable, status_once

        if time.monotonic() < self.next_s:
            return
        self.next_s = time.monotonic() + (0.5 if not self.ready else 2.0)
        try:
            roles = {w["role"] for w in status_once(self.frontend, 0.5)["workers"]}
        except RouterUnreachable:
            roles = set()
        ready = roles >= {"prefill", "decode"} and (not self.url or _listens(self.url))
        if ready and not self.ready:
            click.echo(
                f'hmoe serving {self.name} at {self.frontend} — try: hmoe generate --endpoint {self.frontend} "Hello"'
            )
            if self.url:
                body = """'{"messages": [{"role": "user", "content": "Hello"}]}'"""
                click.echo(
                    f"OpenAI-compatible API at {self.url}/v1 — try: curl {self.url}/v1/chat/completions "
                    f"-H 'Content-Type: application/json' -d {body}"
                )
        elif self.ready and not ready:
            self.say(f"not ready: workers registered: {sorted(roles) or 'none'}")
        self.ready = ready


def _listens(url: str) -> bool:
    """Something accepts TCP connections at http://HOST:PORT."""
    import socket

    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=0.5):
            return True
    except OSError:
        return False
