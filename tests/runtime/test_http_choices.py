"""choices.merge: the pieces of n upstream requests interleaved as they come, and every way one can end
(finished, refused, router gone, a bug) ends the merged stream instead of hanging it. The upstream
streams are stand-ins for AsyncStream (the real ones run in tests/workers/cli/test_http_serve.py)."""

from __future__ import annotations

import asyncio

import pytest

from hmoe.runtime.client import Chunk, Result, RouterUnreachable, Usage, WorkerLost
from hmoe.runtime.http.choices import Choice, merge, start
from hmoe.runtime.http.metrics import Metrics


class Stream:
    """What Choice uses of an AsyncStream: __anext__ (chunks, then StopAsyncIteration or an error), aclose."""

    def __init__(self, items: list, end: BaseException | None = None):
        self.items, self.end, self.closed, self.result = list(items), end, False, None

    async def __anext__(self) -> Chunk:
        await asyncio.sleep(0)
        if self.items:
            return self.items.pop(0)
        if self.end is not None:
            raise self.end
        self.result = Result("r", "", (), "length", Usage(3, 2, 0.1, 0.1))
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.closed = True


class Client:
    def __init__(self, streams: list[Stream]):
        self.streams = streams

    def generate(self, token_ids, **kwargs) -> Stream:
        return self.streams.pop(0)


def choices(*streams: Stream) -> list[Choice]:
    client, metrics = Client(list(streams)), Metrics("m")
    return [Choice(client, i, [1, 2, 3], {}, 0.0, metrics) for i in range(len(streams))]


async def collect(started: list[Choice]) -> list:
    await start(started)
    return [
        (p.index, p.chunk.text if p.chunk else None, p.error.code if p.error else None) async for p in merge(started)
    ]


def test_pieces_of_every_choice_then_each_end():
    a = Stream([Chunk("a1", (1,)), Chunk("a2", (2,))])
    b = Stream([Chunk("b1", (3,))])
    got = asyncio.run(collect(choices(a, b)))
    assert [g for g in got if g[0] == 0] == [(0, "a1", None), (0, "a2", None), (0, None, None)]
    assert [g for g in got if g[0] == 1] == [(1, "b1", None), (1, None, None)]


@pytest.mark.parametrize(
    "end, code",
    [
        (WorkerLost("worker_lost", "died"), "worker_lost"),
        (RouterUnreachable("router_unreachable", "gone"), "router_unreachable"),
        (ValueError("a bug"), "internal_error"),
    ],
)
def test_a_failing_choice_ends_the_merge_with_its_error(end, code):
    started = choices(Stream([Chunk("x", (1,))], end), Stream([Chunk("y", (2,))] * 50))
    got = asyncio.run(collect(started))
    assert got[-1] == (0, None, code) and (0, "x", None) in got


def test_a_refusal_before_the_first_token_closes_every_choice():
    streams = [Stream([Chunk("ok", (1,))]), Stream([], WorkerLost("queue_full", "busy"))]
    with pytest.raises(WorkerLost):
        asyncio.run(start(choices(*streams)))
    assert all(s.closed for s in streams)
