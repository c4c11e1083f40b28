"""The wire protocol on its own: every message type round-trips, decode refuses what it must with a
code, the evolution rule (unknown fields ignored, defaults filled, versions), and a fuzz of decode."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hmoe.runtime import codec
from hmoe.runtime import protocol as p
from hmoe.runtime.error_codes import ERROR_CODES
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import SamplingParams

PARAMS = SamplingParams(
    max_tokens=7,
    temperature=0.5,
    top_p=0.9,
    top_k=3,
    seed=2**62,
    stop_token_ids=(1, 2),
    stop=("\n\n", "é"),
    ignore_eos=True,
)
MODEL = p.ModelInfo("tiny", 257, [256, 0], 4096)
WORKER = p.WorkerStatus(
    worker_id="decode-h-1-1",
    role="decode",
    pid=4242,
    device="cuda:0",
    model="tiny",
    max_batch=8,
    kv_capacity_tokens=4096,
    kv_reserved_tokens=512,
    kv_free_tokens=3000,
    running=2,
    waiting=1,
    requests=3,
    busy=None,
    draining=True,
    last_seen_s=0.25,
    uptime_s=12.5,
    steps=17,
    step_s=0.5,
)
# One example of every message type, every field away from its default.
EXAMPLES = {
    p.Generate: p.Generate("req-1", None, [0, 5, 2**32 - 1], PARAMS, False, 2.5),
    p.Cancel: p.Cancel("req.1:a-b_c"),
    p.Ping: p.Ping(12.75),
    p.Pong: p.Pong(12.75),
    p.StatusRequest: p.StatusRequest(),
    p.Status: p.Status(
        [WORKER, dataclasses.replace(WORKER, role="prefill", busy="req-9", draining=False)],
        2,
        5,
        p.KVStatus(8192, 1024, 7000),
        p.Throughput(31.5, 60.0, {"stop": 3, "length": 1}),
        True,
    ),
    p.Delta: p.Delta("req-1", [104, 105], "hi ✓", [[-0.5, [[104, -0.5], [7, -1.5]]], None]),
    p.Finished: p.Finished(
        "req-1",
        "error",
        [1, 2, 3],
        "abc",
        p.Usage(5, 3, 0.125, 0.5, 0.0625),
        p.Failure("worker_lost", "gone; retry"),
        [[-0.5, [[1, -0.5]]], None, [-0.25, []]],
    ),
    p.Error: p.Error("queue_full", "retry later", "req-1"),
    p.Register: p.Register("prefill-h-1-1", "prefill", 77, "cuda:0", MODEL, 65536, 1, 2, 5),
    p.Registered: p.Registered("prefill-h-1-1", 2),
    p.WorkerPing: p.WorkerPing("decode-h-1-1", 1024, 3, 2, 17, 0.5),
    p.WorkerPong: p.WorkerPong(),
    p.Prefill: p.Prefill("req-1", list(range(300)), PARAMS),
    p.Prefilled: p.Prefilled("req-1", 42, -1, "hmoe-kv-handoff.prefill-1", 300, "length", [-0.1, [[42, -0.1]]], 11),
    p.Adopt: p.Adopt("req-1", 300, 42, 3, "hmoe-kv-handoff.prefill-1", PARAMS, 11),
    p.Tokens: p.Tokens(
        [p.TokenItem("a", 1), p.TokenItem("b", 2, "stop"), p.TokenItem("c", 3, "length")],
        [[-1.0, [[1, -1.0], [5, -2.0]]], None, [-0.5, []]],
    ),
    p.RequestError: p.RequestError("req-1", "kv_capacity", "needs 4 GiB, has 3"),
    p.Drain: p.Drain(30.0),
}


def frame(**body) -> bytes:
    return msgpack.packb({"v": p.VERSION, **body})


def refused(data: bytes, allowed=None) -> p.ProtocolError:
    with pytest.raises(p.ProtocolError) as info:
        p.decode(data, allowed)
    assert info.value.code in ERROR_CODES and info.value.message
    return info.value


def test_every_message_type_round_trips():
    assert set(EXAMPLES) == set(p._TYPES.values()), "a message type has no example here"
    for cls, msg in EXAMPLES.items():
        back = p.decode(p.encode(msg), (cls,))
        assert type(back) is cls and back == msg, cls.TAG
        assert p.encode(back) == p.encode(msg)


def test_token_ids_travel_packed_and_decode_without_a_python_int_each():
    body = msgpack.unpackb(p.encode(EXAMPLES[p.Prefill]))
    assert body["token_ids"] == b"".join(i.to_bytes(4, "little") for i in range(300))
    msg = p.decode(p.encode(EXAMPLES[p.Prefill]))
    assert isinstance(msg.token_ids, codec.TokenIds) and msg.token_ids == list(range(300)) == msg.token_ids
    assert msg.token_ids != list(range(299)) and msg.token_ids == tuple(range(300))
    hand_written = p.decode(frame(t="prefill", request_id="r", token_ids=[3, 4], params={}))  # a plain array works too
    assert hand_written.token_ids == [3, 4] and isinstance(hand_written.token_ids, codec.TokenIds)
    for bad in ([-1], [2**32], [1.0], [True], "1,2", b"\x01\x00\x00"):
        assert refused(frame(t="prefill", request_id="r", token_ids=bad, params={})).code == "bad_message"
    with pytest.raises(p.ProtocolError):
        p.encode(p.Delta("r", [-1], ""))


def test_type_hints_are_resolved_once_per_class(monkeypatch):
    calls = []
    resolve = codec.typing.get_type_hints
    monkeypatch.setattr(codec, "_DECODERS", {})
    monkeypatch.setattr(codec.typing, "get_type_hints", lambda cls, **kw: calls.append(cls) or resolve(cls, **kw))
    data = p.encode(EXAMPLES[p.Tokens])
    for _ in range(50):
        p.decode(data)
    assert sorted(c.__name__ for c in calls) == ["TokenItem", "Tokens"]


@pytest.mark.parametrize(
    "body, code",
    [
        ({"t": "drain", "grace_s": -1.0}, "bad_message"),
        ({"t": "drain", "grace_s": float("nan")}, "bad_message"),
        (
            {"t": "prefilled", "request_id": "r", "first_token": 1, "slot": -2, "segment": "s", "prompt_len": 1},
            "bad_message",
        ),
        ({"t": "worker_ping", "worker_id": "w", "kv_free_tokens": -5, "running": 0}, "bad_message"),
        ({"t": "tokens", "items": [{"request_id": "r", "token": 1, "finish_reason": "cancelled"}]}, "bad_message"),
        ({"t": "tokens", "items": [["r", 1, None]]}, "bad_message"),  # positional items are gone
        ({"t": "cancel", "request_id": "x" * 65}, "bad_message"),
        ({"t": "cancel", "request_id": True}, "bad_message"),
        ({"t": "cancel"}, "bad_message"),
        ({"t": "generate", "request_id": "r", "prompt": "hi", "params": {"max_tokens": 0}}, "invalid_sampling"),
        ({"t": "generate", "request_id": "r", "prompt": "hi", "params": {"top_k": 1.5}}, "invalid_sampling"),
        ({"t": "generate", "request_id": "r", "prompt": "hi", "params": {"stop": "x"}}, "invalid_sampling"),
        ({"t": "generate", "request_id": "r", "prompt": "hi", "params": {"best_of": 5}}, "invalid_sampling"),
        (
            {
                "t": "register",
                "worker_id": "w",
                "role": "decode",
                "pid": 1,
                "device": "cpu",
                "model": {"name": "m"},
                "kv_capacity_tokens": 1,
                "max_batch": 1,
            },
            "bad_message",
        ),
    ],
)
def test_types_and_declared_bounds_are_checked_before_a_message_exists(body, code):
    error = refused(frame(**body))
    assert error.code == code
    assert error.request_id == (body.get("request_id") if code == "invalid_sampling" else error.request_id)


def test_evolution_unknown_fields_are_ignored_missing_optional_ones_default():
    newer = {**msgpack.unpackb(p.encode(EXAMPLES[p.Tokens])), "entropies": [0.5], "v": p.VERSION + 1}
    newer["items"] = [{**item, "entropy": 0.1} for item in newer["items"]]  # a newer peer's fields, in records too
    assert p.decode(msgpack.packb(newer)) == EXAMPLES[p.Tokens]
    older = frame(t="worker_ping", worker_id="w", kv_free_tokens=5, running=1)  # no `waiting` yet
    assert p.decode(older) == p.WorkerPing("w", 5, 1, 0)
    register = msgpack.unpackb(p.encode(EXAMPLES[p.Register]))
    del register["min_version"], register["max_version"]
    assert p.decode(msgpack.packb(register)).max_version == p.VERSION
    assert (
        p.decode(frame(t="prefilled", request_id="r", first_token=1, slot=0, segment="s", prompt_len=1)).finish_reason
        is None
    )


def test_versions_a_frame_too_old_or_without_one_is_refused():
    assert refused(msgpack.packb({"v": p.MIN_VERSION - 1, "t": "ping"})).code == "version_too_old"
    assert refused(msgpack.packb({"t": "ping"})).code == "version_mismatch"
    assert refused(msgpack.packb({"v": "2", "t": "ping"})).code == "version_mismatch"
    assert p.decode(msgpack.packb({"v": p.VERSION + 5, "t": "ping", "sent_s": 1})) == p.Ping(1.0)
    error = refused(msgpack.packb({"v": 1, "t": "cancel", "request_id": "old-1"}))
    assert (error.code, error.request_id) == ("version_too_old", "old-1")  # routed to the request


def test_frames_refused_whole():
    assert refused(b"x" * (p.MAX_MESSAGE_BYTES + 1)).code == "message_too_large"
    assert refused(b"\xc1").code == "bad_message"
    assert refused(msgpack.packb([1, 2])).code == "bad_message"
    assert refused(frame(t="nope")).code == "unknown_message"
    assert refused(p.encode(p.Ping()), (p.Pong,)).code == "unknown_message"


# -- fuzz ---------------------------------------------------------------------------------------------

VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def _check_decode(data: bytes) -> None:
    """decode gives a message that re-encodes to itself, or a clean HmoeError with a listed code."""
    try:
        msg = p.decode(data)
    except HmoeError as exc:
        assert exc.code in ERROR_CODES and isinstance(exc.message, str), exc
        return
    again = p.encode(msg)
    assert p.encode(p.decode(again)) == again


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(data):
    _check_decode(data)


NEAR = {  # values just past what a field of this kind takes
    int: st.sampled_from([-1, 0, 1, 2**31, 2**32 - 1, 2**32, 2**63, -(2**63), True]),
    float: st.sampled_from([-1.0, float("nan"), float("inf"), 0, "1.0", None]),
    str: st.sampled_from(["", "x" * 65, "bad id!", "stop", "cancelled", "é", 7, None]),
    bytes: st.binary(max_size=9) | st.sampled_from([b"\x00" * 3, b"\xff" * 8, [1, 2], "ab"]),
    bool: st.sampled_from([0, 1, None, "true"]),
}


def _paths(value, path=()):
    """Every place inside a decoded frame: the keys / indexes that lead there."""
    yield path
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths(inner, (*path, key))
    elif isinstance(value, list):
        for i, inner in enumerate(value[:3]):
            yield from _paths(inner, (*path, i))


def _mutate(body: dict, data) -> dict:
    """One change at any depth of a decoded frame: a value nudged or replaced, dropped, or a field added."""
    places = list(_paths(body))[1:]
    if not places:  # everything was dropped already
        return body
    *parents, last = data.draw(st.sampled_from(places))
    holder = body
    for key in parents:
        holder = holder[key]
    how = data.draw(st.sampled_from(["near", "near", "other", "drop", "add"]))
    if how == "drop":
        del holder[last]
    elif how == "add" and isinstance(holder, dict):
        holder[data.draw(st.text(max_size=12))] = data.draw(VALUES)
    elif how == "add":
        holder.insert(last, data.draw(VALUES))
    else:
        near = NEAR.get(type(holder[last]))
        holder[last] = data.draw(near if how == "near" and near is not None else VALUES)
    return body


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(EXAMPLES.values())), st.data())
def test_fuzz_mutated_valid_frames(msg, data):
    if data.draw(st.integers(0, 3)):  # mostly a structured change, packed again
        body = msgpack.unpackb(p.encode(msg))
        for _ in range(data.draw(st.integers(1, 3))):
            body = _mutate(body, data)
        _check_decode(msgpack.packb(body))
        return
    raw = bytearray(p.encode(msg))  # a damaged frame
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    _check_decode(bytes(raw))
