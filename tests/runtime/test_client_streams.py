"""The SDK's streams on their own, against a stand-in router socket that streams Deltas and records
Cancels: a stream is cancelled whenever its iteration stops (break included, sync and async), and
the asyncio client used outside an event loop says so once, clearly."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading

import pytest
import zmq
from helpers.net import free_port

from hmoe.runtime import AsyncClient, Client
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.protocol import Cancel, Delta, Generate, decode, encode


class StandInRouter:
    """A ROUTER socket: answers each Generate with `deltas` Deltas, then records the Cancels it gets."""

    def __init__(self, deltas: int = 50):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.deltas = deltas

    def serve_until_cancel(self, timeout_s: float = 30.0) -> str:
        """Stream the first request's Deltas; the request id that was cancelled (fails if none comes)."""
        while True:
            assert self.sock.poll(int(timeout_s * 1000)), "no message from the client"
            identity, frame = self.sock.recv_multipart()
            msg = decode(frame)
            if isinstance(msg, Generate):
                for n in range(self.deltas):
                    self.sock.send_multipart([identity, encode(Delta(msg.request_id, [n], f"t{n}"))])
            elif isinstance(msg, Cancel):
                return msg.request_id

    def close(self) -> None:
        self.sock.close()
        self.context.term()


@pytest.fixture
def router():
    stand_in = StandInRouter()
    yield stand_in
    stand_in.close()


def test_breaking_out_of_a_sync_stream_cancels_it(router):
    cancelled = []
    server = threading.Thread(target=lambda: cancelled.append(router.serve_until_cancel()))
    server.start()
    with Client(router.endpoint) as client:
        stream = client.generate("Hello", max_tokens=50)
        for chunk in stream:  # `stream` stays referenced: only the end of the loop can cancel
            assert chunk.text == "t0"
            break
        server.join()  # the Cancel arrives while the client is still open
        assert cancelled == [stream.request_id]


def test_breaking_out_of_an_async_stream_cancels_it(router):
    cancelled = []
    server = threading.Thread(target=lambda: cancelled.append(router.serve_until_cancel()))
    server.start()

    async def main():
        async with AsyncClient(router.endpoint) as client:
            stream = client.generate("Hello", max_tokens=50)
            async for _ in stream:
                break
            await asyncio.to_thread(server.join)  # the Cancel arrives while the client is still open
            assert cancelled == [stream.request_id]

    asyncio.run(main())


def test_the_async_client_outside_an_event_loop_is_one_clear_error():
    unraisable = []
    hook, sys.unraisablehook = sys.unraisablehook, unraisable.append
    try:
        with pytest.raises(HmoeError) as misuse:
            AsyncClient(f"tcp://127.0.0.1:{free_port()}").generate("Hello")
        gc.collect()
    finally:
        sys.unraisablehook = hook
    assert misuse.value.code == "no_event_loop" and "use the blocking Client" in str(misuse.value)
    assert unraisable == []  # and nothing more from a half-made stream's __del__
