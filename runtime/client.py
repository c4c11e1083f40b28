"""Client SDK: `Client` (blocking) and `AsyncClient` (asyncio) for an hmoe router. No torch, no numba.

    with Client("tcp://127.0.0.1:5555") as client:
        for chunk in client.generate("Hello", max_tokens=32):   # streams; leaving the loop early cancels upstream
            print(chunk.text, end="", flush=True)
        result = client.complete("Hello", max_tokens=32)        # one answer: text, token_ids, usage

The client makes each request id. While requests are in flight it pings the router every
heartbeat_interval_s (the router cancels the requests of a client silent past client_timeout_s) and
gives up with RouterUnreachable after router_timeout_s without a word from it. Each ping names the
requests in flight; a router that answers from another incarnation (it restarted) and does not
know some of them fails those with RouterRestarted ("router_restarted") within one heartbeat; a
dropped connection to the router fails every request in flight with it at once (the router sends
a disconnected client nothing, so no stream could go on whole). Refusals and failures
raise typed HmoeError subclasses that carry the router's stable code. `Client` runs an
AsyncClient on its own event-loop thread, started on first use.

Past 400 lines on purpose: the blocking Client and Stream mirror AsyncClient and AsyncStream one to
one, and the result and error types are theirs; one module keeps the whole SDK in one place.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio

from hmoe.runtime.codec import TokenIds
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.protocol import (
    Cancel,
    Delta,
    Drain,
    Error,
    Finished,
    Generate,
    Ping,
    Pong,
    ProtocolError,
    Status,
    StatusRequest,
    Usage,
    decode,
    encode,
)
from hmoe.runtime.sampling_params import SamplingParams

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
REPLY_TYPES = (Delta, Finished, Error, Pong, Status)


@dataclass(frozen=True)
class Chunk:
    """Newly generated tokens and the text they complete (may be "" while a character is incomplete)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple | None = None  # when asked: per token, [logprob, [[id, logprob], ...]] (None: not sent)


@dataclass(frozen=True)
class Result:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # stop | length | cancelled | timeout | error
    usage: Usage  # prompt_tokens, output_tokens, ttft_s, tpot_s, queue_s (arrival -> sent to prefill), cached_tokens
    logprobs: tuple | None = None  # when asked: per generated token, as in Chunk


class RouterError(HmoeError):
    """The router refused or failed a request; `code` is its stable error code."""


class RequestRefused(RouterError):
    """Refused on arrival (nothing ran): bad parameters, limits, no worker, queue full, draining."""


class QueueFull(RequestRefused):
    """Too many requests are waiting: retry later."""


class RequestFailed(RouterError):
    """Failed while running; `result` holds what was generated before."""

    result: Result | None = None


class WorkerLost(RequestFailed):
    """The worker running the request died; a retry runs on its replacement."""


class RouterUnreachable(HmoeError):
    """No word from the router within router_timeout_s."""


class RouterRestarted(RequestFailed):
    """The router restarted while the request ran and the new one does not know it; a retry runs there."""

    retryable = True


def router_error(code: str, message: str, result: Result | None = None) -> RouterError:
    """The typed exception for a router error code."""
    if result is None:
        return (QueueFull if code == "queue_full" else RequestRefused)(code, message)
    exc = (WorkerLost if code == "worker_lost" else RequestFailed)(code, message)
    exc.result = result
    return exc


def _result(msg: Finished) -> Result:
    return Result(
        msg.request_id,
        msg.text,
        tuple(msg.token_ids),
        msg.finish_reason,
        msg.usage,
        tuple(msg.logprobs) if msg.logprobs is not None else None,
    )


def _curve_key(key: str | bytes) -> bytes:
    """A Z85 public key, or the path of a zmq.auth certificate file holding it."""
    if isinstance(key, str) and Path(key).is_file():
        import zmq.auth  # (only for CURVE)

        return zmq.auth.load_certificate(key)[0]
    return key.encode() if isinstance(key, str) else key


