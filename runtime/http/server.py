"""hmoe-http: the OpenAI-compatible HTTP API as a process (uvicorn on uvloop), a client of the router.

Startup: read the model's tokenizer.json, tokenizer_config.json, chat_template.jinja and config.json
([router] model_dir, else the weight pack's blobs), bind [http] host:port, serve, say READY=1
(systemd) once uvicorn listens. Main loop: uvicorn's, plus a watchdog ping. Shutdown (SIGTERM):
uvicorn stops accepting, lets running requests finish within [router] drain_grace_s, then exits 0.
Exit status 3: could not start (address in use, no pack, unreadable tokenizer); restarting cannot
fix it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from pathlib import Path

import click
import structlog
import uvicorn
import uvloop

from hmoe.runtime.client import AsyncClient
from hmoe.runtime.config import Config, config_options, load_config
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.http.app import Gateway, create_app
from hmoe.runtime.http.chat_template import ChatTemplate
from hmoe.runtime.log import configure_logging
from hmoe.runtime.sd_notify import SdNotify
from hmoe.runtime.tokenizer import load_tokenizer

log = structlog.get_logger("hmoe.http")

EXIT_OK, EXIT_FAILURE, EXIT_STARTUP = 0, 1, 3
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json")


def model_files(config: Config) -> tuple[str, dict[str, bytes | None]]:
    """(the model's name, {file: bytes or None}) from [router] model_dir, else from the weight pack."""
    if config.router.model_dir:
        folder = Path(config.router.model_dir)
        files = {n: (folder / n).read_bytes() if (folder / n).is_file() else None for n in MODEL_FILES}
        return folder.name, files
    if not config.worker.pack:
        raise HmoeError("startup_failed", "no model: set [router] model_dir or [worker] pack (--pack)")
    from hmoe.shm import Pack  # (only the manifest and these blobs are read)

    try:
        with Pack.attach(config.worker.pack, config.shm) as pack:
            return config.worker.pack, {n: pack.blob(n) for n in MODEL_FILES}
    except HmoeError as exc:
        raise HmoeError("startup_failed", f"weight pack {config.worker.pack!r}: {exc.message}") from None


def build_gateway(config: Config, router: str) -> Gateway:
    name, files = model_files(config)
    if files["tokenizer.json"] is None:
        raise HmoeError("startup_failed", f"{name}: no tokenizer.json; the HTTP API needs the model's tokenizer")
    template = ChatTemplate.from_files(files, config.http.chat_template)
    model_config = json.loads(files["config.json"] or b"{}")
    return Gateway(
        AsyncClient(router, router_timeout_s=30.0),
        load_tokenizer(files["tokenizer.json"]),
        template,
        config.http.served_model_name or name,
        int(model_config.get("max_position_embeddings") or 0),
        config.http.max_n,
        config.http.default_max_tokens,
    )


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise HmoeError("startup_failed", f"cannot listen on {host}:{port}: {exc.strerror}") from None


async def serve(config: Config, gateway: Gateway, sock: socket.socket, notify: SdNotify) -> int:
    # uvicorn takes SIGTERM/SIGINT while it serves (first: stop accepting and finish running requests,
    # second: close at once) and raises them again once it has stopped: land them here, not in a
    # default handler that would end a clean stop with -15.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(gateway),
            log_level="warning",
            access_log=False,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=int(config.router.drain_grace_s) or None,
            lifespan="off",
        )
    )
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.02)
    host, port = sock.getsockname()[:2]
    if server.started:
        log.info(
            "listening",
            url=f"http://{host}:{port}",
            model=gateway.model_name,
            router=gateway.client.endpoint,
            chat_template=gateway.template is not None,
            reasoning=gateway.reasoning,
        )
        notify.ready(f"OpenAI API on http://{host}:{port}/v1")
    else:  # uvicorn could not start: its error is in the log
        await gateway.client.close()
        return EXIT_STARTUP
    tick_s = min(1.0, notify.watchdog_s / 4) if notify.watchdog_s else 1.0  # well within half the watchdog
    stopping = False
    while not task.done():
        if server.should_exit and not stopping:  # the first signal: running requests finish
            stopping = True
            notify.stopping("finishing running requests")
            notify.extend_timeout(config.router.drain_grace_s + 10.0)
        notify.tick()
        await asyncio.wait([task], timeout=tick_s)
    await gateway.client.close()
    task.result()
    return EXIT_OK


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--router", "router", help="The router's client endpoint (default: [router] frontend).")
@click.option("--pack", help="[worker] pack: the weight pack whose tokenizer and chat template are used.")
@click.option("--model-dir", help="[router] model_dir: read the tokenizer and chat template from this folder.")
@config_options("http")
def main(config_path: str | None, router: str | None, pack: str | None, model_dir: str | None, **http_flags) -> None:
    """Serve the OpenAI-compatible HTTP API in front of a router."""
    try:
        config = load_config(
            config_path,
            overrides={"http": http_flags, "worker": {"pack": pack}, "router": {"model_dir": model_dir}},
        )
        configure_logging(config.router.log_level, process="http")
        if config.http.port == 0:
            raise HmoeError("startup_failed", "[http] port = 0 turns the HTTP API off; nothing to serve")
        gateway = build_gateway(config, router or config.router.frontend)
        sock = bind(config.http.host, config.http.port)
    except (HmoeError, OSError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_STARTUP)
    try:
        code = uvloop.run(serve(config, gateway, sock, SdNotify.from_env()))
    except Exception:
        log.exception("crashed")
        sys.exit(EXIT_FAILURE)
    sys.exit(code)


if __name__ == "__main__":
    main()
