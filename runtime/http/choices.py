"""Choice: one upstream request of an HTTP request (n choices = n requests), streamed from the router.

The router always streams to the gateway (even for a non-streaming HTTP request), so time to first
token, inter-token latency and a client's disconnect are seen the same way in both. `prime` waits
for the first piece, so a refusal (queue_full, no_worker, ...) still becomes an HTTP status before
any byte of a 200 is sent. `merge` interleaves the pieces of several choices as they come. Closing
a choice (its stream) cancels the request upstream: the router frees its KV at the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog

from hmoe.runtime.client import AsyncClient, AsyncStream, Chunk, Result
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.http.metrics import Metrics
from hmoe.runtime.http.schema import ApiError

log = structlog.get_logger("hmoe.http")
END = object()


@dataclass
class Piece:
    index: int
    chunk: Chunk | None = None  # None: the choice ended (its Result is on the Choice)
    error: HmoeError | None = None  # a failure (RouterError, RouterUnreachable): the stream's last piece


class Choice:
    def __init__(
        self, client: AsyncClient, index: int, token_ids: list[int], kwargs: dict, arrival_s: float, metrics: Metrics
    ):
        self.index = index
        self.prompt_len = len(token_ids)
        self.arrival_s = arrival_s
        self.metrics = metrics
        self.stream: AsyncStream = client.generate(token_ids=token_ids, **kwargs)
        self.result: Result | None = None
        self.buffered: list = []
        self.last_s: float | None = None

    async def prime(self) -> None:
        """Wait for the first piece (RouterError if the router refused the request)."""
        self.buffered.append(await self._next())

    async def _next(self):
        try:
            chunk = await self.stream.__anext__()
        except StopAsyncIteration:
            self.result = self.stream.result
            self._finished()
            return END
        except HmoeError as exc:  # refused or failed at the router (RouterError), or the router is gone
            self.result = getattr(exc, "result", None)
            self.metrics.error(exc.code)
            raise
        now = time.monotonic()
        if chunk.token_ids:
            if self.last_s is None:
                self.metrics.first_token(now - self.arrival_s)
            else:
                self.metrics.tokens(now - self.last_s, len(chunk.token_ids))
            self.last_s = now
        return chunk

    def _finished(self) -> None:
        if self.result is not None and self.result.finish_reason in ("stop", "length"):
            self.metrics.finished(self.result.finish_reason, self.result.usage, time.monotonic() - self.arrival_s)
        elif self.result is not None:
            self.metrics.error(self.result.finish_reason)

    async def chunks(self) -> AsyncIterator[Chunk]:
        while True:
            item = self.buffered.pop(0) if self.buffered else await self._next()
            if item is END:
                return
            yield item

    async def collect(self) -> tuple[list[Chunk], Result]:
        return [c async for c in self.chunks()], self.result

    async def close(self) -> None:
        await self.stream.aclose()


async def start(choices: list[Choice]) -> None:
    """Prime every choice; on a refusal (RouterError) or no router (RouterUnreachable), close them all and
    raise it."""
    try:
        await asyncio.gather(*(c.prime() for c in choices))
    except BaseException:
        await close_all(choices)
        raise


async def close_all(choices: list[Choice]) -> None:
    for choice in choices:
        await choice.close()


async def merge(choices: list[Choice]) -> AsyncIterator[Piece]:
    """Pieces of every choice as they arrive; a choice's end is a Piece without chunk. A failure is
    yielded as a Piece with error and ends the merge (the others are cancelled by the caller)."""
    queue: asyncio.Queue[Piece] = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        try:
            async for chunk in choice.chunks():
                queue.put_nowait(Piece(choice.index, chunk))
            queue.put_nowait(Piece(choice.index))
        except HmoeError as exc:
            queue.put_nowait(Piece(choice.index, error=exc))
        except Exception as exc:  # a bug here must end the stream with an error event, not hang it
            log.exception("choice_failed", index=choice.index)
            queue.put_nowait(Piece(choice.index, error=HmoeError("internal_error", f"{type(exc).__name__}: {exc}")))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        for _ in range(len(choices)):
            while True:
                piece = await queue.get()
                yield piece
                if piece.error is not None:
                    return
                if piece.chunk is None:
                    break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request, awaitable, poll_s: float = 0.25):
    """Await `awaitable` unless the HTTP client goes away first: then cancel it (its streams close,
    so the requests are cancelled upstream) and raise ApiError 499 (nobody reads it)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            await asyncio.wait([task], timeout=poll_s)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ApiError(499, "cancelled", "the client closed the connection")
        return task.result()
    finally:
        if not task.done():
            task.cancel()