class AsyncStream:
    """One streaming request: async-iterate Chunks; `result` is set at the end. Closing it cancels upstream."""

    def __init__(self, client: AsyncClient, request_id: str):
        self.client = client
        self.request_id = request_id
        self.result: Result | None = None
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False
        self.loop = asyncio.get_running_loop()

    def __del__(self) -> None:  # dropped unfinished, never iterated: cancel upstream
        loop = getattr(self, "loop", None)
        if loop is not None and not self.done and not loop.is_closed():
            loop.call_soon_threadsafe(self.client._cancel, self.request_id)

    def __aiter__(self):
        """The Chunks; when the iteration stops early (break, an exception, the iterator dropped) the
        request is cancelled upstream: the generator's `finally` runs as soon as it is closed."""
        return self._chunks()

    async def _chunks(self):
        try:
            while True:
                try:
                    chunk = await self.__anext__()
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            await self.aclose()

    async def __anext__(self) -> Chunk:
        if self.done:
            raise StopAsyncIteration
        try:
            msg = await self.queue.get()
        except BaseException:  # cancelled (Ctrl-C, a timeout around us): stop the request upstream
            await self.aclose()
            raise
        match msg:
            case Delta():
                return Chunk(msg.text, tuple(msg.token_ids), tuple(msg.logprobs) if msg.logprobs is not None else None)
            case Finished():
                self._end()
                self.result = _result(msg)
                if msg.finish_reason == "error":
                    code, message = (msg.error.code, msg.error.message) if msg.error else ("error", "request failed")
                    raise router_error(code, message, self.result)
                raise StopAsyncIteration
            case Error():
                self._end()
                raise router_error(msg.code, msg.message)
            case BaseException():
                self._end()
                raise msg
        raise AssertionError(f"unexpected {msg!r}")

    async def final(self) -> Result:
        """Consume the rest of the stream; the Result."""
        async for _ in self:
            pass
        assert self.result is not None  # a stream ends with its Finished, or raises
        return self.result

    async def aclose(self) -> None:
        """Stop early: the router cancels the request everywhere (no-op once it has ended)."""
        if not self.done:
            self._end()
            self.client._cancel(self.request_id)

    def _end(self) -> None:
        self.done = True
        self.client._pending.pop(self.request_id, None)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


