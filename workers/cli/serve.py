"""`hmoe serve`: run the service on this machine.

cheap checks (the ports are free, the device exists, the model folder reads, no other serve on this
port) -> (a tiny random demo model, made once in the cache folder, when no MODEL_DIR is given) -> its
weight pack in shared memory -> the HTTP API (hmoe-http, unless --http-port 0) + router + prefill
worker + decode worker under a Supervisor -> "serving ... at ENDPOINT" and the HTTP URL once both
workers registered and the HTTP API listens. Ctrl-C / SIGTERM stops them in order: the HTTP API
first (its streams finish), then the router, then the workers. A start-up failure is one line and
exit 3, leaves a marker that `hmoe generate --wait` reads (ServeFiles), and removes the pack this
start loaded; a stop removes the pid file and the sockets. The clients that talk to it
(`hmoe generate`, `hmoe status`) live in hmoe.runtime.cli.requests and import no torch.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import click

from hmoe.runtime.config import load_config
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.worker_pool import roles_served

DEMO = ("deepseek_v3", "tiny", "bf16")
ROUTER_WATCHDOG_S = 30.0  # as WatchdogSec= of deploy/systemd/hmoe-router.service
EXIT_STARTUP = 3  # as hmoe-router and hmoe-worker: a start-up failure, which restarting cannot fix
REPORT_S = 5.0  # while the workers start, say what is awaited this often


def demo_pack_name() -> str:
    """The demo's weight pack, one per user (the pack namespace is machine-wide): demo-u1000-deepseek_v3-tiny-bf16."""
    return "demo-u{}-{}-{}-{}".format(os.getuid(), *DEMO)


