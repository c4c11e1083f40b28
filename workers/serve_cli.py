"""`hmoe serve`, `hmoe generate`, `hmoe status`: run the service on this machine and talk to it.

serve: (a tiny random demo model, made once in the cache folder, when no MODEL_DIR is given) ->
its weight pack in shared memory -> router + prefill worker + decode worker under a Supervisor ->
"serving ... at ENDPOINT" once both workers registered. Ctrl-C / SIGTERM stops them in order.
generate and status are thin clients: they import no torch and start in a fraction of a second.
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
from hmoe.workers.cli_options import parse_token_ids, sampling_options

DEMO = ("deepseek_v3", "tiny", "bf16")
ROUTER_TIMEOUT_S = 3.0  # a router that has not answered a ping (sent every second) for this long is gone


def _endpoint(config_path: str | None, endpoint: str | None, port: int | None) -> str:
    if endpoint:
        return endpoint
    if port:
        return f"tcp://127.0.0.1:{port}"
    return load_config(config_path).router.frontend


def demo_model_dir() -> Path:
    """Where the demo model lives: $XDG_CACHE_HOME/hmoe (or ~/.cache/hmoe)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hmoe"
    return cache / "demo-{}-{}".format(*DEMO[:2])  # the pack adds the expert format: demo-deepseek_v3-tiny-bf16


def ensure_demo_model(say) -> Path:
    """Make the demo model on first use (under a lock; written aside, then renamed into place)."""
    from hmoe.workers.make_model import make_model  # noqa: PLC0415  (torch: only when serving)

    path = demo_model_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / ".demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "config.json").is_file():
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
def serve_cmd(model_dir, port, device, pack_name, config_path) -> None:
    """Serve MODEL_DIR (default: a tiny random demo model) with a router and two workers on this machine."""
    from hmoe.runtime.supervisor import ChildSpec, Supervisor  # noqa: PLC0415
    from hmoe.workers.pack_loader import load_pack  # noqa: PLC0415

    def say(text: str) -> None:
        click.echo(f"hmoe serve: {text}", err=True)

    frontend = f"tcp://127.0.0.1:{port}" if port else None
    config = load_config(config_path, overrides={"router": {"frontend": frontend}, "worker": {"device": device, "pack": pack_name}})
    model_dir = Path(model_dir) if model_dir else ensure_demo_model(say)
    pack, built = load_pack(model_dir, config.worker.pack or None, config=config.shm)
    name = pack.name
    pack.close()
    say(f"{'loaded' if built else 'found'} weight pack {name} (hmoe shm rm {name} frees it)")
    frontend = config.router.frontend
    backend = config.router.backend or f"ipc://{config.runtime_dir}/backend-{frontend.rsplit(':', 1)[-1].strip('/')}.sock"
    common = (*(("--config", config_path) if config_path else ()),)
    worker = (sys.executable, "-m", "hmoe.workers.worker", "--pack", name, "--router", backend, "--device",
              config.worker.device, *common)  # fmt: skip
    specs = [
        ChildSpec("router", (sys.executable, "-m", "hmoe.runtime.router", "--frontend", frontend, "--backend", backend,
                             "--pack", name, *common), config.router.drain_grace_s + 10),
        ChildSpec("prefill", (*worker, "--role", "prefill"), config.worker.drain_grace_s + 10),
        ChildSpec("decode", (*worker, "--role", "decode"), config.worker.drain_grace_s + 10),
    ]  # fmt: skip
    Path(config.runtime_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
    log_path = Path(config.runtime_dir) / f"serve-{frontend.rsplit(':', 1)[-1].strip('/')}.log"
    with open(log_path, "ab") as log_file:
        supervisor = Supervisor(specs, log_file, say=say)
        supervisor.start()
        say(f"starting {', '.join(f'{n} (pid {p})' for n, p in supervisor.pids().items())}; logs in {log_path}")
        code = supervisor.run(on_tick=_Readiness(frontend, name, supervisor, say))
    if code != 0:
        say(f"stopped with status {code}; the last lines of {log_path}:")
        click.echo("".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:]), err=True)
    sys.exit(code)


class _Readiness:
    """on_tick: ask the router until both workers registered, then say where we listen (once per readiness)."""

    def __init__(self, frontend: str, name: str, supervisor, say):
        self.frontend, self.name, self.supervisor, self.say = frontend, name, supervisor, say
        self.ready = False
        self.next_s = 0.0

    def __call__(self) -> None:
        from hmoe.runtime.client import RouterUnreachable, status_once  # noqa: PLC0415

        if time.monotonic() < self.next_s:
            return
        self.next_s = time.monotonic() + (0.5 if not self.ready else 2.0)
        try:
            roles = {w["role"] for w in status_once(self.frontend, 0.5)["workers"]}
        except RouterUnreachable:
            roles = set()
        ready = roles >= {"prefill", "decode"}
        if ready and not self.ready:
            click.echo(f"hmoe serving {self.name} at {self.frontend} — try: hmoe generate --endpoint {self.frontend} \"Hello\"")
        elif self.ready and not ready:
            self.say(f"not ready: workers registered: {sorted(roles) or 'none'}")
        self.ready = ready