class AsyncClient:
    """An asyncio client of one router. Sockets open on first use (inside a running loop)."""

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        *,
        server_public_key: str | bytes | None = None,
        heartbeat_interval_s: float = 1.0,
        router_timeout_s: float = 10.0,
    ):
        assert 0.05 <= heartbeat_interval_s < router_timeout_s, (heartbeat_interval_s, router_timeout_s)
        self.endpoint = endpoint
        self.server_public_key = server_public_key
        self.heartbeat_interval_s = heartbeat_interval_s  # sane: 0.1-2 s, well under the router's client_timeout_s
        self.router_timeout_s = router_timeout_s
        self._ids = (f"{uuid.uuid4().hex[:16]}-{n}" for n in itertools.count())
        self._pending: dict[str, AsyncStream] = {}
        self._status_waiters: list[asyncio.Future] = []
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._last_heard_s = 0.0
        self._monitor: zmq.asyncio.Socket | None = None
        self.incarnation = ""  # the router process last heard from

    # -- requests --------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | None = None,
        *,
        token_ids: list[int] | None = None,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | tuple[str, ...] = (),
        stop_token_ids: list[int] | tuple[int, ...] = (),
        ignore_eos: bool = False,
        logprobs: int | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        stream: bool = True,
    ) -> AsyncStream:
        """Start a request: `async for chunk in client.generate(...)`; stream=False sends only the end."""
        _require_loop("AsyncClient.generate")
        try:  # refused here, with the code the router would give
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                stop_token_ids=tuple(stop_token_ids),
                stop=tuple(stop),
                ignore_eos=ignore_eos,
                logprobs=logprobs,  # each token's logprob and the `logprobs` most likely alternatives
            )
            ids = TokenIds(token_ids) if token_ids is not None else None
        except HmoeError as exc:
            raise RequestRefused(exc.code, exc.message) from None
        except (OverflowError, TypeError):
            raise RequestRefused("invalid_prompt", "token_ids must be integers in [0, 2**32)") from None
        msg = Generate(request_id or next(self._ids), prompt, ids, params, stream, timeout)
        self._open()
        if msg.request_id in self._pending:
            raise HmoeError("duplicate_request", f"request id {msg.request_id!r} is already in flight from this client")
        if not self._pending:
            self._last_heard_s = time.monotonic()  # silence is counted from when we start waiting
        self._pending[msg.request_id] = result = AsyncStream(self, msg.request_id)
        self._send(msg)
        return result

    async def complete(self, prompt: str | None = None, **kwargs) -> Result:
        """Run a request to its end and return the whole answer (nothing streamed on the wire)."""
        async with self.generate(prompt, **kwargs, stream=False) as stream:
            return await stream.final()

    async def status(self) -> dict:
        """The router's Status as a dict: workers, queued, running, kv, throughput, draining."""
        return await self._ask(StatusRequest())

    async def drain(self, grace_s: float) -> dict:
        """Tell the router to stop admitting and finish within grace_s (then it exits); its Status."""
        return await self._ask(Drain(grace_s))

    async def _ask(self, msg) -> dict:
        self._open()
        waiter = asyncio.get_running_loop().create_future()
        self._status_waiters.append(waiter)
        self._send(msg)
        try:
            status = await asyncio.wait_for(waiter, self.router_timeout_s)
        except TimeoutError:
            raise RouterUnreachable(
                "router_unreachable",
                f"no answer from {self.endpoint} in {self.router_timeout_s} s: is the router running (hmoe serve)?",
            ) from None
        finally:
            if waiter in self._status_waiters:
                self._status_waiters.remove(waiter)
        return _fields(status)

    # -- socket ----------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._socket is not None:
            return
        _require_loop("AsyncClient")
        self._context = zmq.asyncio.Context()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.server_public_key is not None:
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = _curve_key(self.server_public_key)
        sock.connect(self.endpoint)
        self._socket = sock
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._tasks = [asyncio.ensure_future(f()) for f in (self._read, self._heartbeat, self._watch_connection)]

    def _send(self, msg) -> None:
        assert self._socket is not None, "_open() first"
        try:  # zmq.asyncio returns a Future, done at once under NOBLOCK (its stub says Awaitable)
            self._socket.send(encode(msg), flags=zmq.NOBLOCK).result()  # type: ignore[attr-defined]
        except zmq.Again:  # thousands of messages queued for a router that takes none
            raise RouterUnreachable(
                "router_unreachable", f"{self.endpoint} takes no messages: is the router running?"
            ) from None

    def _cancel(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        if self._socket is not None:
            self._send(Cancel(request_id))

    async def _read(self) -> None:
        sock = self._socket
        assert sock is not None, "_open() first"
        while True:
            frame = await sock.recv()
            self._last_heard_s = time.monotonic()
            try:
                msg = decode(frame, REPLY_TYPES)
            except ProtocolError:
                continue  # a newer router speaking a message we do not know; nothing to route it to
            self.incarnation = msg.incarnation or self.incarnation
            if isinstance(msg, Pong):
                self._lost(msg.unknown)
            if isinstance(msg, Status):
                waiter = self._status_waiters.pop(0) if self._status_waiters else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
            elif isinstance(msg, (Delta, Finished, Error)) and msg.request_id in self._pending:
                self._pending[msg.request_id].queue.put_nowait(msg)

    def _lost(self, request_ids: list[str], why: str = "") -> None:
        """The router does not hold these requests (it restarted since they were sent): fail them, retryable.
        Replies reach us in the order they were sent, so a request that ended before the Pong is gone already."""
        why = (
            why or f"the router at {self.endpoint} restarted (now {self.incarnation or 'unknown'}) and does not know it"
        )
        for request_id in request_ids:
            stream = self._pending.pop(request_id, None)
            if stream is not None:
                stream.queue.put_nowait(RouterRestarted("router_restarted", f"request {request_id}: {why}; retry it"))

    async def _watch_connection(self) -> None:
        """A dropped connection loses what the router sends meanwhile: fail every request in flight at once."""
        from zmq.utils.monitor import parse_monitor_message

        monitor = self._monitor
        assert monitor is not None, "_watch_connection runs only after connect() set up the monitor"
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_DISCONNECTED and self._pending:
                self._lost(list(self._pending), f"the connection to {self.endpoint} dropped (the router exited?)")

    async def _heartbeat(self) -> None:
        """Ping while requests are in flight; fail them if the router has been silent too long."""
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            if not self._pending:
                continue
            silent_s = time.monotonic() - self._last_heard_s
            if silent_s > self.router_timeout_s:
                error = RouterUnreachable(
                    "router_unreachable",
                    f"no word from {self.endpoint} for {silent_s:.1f} s: the router stopped or is unreachable",
                )
                for stream in list(self._pending.values()):
                    stream.queue.put_nowait(error)
                continue
            try:
                self._send(Ping(time.monotonic(), list(self._pending)))
            except RouterUnreachable:
                pass  # the silence check above ends the requests

    async def close(self) -> None:
        """Cancel what is in flight, close the socket."""
        for stream in list(self._pending.values()):
            await stream.aclose()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._socket is not None and self._context is not None:
            self._socket.disable_monitor()
            if self._monitor is not None:
                self._monitor.close(linger=0)
            self._socket.close(linger=500)  # let the Cancels go out
            self._context.term()
            self._socket = self._context = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def _require_loop(what: str) -> None:
    """A clear error where the asyncio client is used from plain (non-async) code."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise HmoeError(
            "no_event_loop",
            f"{what} needs a running event loop: call it from async code (asyncio.run), or use the blocking Client",
        ) from None


def _fields(msg: Status) -> dict:
    return dataclasses.asdict(msg)


def status_once(
    endpoint: str = DEFAULT_ENDPOINT, timeout_s: float = 1.0, server_public_key: str | bytes | None = None
) -> dict:
    """One Status from the router, blocking, with no thread and no event loop (health checks, readiness)."""
    context: zmq.Context[zmq.Socket] = zmq.Context.instance()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    # A DEALER's send blocks while it has no peer: after a failed handshake (a CURVE router asked
    # without its key) it has none, and a send with no timeout hung there for good.
    sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
    if server_public_key is not None:
        sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
        sock.curve_serverkey = _curve_key(server_public_key)
    unreachable = RouterUnreachable(
        "router_unreachable", f"no answer from {endpoint} in {timeout_s} s: is the router running?"
    )
    try:
        sock.connect(endpoint)
        deadline = time.monotonic() + timeout_s
        try:
            sock.send(encode(StatusRequest()))
        except zmq.Again:
            raise unreachable from None
        while (left_ms := int((deadline - time.monotonic()) * 1000)) > 0 and sock.poll(left_ms):
            msg = decode(sock.recv(), REPLY_TYPES)
            if isinstance(msg, Status):
                return _fields(msg)
        raise unreachable
    finally:
        sock.close()


class Stream:
    """The blocking form of AsyncStream: iterate Chunks; `result` at the end; close() cancels."""

    def __init__(self, client: Client, stream: AsyncStream):
        self._client = client
        self._stream = stream
        self.request_id = stream.request_id

    @property
    def result(self) -> Result | None:
        return self._stream.result

    def __iter__(self):
        """The Chunks; when the iteration stops early (break, an exception) the request is cancelled upstream."""
        return self._chunks()

    def _chunks(self):
        try:
            while True:
                try:
                    chunk = self.__next__()
                except StopIteration:
                    return
                yield chunk
        finally:
            self.close()

    def __next__(self) -> Chunk:
        try:
            return self._client._call(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None
        except BaseException:  # Ctrl-C or an error: make sure the router lets go of it
            self.close()
            raise

    def final(self) -> Result:
        for _ in self:
            pass
        assert self.result is not None  # a stream ends with its Finished, or raises
        return self.result

    def close(self) -> None:
        if not self._stream.done and self._client._loop is not None:
            self._client._loop.call_soon_threadsafe(asyncio.ensure_future, self._stream.aclose())

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


class Client:
    """A blocking client: an AsyncClient on a private event-loop thread (started on first use)."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, **options):
        self._async = AsyncClient(endpoint, **options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _call(self, coro):
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="hmoe-client", daemon=True)
            self._thread.start()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def generate(self, prompt: str | None = None, **kwargs) -> Stream:
        """Start a request and stream it: `for chunk in client.generate(...)`. Arguments as AsyncClient.generate."""

        async def start():
            return self._async.generate(prompt, **kwargs)

        return Stream(self, self._call(start()))

    def complete(self, prompt: str | None = None, **kwargs) -> Result:
        return self._call(self._async.complete(prompt, **kwargs))

    def status(self) -> dict:
        return self._call(self._async.status())

    def drain(self, grace_s: float) -> dict:
        return self._call(self._async.drain(grace_s))

    def close(self) -> None:
        if self._loop is not None:
            self._call(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join()
            self._loop.close()
            self._loop = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
