"""hmoe-router: the process that owns requests. Sockets, signals and the clock; the policy is Scheduler's.

Shape (uvicorn's): startup (bind the client frontend and the worker backend, say READY) → main
loop (receive → apply → tick → send) → shutdown (flush replies, close). The first SIGTERM/SIGINT
or a Drain message drains: no new requests, running ones finish within drain_grace_s, then exit 0.
A second signal ends the rest at once. Exit status: 0 drained, 1 crashed, 2 usage, 3 could not
start (bad config, endpoint in use, unreadable tokenizer or key) — restarting cannot fix a 3.

Past 400 lines because the loop's guards live here with it: text prompts tokenized off the loop,
memory of large frames given back, the incarnation stamped on every answer.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import signal
import socket
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import structlog
import uvloop
import zmq
import zmq.asyncio

from hmoe.runtime.config import Config, config_options, load_config
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.log import configure_logging
from hmoe.runtime.protocol import (
    MAX_MESSAGE_BYTES,
    Cancel,
    Delta,
    Drain,
    Error,
    Finished,
    Generate,
    Ping,
    Pong,
    Prefilled,
    ProtocolError,
    Register,
    Registered,
    RequestError,
    Status,
    StatusRequest,
    Tokens,
    Usage,
    WorkerPing,
    WorkerPong,
    decode,
    encode,
)
from hmoe.runtime.scheduler import CLIENT, Scheduler
from hmoe.runtime.sd_notify import SdNotify
from hmoe.runtime.tokenizer import load_tokenizer

log = structlog.get_logger("hmoe.router")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_STARTUP = 0, 1, 2, 3
CLIENT_TYPES = (Generate, Cancel, Ping, StatusRequest, Drain)
WORKER_TYPES = (Register, WorkerPing, Prefilled, Tokens, RequestError, Error)
MAX_FRAME_BYTES = (
    4 * MAX_MESSAGE_BYTES
)  # up to this a too-large message gets an error reply; past it zmq drops the peer
RECV_BATCH = 256  # messages taken from one socket per turn, so neither socket starves the other
SEND_HWM = 100_000  # queued outgoing messages per peer before sends to it are dropped (a stalled client)
STAMPED = (Delta, Finished, Error, Pong, Status, WorkerPong, Registered)  # answers that carry the router's incarnation
LARGE_FRAME_BYTES = 64 << 10  # after frames this big, free memory goes back to the system (at most once a second)
MAX_TOKENIZING = 64  # text prompts waiting for the tokenizer thread before more are refused with queue_full


class Router:
    """Binds on `startup`, serves in `main_loop`, lets go in `shutdown`; `serve` runs all three."""

    def __init__(self, config: Config, tokenizer=None, notify: SdNotify | None = None):
        self.config = config
        self.scheduler = Scheduler(config.router, tokenizer)
        self.notify = notify or SdNotify()
        self.incarnation = uuid.uuid4().hex[:12]  # in every answer: clients and workers see a restart by it
        self.tick_s = config.router.heartbeat_interval_s / 4  # liveness is checked at least this often
        self.signals = 0
        self.context: zmq.asyncio.Context | None = None
        self.frontend: zmq.asyncio.Socket | None = None
        self.backend: zmq.asyncio.Socket | None = None
        # Text prompts are tokenized on this thread (encode_batch releases the GIL), never on the event loop:
        # a 1 MB prompt takes seconds, and heartbeats must be answered meanwhile.
        self.tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.tokenizing: dict[tuple[bytes, str], asyncio.Future] = {}  # (client, request id) -> its encoding
        self.large_frames = False  # since the last trim
        self.trimmed_s = 0.0

    async def serve(self) -> int:
        try:
            self.startup()
        except HmoeError as exc:
            log.error("startup_failed", code=exc.code, reason=exc.message)
            self.shutdown()
            return EXIT_STARTUP
        try:
            await self.main_loop()
        finally:
            self.shutdown()
        return EXIT_OK if self.signals < 2 else 128 + signal.SIGINT

    def startup(self) -> None:
        """Bind both sockets (HmoeError "startup_failed" if either cannot be), install signals, READY=1."""
        r = self.config.router
        self.context = zmq.asyncio.Context()
        self.frontend = self._socket(r.frontend, curve_secret_key=r.curve_secret_key)
        Path(self.config.runtime_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.backend = self._socket(self.config.backend)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        log.info(
            "listening",
            frontend=r.frontend,
            backend=self.config.backend,
            tokenizer=self.scheduler.tokenizer is not None,
            incarnation=self.incarnation,
        )
        self.notify.ready(f"listening on {r.frontend}; waiting for workers")

    async def main_loop(self) -> None:
        frontend, backend = self._sockets()
        poller = zmq.asyncio.Poller()
        poller.register(frontend, zmq.POLLIN)
        poller.register(backend, zmq.POLLIN)
        while not self.scheduler.stopped:
            ready = dict(await poller.poll(int(self.tick_s * 1000)))  # receive: block only when idle
            if backend in ready:
                self._receive(backend, self._on_worker_frames)
            if frontend in ready:
                self._receive(frontend, self._on_client_frames)
            self._step()
            self.notify.tick()
            if self.large_frames and time.monotonic() - self.trimmed_s > 1.0:
                self.large_frames, self.trimmed_s = False, time.monotonic()
                _release_free_memory()

    def _step(self) -> None:
        self.scheduler.tick(time.monotonic())  # liveness, deadlines, drain, then schedule
        self._send(self.scheduler.take_outbox())

    def shutdown(self) -> None:
        if self.frontend is not None and self.backend is not None:
            self._send(self.scheduler.take_outbox())
        for sock in (self.frontend, self.backend):
            if sock is not None:
                sock.close(linger=1000)  # let the last Finished messages go out
        if self.context is not None:
            self.context.term()
        self.tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        log.info("stopped", finished=dict(self.scheduler.finished))

    # -- sockets ---------------------------------------------------------------------------------

    def _sockets(self) -> tuple[zmq.asyncio.Socket, zmq.asyncio.Socket]:
        """(frontend, backend), bound by startup()."""
        assert self.frontend is not None and self.backend is not None, "startup() binds them first"
        return self.frontend, self.backend

    def _socket(self, endpoint: str, curve_secret_key: str = "") -> zmq.asyncio.Socket:
        if endpoint.startswith("ipc://") and _ipc_in_use(endpoint[len("ipc://") :]):
            raise HmoeError(
                "startup_failed", f"{endpoint} is in use by a running router: stop it or set another endpoint"
            )
        keys = _load_curve_keys(curve_secret_key) if curve_secret_key else None
        assert self.context is not None
        sock = self.context.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a peer reconnecting under its old identity takes it over
        if keys is not None:
            sock.curve_publickey, sock.curve_secretkey = keys
            sock.curve_server = True
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise HmoeError(
                "startup_failed", f"cannot bind {endpoint}: {exc.strerror}; is another router running there?"
            ) from None
        return sock

    def _receive(self, sock: zmq.asyncio.Socket, handle) -> None:
        for _ in range(RECV_BATCH):
            try:
                # zmq.asyncio returns a Future, done at once under NOBLOCK (its stub says Awaitable)
                frames = sock.recv_multipart(flags=zmq.NOBLOCK).result()  # type: ignore[attr-defined]
            except zmq.Again:
                return
            self.large_frames |= sum(len(f) for f in frames) > LARGE_FRAME_BYTES
            handle(frames, time.monotonic())

    def _on_client_frames(self, frames: list[bytes], now: float) -> None:
        msg = self._decode(frames, CLIENT_TYPES, self._sockets()[0])
        if msg is None:
            return
        client = frames[0]
        if isinstance(msg, Generate) and msg.prompt is not None and msg.token_ids is None:
            self._tokenize(client, msg)
            return
        if isinstance(msg, Ping) and msg.request_ids:  # prompts on the tokenizer thread are known too
            msg = dataclasses.replace(
                msg, request_ids=[r for r in msg.request_ids if (client, r) not in self.tokenizing]
            )
        if isinstance(msg, Cancel) and (client, msg.request_id) in self.tokenizing:
            self.tokenizing.pop((client, msg.request_id)).cancel()  # _tokenized answers it
            return
        self.scheduler.on_client(client, msg, now)
        if isinstance(msg, Drain):
            self._begin_drain(msg.grace_s)
            self.notify.send("X_HMOE_STOP=1")  # asked to stop, not to restart: `hmoe serve` stops the service

    # -- tokenizing off the loop -------------------------------------------------------------------

    def _tokenize(self, client: bytes, msg: Generate) -> None:
        """Cheap checks here; the encoding on the tokenizer thread; admission when it is done."""
        key = (client, msg.request_id)
        try:
            self.scheduler.check_prompt(msg)
            if key in self.tokenizing or msg.request_id in self.scheduler.requests:
                raise HmoeError("duplicate_request", f"request id {msg.request_id!r} is already running")
            if len(self.tokenizing) >= MAX_TOKENIZING:
                raise HmoeError("queue_full", f"{len(self.tokenizing)} prompts are being tokenized; retry later")
        except HmoeError as exc:
            self._send_one(self._sockets()[0], client, Error(exc.code, exc.message, msg.request_id))
            return
        tokenizer = self.scheduler.tokenizer
        future = asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, _encode, tokenizer, msg.prompt)
        self.tokenizing[key] = future
        future.add_done_callback(lambda done: self._tokenized(client, msg, done))

    def _tokenized(self, client: bytes, msg: Generate, future: asyncio.Future) -> None:
        self.tokenizing.pop((client, msg.request_id), None)
        self.large_frames |= len(msg.prompt or "") > LARGE_FRAME_BYTES  # the tokenizer's memory goes back too
        frontend = self._sockets()[0]
        if future.cancelled():
            self._send_one(frontend, client, Finished(msg.request_id, "cancelled", [], "", Usage(0, 0)))
            return
        if future.exception() is not None:
            reason = f"the tokenizer failed on this prompt: {future.exception()}"
            self._send_one(frontend, client, Error("invalid_prompt", reason, msg.request_id))
            return
        ids = future.result()
        self.scheduler.on_client(client, dataclasses.replace(msg, prompt=None, token_ids=ids), time.monotonic())
        self._step()  # admit and schedule now, not at the next tick

    def _on_worker_frames(self, frames: list[bytes], now: float) -> None:
        msg = self._decode(frames, WORKER_TYPES, self._sockets()[1])
        if msg is not None:
            self.scheduler.on_worker(frames[0], msg, now)
            if isinstance(msg, Register) and self.scheduler.tokenizer is None:
                self._late_tokenizer(msg)

    def _decode(self, frames: list[bytes], allowed: tuple[type, ...], sock: zmq.asyncio.Socket):
        """The message, or None after replying with an error (the peer is never dropped for it)."""
        try:
            if len(frames) != 2:
                raise ProtocolError("bad_message", f"expected one message frame, got {len(frames) - 1}")
            return decode(frames[1], allowed)
        except ProtocolError as exc:
            log.info("bad_frame", code=exc.code, reason=exc.message, peer=frames[0].hex())
            self._send_one(sock, frames[0], Error(exc.code, exc.message, exc.request_id))
            return None

    def _send(self, outbox: list) -> None:
        frontend, backend = self._sockets()
        for peer, identity, msg in outbox:
            self._send_one(frontend if peer == CLIENT else backend, identity, msg)

    def _send_one(self, sock: zmq.asyncio.Socket, identity: bytes, msg) -> None:
        if type(msg) in STAMPED:
            msg = dataclasses.replace(msg, incarnation=self.incarnation)
        try:
            sock.send_multipart([identity, encode(msg)], flags=zmq.NOBLOCK).result()  # type: ignore[attr-defined]
        except zmq.Again:  # the peer stopped reading; its heartbeat will say whether it is gone
            log.warning("send_dropped", peer=identity.hex(), message=type(msg).__name__)

    # -- drain and signals -----------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self.signals += 1
        if self.signals == 1:
            log.info("signal", signal=signal.Signals(signum).name, action="drain")
            self._begin_drain(self.config.router.drain_grace_s)
        else:
            log.warning("signal", signal=signal.Signals(signum).name, action="exit now")
            self.scheduler.drain(0.0, time.monotonic())

    def _begin_drain(self, grace_s: float) -> None:
        self.scheduler.drain(grace_s, time.monotonic())
        self.notify.stopping(f"draining: {len(self.scheduler.requests)} requests, up to {grace_s:.0f} s")
        self.notify.extend_timeout(grace_s + 10.0)

    def _late_tokenizer(self, msg: Register) -> None:
        """No tokenizer at start (its pack was not there yet): take it from the pack a worker attached."""
        name = self.config.worker.pack or msg.model.name  # workers name their model by its pack
        if name:
            try:
                self.scheduler.tokenizer = tokenizer_from_pack(name, self.config)
                log.info("tokenizer_loaded", pack=name)
            except HmoeError as exc:
                log.warning("tokenizer_unavailable", pack=name, code=exc.code, reason=exc.message)


def _release_free_memory() -> None:
    """glibc keeps freed memory of large frames and tokenizings in its arenas; give it back (bounded RSS)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _encode(tokenizer, text: str) -> list[int]:
    """On the tokenizer thread: encode_batch releases the GIL (encode holds it for the whole prompt)."""
    (encoding,) = tokenizer.encode_batch([text]) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(text)]
    return encoding.ids