@click.command("generate")
@click.argument("prompt", required=False)
@sampling_options(max_tokens=64)
@click.option("--stop", multiple=True, help="Stop string (repeatable); the text ends before it.")
@click.option("--timeout", type=float, default=None, help="Deadline in seconds; the request ends with reason timeout.")
@click.option("--endpoint", help="The router's client endpoint (default: [router] frontend).")
@click.option("--port", type=int, help="Shorthand for --endpoint tcp://127.0.0.1:PORT.")
@click.option("--server-key", help="The router's CURVE public key (file or Z85) for an encrypted endpoint.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end instead of streaming.")
@click.option("--wait", "wait_s", type=float, default=0.0, help="Wait up to this long for the service to be ready "
              "(e.g. right after starting hmoe serve).")  # fmt: skip
def generate_cmd(prompt, token_ids, max_tokens, temperature, top_p, top_k, seed, stop, timeout, endpoint, port,
                 server_key, config_path, as_json, wait_s) -> None:
    """Stream a completion of PROMPT from a running hmoe serve; Ctrl-C cancels it."""  # fmt: skip
    from hmoe.runtime.client import Client  # noqa: PLC0415

    if (prompt is None) == (token_ids is None):
        raise click.UsageError("give a PROMPT or --token-ids (not both)")
    ids = parse_token_ids(token_ids) if token_ids is not None else None
    endpoint = _endpoint(config_path, endpoint, port)
    if wait_s > 0:
        _wait_ready(endpoint, wait_s, server_key)
    with Client(endpoint, server_public_key=server_key, router_timeout_s=ROUTER_TIMEOUT_S) as client:
        stream = client.generate(prompt, token_ids=ids, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                 top_k=top_k, seed=seed, stop=stop, timeout=timeout, stream=not as_json)  # fmt: skip
        try:
            for chunk in stream:
                click.echo(chunk.text, nl=False)
        except KeyboardInterrupt:
            stream.close()
            click.echo("\n[cancelled]", err=True)
            sys.exit(130)
        result = stream.result
    if as_json:
        click.echo(json.dumps({"request_id": result.request_id, "text": result.text, "token_ids": list(result.token_ids),
                               "finish_reason": result.finish_reason, "usage": result.usage.__dict__}))  # fmt: skip
        return
    u = result.usage
    click.echo("")
    speed = f", {1 / u.tpot_s:.1f} tok/s" if u.tpot_s else ""
    ttft = f", first token {u.ttft_s * 1000:.0f} ms" if u.ttft_s is not None else ""
    click.echo(f"[{u.output_tokens} tokens, {result.finish_reason}{ttft}{speed}]", err=True)


def _wait_ready(endpoint: str, wait_s: float, server_key: str | None) -> None:
    """Until the router answers with a prefill and a decode worker registered (or wait_s passed)."""
    from hmoe.runtime.client import RouterUnreachable, status_once  # noqa: PLC0415
    from hmoe.runtime.errors import HmoeError  # noqa: PLC0415

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if {w["role"] for w in status_once(endpoint, 1.0, server_key)["workers"]} >= {"prefill", "decode"}:
                return
        except RouterUnreachable:
            pass
        time.sleep(0.5)
    raise HmoeError("not_ready", f"{endpoint} did not get a prefill and a decode worker within {wait_s:g} s: is hmoe serve running?")


@click.command("status")
@click.option("--json", "as_json", is_flag=True, help="The router's Status as one JSON object.")
@click.option("--endpoint", help="The router's client endpoint (default: [router] frontend).")
@click.option("--port", type=int, help="Shorthand for --endpoint tcp://127.0.0.1:PORT.")
@click.option("--server-key", help="The router's CURVE public key (file or Z85).")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds to wait for the router.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
def status_cmd(as_json, endpoint, port, server_key, timeout, config_path) -> None:
    """Show the router's workers, queue, KV use and throughput."""
    from hmoe.runtime.client import status_once  # noqa: PLC0415

    endpoint = _endpoint(config_path, endpoint, port)
    status = status_once(endpoint, timeout, server_key)
    if as_json:
        click.echo(json.dumps(status))
        return
    kv = status["kv"]
    used = f"{kv['used_tokens']}/{kv['capacity_tokens']} tokens" if kv.get("capacity_tokens") else "no decode worker"
    click.echo(f"router {endpoint}{'  (draining)' if status['draining'] else ''}")
    click.echo(f"  queued {status['queued']}, running {status['running']}, KV reserved {used}, "
               f"{status['throughput'].get('tokens_per_s', 0)} tokens/s (last minute)")  # fmt: skip
    if not status["workers"]:
        click.echo("  no workers registered")
    for w in status["workers"]:
        click.echo(f"  {w['role']:<8} {w['worker_id']}  pid {w['pid']}  {w['device']}  running {w['running']}, "
                   f"waiting {w['waiting']}, KV free {w['kv_free_tokens']}/{w['kv_capacity_tokens']}, seen {w['last_seen_s']} s ago")  # fmt: skip
