"""Chaos at the edges: hypothesis fuzz of every socket's decoder, of the router's policy behind it, and of a
live router's frontend and backend. Nothing a peer sends may raise anything but a coded ProtocolError, and
the router answers every client frame and keeps serving."""

from __future__ import annotations

import dataclasses
import types
import typing

import msgpack
import pytest
import zmq
from helpers.net import ByteTokenizer, start_router
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hmoe.runtime import protocol
from hmoe.runtime.config import RouterConfig
from hmoe.runtime.protocol import VERSION, Error, Ping, ProtocolError, Status, StatusRequest, decode, encode
from hmoe.runtime.router import CLIENT_TYPES, WORKER_TYPES
from hmoe.runtime.scheduler import Scheduler

TAGS = sorted(t.TAG for t in protocol._TYPES.values())
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=20), st.binary(max_size=8)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=6,
)
PARAMS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "best_of"]
ids = st.from_regex(r"[A-Za-z0-9._:\-]{1,12}", fullmatch=True)
TYPED = {
    str: ids | st.text(max_size=30),
    int: st.integers(-5, 300) | st.integers(-(2**63), 2**64 - 1),
    float: st.floats(-10, 1e9) | st.floats(),
    bool: st.booleans(),
    dict: st.dictionaries(st.sampled_from(PARAMS), values, max_size=5),
}


def typed(hint) -> st.SearchStrategy:
    """Mostly well-typed values for a field of this type hint, sometimes anything."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*(typed(a) for a in args if a is not type(None)), st.none())
    if origin is list:
        item = (
            typed(args[0])
            if args and args[0] is not list
            else st.tuples(ids, TYPED[int], st.sampled_from([None, "stop", "length", "x"])).map(list)
        )
        return st.lists(item, max_size=6)
    return st.one_of(*[TYPED[hint]] * 9, values) if hint in TYPED else values


def body(cls) -> st.SearchStrategy:
    """A message map of type `cls`: its required fields, some optional ones, a wrong value now and then."""
    hints = typing.get_type_hints(cls)
    fields = cls.__dataclass_fields__.values()
    required = {f.name: typed(hints[f.name]) for f in fields if f.default is f.default_factory is dataclasses.MISSING}
    optional = {f.name: typed(hints[f.name]) for f in fields if f.name not in required}
    header = {"v": st.sampled_from([VERSION] * 8 + [0]), "t": st.just(cls.TAG)}
    return st.fixed_dictionaries(header | required, optional=optional)


bodies = st.one_of(
    *(body(cls) for cls in protocol._TYPES.values()), st.dictionaries(st.text(max_size=6), values, max_size=4)
)
frames = st.one_of(st.binary(max_size=64), bodies.map(lambda b: msgpack.packb(b, use_bin_type=True)))
# What each socket's reader accepts: router frontend, router backend, worker main thread, client.
ALLOWED = [
    CLIENT_TYPES,
    WORKER_TYPES,
    (protocol.Prefill, protocol.Adopt, protocol.Cancel, protocol.WorkerPong, protocol.Drain),
    (protocol.Delta, protocol.Finished, Error, protocol.Pong, Status),
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=frames, allowed=st.sampled_from(ALLOWED))
def test_every_decoder_returns_a_message_or_a_coded_protocol_error(frame, allowed):
    try:
        msg = decode(frame, allowed)
    except ProtocolError as exc:
        assert exc.code in (
            "bad_message",
            "unknown_message",
            "message_too_large",
            "version_mismatch",
            "version_too_old",
            "invalid_sampling",  # SamplingParams is strict: an unknown or out-of-range sampling field
        )
        return
    assert isinstance(msg, allowed)
    # What decodes, re-encodes the same: compared as bytes, where a NaN (a Ping's sent_s, say) equals itself.
    assert encode(decode(encode(msg), allowed)) == encode(msg)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames_in=st.lists(frames, min_size=1, max_size=8))
def test_the_router_policy_takes_any_decodable_message_without_raising(frames_in):
    s = Scheduler(RouterConfig(), ByteTokenizer())
    model = protocol.ModelInfo("m", 300, [256], 4096)
    s.on_worker(b"P", protocol.Register("p", "prefill", 1, "cpu", model, 1000, 4), 0.0)
    s.on_worker(b"D", protocol.Register("d", "decode", 2, "cpu", model, 1000, 4), 0.0)
    for i, frame in enumerate(frames_in):
        for allowed, feed in ((CLIENT_TYPES, s.on_client), (WORKER_TYPES, s.on_worker)):
            try:
                msg = decode(frame, allowed)
            except ProtocolError:
                continue
            feed(b"P" if feed == s.on_worker and i % 2 else b"peer", msg, float(i))
        s.tick(float(i))
    s.take_outbox()


@pytest.fixture(scope="module")
def live_router(tmp_path_factory):
    router = start_router(tmp_path_factory.mktemp("fuzz"))
    context = zmq.Context.instance()
    client, worker = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
    for sock, endpoint in ((client, router.frontend), (worker, router.backend)):
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
    yield router, client, worker
    client.close()
    worker.close()
    assert router.stop() == 0 and "crashed" not in router.log()


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(frame=frames, to_backend=st.booleans())
def test_a_live_router_answers_every_client_frame_and_survives_any_worker_frame(live_router, frame, to_backend):
    router, client, worker = live_router
    try:
        assume(not isinstance(decode(frame, CLIENT_TYPES), protocol.Drain))  # a valid Drain stops it, as it should
    except ProtocolError:
        pass
    (worker if to_backend else client).send(frame)
    client.send(encode(Ping(1.5)))  # then a ping: everything before it was answered (or needs no answer)
    while not isinstance(reply := decode(client.recv()), protocol.Pong):
        assert isinstance(reply, (Error, Status, protocol.Finished, protocol.Delta)), reply
    assert router.proc.poll() is None
    client.send(encode(StatusRequest()))
    while not isinstance(decode(client.recv()), Status):
        pass