def tokenizer_from_pack(name: str, config: Config):
    """tokenizer.json as kept in a weight pack (only the manifest and that blob are read)."""
    from hmoe.shm import Pack  # (the router reads the pack only to find its tokenizer)

    with Pack.attach(name, config.shm) as pack:
        blob = pack.blob("tokenizer.json")
    if blob is None:
        raise HmoeError(
            "tokenizer_missing", f"pack {name!r} holds no tokenizer.json; set [router] model_dir or send token ids"
        )
    return load_tokenizer(blob)


def startup_tokenizer(config: Config):
    """From [router] model_dir (must work), else from [worker] pack (may come later), else None."""
    if config.router.model_dir:
        return load_tokenizer(config.router.model_dir)
    if config.worker.pack:
        try:
            return tokenizer_from_pack(config.worker.pack, config)
        except HmoeError as exc:
            log.warning(
                "tokenizer_unavailable",
                pack=config.worker.pack,
                code=exc.code,
                reason=exc.message,
                hint="text prompts are refused until a worker registers with the pack loaded",
            )
    return None


def _ipc_in_use(path: str) -> bool:
    """True when something accepts connections on this unix socket (binding would steal it from a live router)."""
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def _load_curve_keys(path: str) -> tuple[bytes, bytes]:
    import zmq.auth  # (only when CURVE is configured)

    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise HmoeError("startup_failed", f"cannot read the CURVE secret key {path}: {exc}") from None
    if secret is None:
        raise HmoeError(
            "startup_failed", f"{path} holds a public key only; [router] curve_secret_key needs the .key_secret file"
        )
    return public, secret


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="TOML config file.")
@click.option("--pack", help="[worker] pack: the weight pack whose tokenizer.json the router uses.")
@config_options("router")
def main(config_path: str | None, pack: str | None, **router_flags) -> None:
    """Route requests between clients and the prefill and decode workers."""
    try:
        config = load_config(config_path, overrides={"router": router_flags, "worker": {"pack": pack}})
        configure_logging(config.router.log_level, process="router")
        router = Router(config, startup_tokenizer(config), SdNotify.from_env())
    except HmoeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_STARTUP)
    try:
        code = uvloop.run(router.serve())
    except Exception:
        log.exception("crashed")
        sys.exit(EXIT_FAILURE)
    sys.exit(code)


if __name__ == "__main__":
    main()