def demo_model_dir() -> Path:
    """Where the demo model lives: $XDG_CACHE_HOME/hmoe (or ~/.cache/hmoe)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hmoe"
    return cache / "demo-{}-{}".format(*DEMO[:2])  # its pack: demo_pack_name()


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
@click.argument("model_dir", required=False, type=click.Path(file_okay=False))
@click.option("--port", type=click.IntRange(1, 65535), help="Serve clients on tcp://127.0.0.1:PORT (default 5555).")
@click.option("--device", help="cpu | cuda | cuda:N for both workers (default: [worker] device).")
@click.option("--pack", "pack_name", help="Weight pack name (default: from the model folder and expert format).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--http-host", help="The OpenAI-compatible HTTP API's address (default: [http] host, 127.0.0.1).")
@click.option(
    "--http-port", type=click.IntRange(0, 65535), help="Its port (default: [http] port, 8000); 0 turns it off."
)
@click.option("--chat-template", type=click.Path(exists=True, dir_okay=False), help="[http] chat_template file.")
@click.option("--served-model-name", help="[http] served_model_name (default: the weight pack's name).")
@click.option(
    "--layout",
    type=click.Choice(["disaggregated", "colocated"]),
    help="[worker] layout: a prefill and a decode worker (default), or one worker that does both.",
)
def serve_cmd(
    model_dir, port, device, pack_name, config_path, http_host, http_port, chat_template, served_model_name, layout
):
    """Serve MODEL_DIR (default: a tiny random demo model) with a router and two workers on this machine."""
    from hmoe.runtime.cli.instance import ServeFiles

    def say(text: str) -> None:
        click.echo(f"hmoe serve: {text}", err=True)

    frontend = f"tcp://127.0.0.1:{port}" if port else None
    http = {"host": http_host, "port": http_port, "served_model_name": served_model_name}
    http["chat_template"] = str(Path(chat_template).resolve()) if chat_template else None
    files = None
    try:
        config = load_config(
            config_path,
            overrides={
                "router": {"frontend": frontend},
                "worker": {"device": device, "pack": pack_name, "layout": layout},
                "http": http,
            },
        )
        files = ServeFiles(config.runtime_dir, config.router.frontend)
        files.claim()
        name, built = _start_up(config, model_dir, say)
    except (HmoeError, OSError) as exc:
        message = str(exc) if isinstance(exc, HmoeError) else f"[startup_failed] {exc}"
        if files is not None:
            files.fail(message)
            files.release()
        click.echo(f"error: {message}", err=True)
        sys.exit(EXIT_STARTUP)
    except BaseException:  # Ctrl-C while loading: no pid file left behind
        if files is not None:
            files.release()
        raise
    code, ready = 1, False
    try:
        code, ready = _supervise(config, name, files, config_path, http, say)
    finally:
        if not ready:
            files.fail(
                f"[startup_failed] hmoe serve stopped (status {code}) before it was ready; log: {files.log_path}"
            )
        files.release()
    if not ready and code != 0:  # a failed start: leave no pack behind that only this start made
        if built:
            from hmoe.shm import ShmError, remove_pack

            try:
                remove_pack(name, config.shm, force=True)
                say(f"removed weight pack {name}, which this start had loaded")
            except ShmError as exc:
                say(f"could not remove weight pack {name}: {exc}")
        code = EXIT_STARTUP
    sys.exit(code)


def _start_up(config, model_dir, say) -> tuple[str, bool]:
    """The cheap checks (ports, device, model folder, pack name), then the weight pack; (its name, built now)."""
    from hmoe.shm import check_name, remove_pack
    from hmoe.workers.cli.checks import check_device, check_endpoint_free
    from hmoe.workers.weights.checkpoint import Checkpoint
    from hmoe.workers.weights.pack_loader import load_pack

    check_endpoint_free(config.router.frontend)
    if config.http.port:
        check_endpoint_free(f"tcp://{config.http.host}:{config.http.port}", "--http-port")
    check_device(config.worker.device)
    name = config.worker.pack or None
    if name is not None:
        check_name(name)
    demo = model_dir is None
    if demo:
        model_dir = ensure_demo_model(say)
        name = name or demo_pack_name()
    Checkpoint.open(model_dir).close()  # config.json and the safetensors headers, before any byte is copied
    if not logging.getLogger().handlers:  # the loader's progress and page-size lines
        logging.basicConfig(level=logging.INFO, format="hmoe serve: %(message)s", stream=sys.stderr)
    logging.getLogger("hmoe.shm.pack").setLevel(logging.WARNING)
    try:  # progress: a terminal line, a log line per 10 s
        pack, built = load_pack(model_dir, name, config=config.shm)
    except HmoeError as exc:
        if not (demo and exc.code == "pack_mismatch"):
            raise
        say(f"the demo model changed; removing its stale weight pack {name}")  # made again by a newer hmoe
        remove_pack(name, config.shm)
        pack, built = load_pack(model_dir, name, config=config.shm)
    name = pack.name
    pack.close()
    say(f"{'loaded' if built else 'found'} weight pack {name} (hmoe shm rm {name} frees it)")
    return name, built


def _supervise(config, name: str, files, config_path, http: dict, say) -> tuple[int, bool]:
    """HTTP API + router + prefill + decode under a Supervisor until stopped; (exit status, ever ready)."""
    from hmoe.runtime.supervisor import ChildSpec, Supervisor

    frontend = config.router.frontend
    backend = config.router.backend or files.backend
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
    ]
    roles = ("colocated",) if config.worker.layout == "colocated" else ("prefill", "decode")
    specs += [ChildSpec(role, (*worker, "--role", role), config.worker.drain_grace_s + 10, stuck_s) for role in roles]
    with open(files.log_path, "ab") as log_file:
        supervisor = Supervisor(specs, log_file, say=say, notify_dir=config.runtime_dir)
        supervisor.start()
        say(f"starting {', '.join(f'{n} (pid {p})' for n, p in supervisor.pids().items())}; logs in {files.log_path}")
        url = f"http://{config.http.host}:{config.http.port}" if config.http.port else ""
        readiness = _Readiness(frontend, name, url, supervisor, say)
        code = supervisor.run(on_tick=readiness)
    if code != 0:
        lines = files.log_path.read_text(errors="replace").splitlines(keepends=True)
        failed = [line for line in lines if "start-up failed" in line or '"startup_failed"' in line]
        if failed:  # the one line that says why (a missing GPU, pack or setting): restarting cannot fix it
            say(f"stopped: a child could not start: {_message(failed[-1])}")
        say(f"stopped with status {code}; the last lines of {files.log_path}:")
        click.echo("".join(lines[-15:]), err=True)
    return code, readiness.ever_ready


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
        self.ready = self.ever_ready = False
        self.next_s = 0.0
        self.start_s = time.monotonic()
        self.next_report_s = self.start_s + REPORT_S

    def __call__(self) -> None:
        from hmoe.runtime.client import RouterUnreachable, status_once

        if time.monotonic() < self.next_s:
            return
        self.next_s = time.monotonic() + (0.5 if not self.ready else 2.0)
        try:
            roles = {r for w in status_once(self.frontend, 0.5)["workers"] for r in roles_served(w["role"])}
        except RouterUnreachable:
            roles = set()
        ready = roles >= {"prefill", "decode"} and (not self.url or _listens(self.url))
        if not self.ever_ready and not ready and time.monotonic() >= self.next_report_s:
            self.next_report_s += REPORT_S
            self.say(
                f"waiting for the workers to register ({sorted(roles) or 'none'} so far, "
                f"{time.monotonic() - self.start_s:.0f} s; the first start compiles the CPU kernels, ~40 s)"
            )
        self.ever_ready |= ready
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
