"""Scheduler policy with hand-computed answers: messages and a clock in, messages out, no I/O.

Past 400 lines because each rule of the scheduler has its own hand-computed case here."""

from __future__ import annotations

import dataclasses
from collections import deque

import msgpack
import pytest
from helpers.net import EOS, ByteTokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from hmoe.runtime.config import RouterConfig
from hmoe.runtime.protocol import (
    MIN_VERSION,
    VERSION,
    Adopt,
    Cancel,
    Delta,
    Drain,
    Error,
    Failure,
    Finished,
    Generate,
    ModelInfo,
    Ping,
    Pong,
    Prefill,
    Prefilled,
    ProtocolError,
    Register,
    Registered,
    RequestError,
    Status,
    StatusRequest,
    TokenItem,
    Tokens,
    Usage,
    WorkerPing,
    WorkerPong,
    decode,
    encode,
)
from hmoe.runtime.router import CLIENT_TYPES
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.runtime.scheduler import Scheduler

C1, C2 = b"client-1", b"client-2"
P, D = b"prefill", b"decode"
MODEL = ModelInfo("tiny", 257, [EOS], 4096)


def register(
    s: Scheduler, identity: bytes, role: str, now: float = 0.0, kv: int = 1000, max_batch: int = 4, name: str = ""
) -> None:
    s.on_worker(identity, Register(name or role, role, 1, "cpu", MODEL, kv, max_batch), now)


def make(config: RouterConfig | None = None, **kw) -> Scheduler:
    s = Scheduler(config or RouterConfig(), ByteTokenizer())
    register(s, P, "prefill", **kw)
    register(s, D, "decode", **kw)
    s.take_outbox()
    return s


def alive(s: Scheduler, now: float) -> None:
    """Both workers' heartbeats at `now` (their pongs are dropped)."""
    s.on_worker(P, WorkerPing("prefill", 1000, 0), now)
    s.on_worker(D, WorkerPing("decode", 1000, 0), now)
    s.take_outbox()


def gen(s: Scheduler, rid: str, prompt: str = "hi", client: bytes = C1, now: float = 0.0, **params) -> list:
    s.on_client(client, Generate(rid, prompt=prompt, params=SamplingParams(**{"max_tokens": 8, **params})), now)
    s.tick(now)
    return s.take_outbox()


def tokens(*items: tuple) -> Tokens:
    """Tokens from (request_id, token, finish_reason) triples."""
    return Tokens([TokenItem(*item) for item in items])


def to(out: list, identity: bytes, kind: type) -> list:
    return [m for _, i, m in out if i == identity and isinstance(m, kind)]


def run_to_decode(s: Scheduler, rid: str, first: int = ord("a"), now: float = 0.0) -> list:
    s.on_worker(P, Prefilled(rid, first, 0, "slots", 2, generation=5), now)
    s.tick(now)
    return s.take_outbox()


def test_request_goes_prefill_then_decode_and_finishes_once_with_usage():
    s = make()
    out = gen(s, "r1", "hi", now=1.0)
    (prefill,) = to(out, P, Prefill)
    assert prefill.token_ids == [104, 105] and prefill.params.max_tokens == 8
    out = run_to_decode(s, "r1", ord("O"), now=1.5)
    assert to(out, C1, Delta) == [Delta("r1", [ord("O")], "O")]
    (adopt,) = to(out, D, Adopt)
    assert (adopt.first_token, adopt.slot, adopt.segment, adopt.prompt_len) == (ord("O"), 0, "slots", 2)
    assert adopt.generation == 5  # the slot's fill, passed on so a refilled slot is never adopted
    s.on_worker(D, tokens(("r1", ord("k"), None)), 2.0)
    s.on_worker(D, tokens(("r1", ord("!"), "length")), 2.5)
    out = s.take_outbox()
    (fin,) = to(out, C1, Finished)
    assert (fin.finish_reason, fin.token_ids, fin.text, fin.error) == ("length", [79, 107, 33], "Ok!", None)
    assert fin.usage == Usage(prompt_tokens=2, output_tokens=3, ttft_s=0.5, tpot_s=0.5, queue_s=0.0)
    assert not to(out, D, Cancel)  # the worker ended it itself
    assert s.requests == {} and s.workers.get(D).kv_reserved_tokens == 0
    s.on_worker(D, tokens(("r1", 1, None)), 3.0)  # late tokens of an ended request are ignored
    assert s.take_outbox() == []


def test_every_admitted_request_carries_a_seed_so_prefill_and_decode_sample_alike():
    s = make()
    (prefill,) = to(gen(s, "r1", temperature=0.7), P, Prefill)  # sampled, no seed: the router picks one
    (adopt,) = to(run_to_decode(s, "r1"), D, Adopt)
    assert isinstance(prefill.params.seed, int) and 0 <= prefill.params.seed < 2**63
    assert adopt.params.seed == prefill.params.seed
    (prefill,) = to(gen(s, "r2", temperature=0.7, seed=5), P, Prefill)  # a client's seed is kept
    assert prefill.params.seed == 5


@pytest.mark.parametrize(
    "generate, params, code",
    [
        (Generate("x", prompt="a" * 5000), {}, "prompt_too_long"),
        (Generate("x", prompt="hi"), {"max_tokens": 5000}, "context_too_long"),
        (Generate("x", prompt="hi"), {"max_tokens": 999}, "kv_capacity"),
        (Generate("x", prompt="hi"), {"temperature": -1}, "invalid_sampling"),
        (Generate("x", prompt="hi"), {"best_of": 2}, "invalid_sampling"),
        (Generate("x"), {}, "invalid_prompt"),
        (Generate("x", prompt="hi", token_ids=[1]), {}, "invalid_prompt"),
        (Generate("x", token_ids=[]), {}, "invalid_prompt"),
        (Generate("x", token_ids=[1, 300]), {}, "invalid_prompt"),
        (Generate("x", prompt="hi", timeout_s=0.0), {}, "invalid_request"),
    ],
)
def test_admission_refuses_at_once_with_a_code(generate, params, code):
    s = make(RouterConfig(max_prompt_tokens=4096))
    frame = msgpack.packb({**msgpack.unpackb(encode(generate)), "params": params})
    try:  # as the router takes it: sampling params are checked as the frame is decoded
        generate = decode(frame, CLIENT_TYPES)
    except ProtocolError as exc:  # Router._decode replies with exactly this
        out = [("client", C1, Error(exc.code, exc.message, exc.request_id))]
    else:
        s.on_client(C1, generate, 0.0)
        out = s.take_outbox()
    ((peer, who, error),) = out
    assert (who, type(error), error.code, error.request_id) == (C1, Error, code, "x") and error.message
    assert s.requests == {}


def test_an_empty_text_prompt_is_refused_even_where_the_tokenizer_adds_bos():
    class BosTokenizer(ByteTokenizer):
        def encode(self, text: str):
            encoding = super().encode(text)
            encoding.ids.insert(0, 1)
            return encoding

    s = make()
    s.tokenizer = BosTokenizer()
    s.on_client(C1, Generate("x", prompt=""), 0.0)
    ((_, _, error),) = s.take_outbox()
    assert isinstance(error, Error) and error.code == "invalid_prompt" and "empty" in error.message
    s.on_client(C1, Generate("y", prompt="hi"), 0.0)
    assert s.requests["y"].prompt_ids == [1, 104, 105]


def test_refusals_that_depend_on_the_moment():
    s = Scheduler(RouterConfig(max_queued=1), ByteTokenizer())
    s.on_client(C1, Generate("a", prompt="hi"), 0.0)
    assert s.take_outbox()[0][2].code == "no_worker"
    register(s, D, "decode")
    s.take_outbox()
    s.on_client(C1, Generate("a", prompt="hi"), 0.0)
    assert s.take_outbox()[0][2].code == "no_worker"  # still no prefill worker
    register(s, P, "prefill")
    s.take_outbox()
    gen(s, "a")
    s.on_client(C1, Generate("a", prompt="hi"), 0.0)
    assert s.take_outbox()[0][2].code == "duplicate_request"
    gen(s, "b")  # queued behind "a", which is at the prefill worker
    s.on_client(C1, Generate("c", prompt="hi"), 0.0)
    assert s.take_outbox()[0][2].code == "queue_full"
    s2 = Scheduler(RouterConfig(), tokenizer=None)
    register(s2, P, "prefill"), register(s2, D, "decode"), s2.take_outbox()
    s2.on_client(C1, Generate("t", prompt="hi"), 0.0)
    assert s2.take_outbox()[0][2].code == "tokenizer_missing"
    s2.on_client(C1, Generate("t", token_ids=[1, 2]), 0.0)
    assert s2.take_outbox() == []  # token ids need no tokenizer


def test_fifo_one_prefill_at_a_time_and_decode_room_gates_prefill():
    s = make(max_batch=1)
    assert len(to(gen(s, "a"), P, Prefill)) == 1
    assert to(gen(s, "b"), P, Prefill) == []  # the prefill worker is busy
    out = run_to_decode(s, "a")
    assert to(out, D, Adopt) and not to(out, P, Prefill)  # free prefill, but decode holds max_batch = 1
    s.on_worker(D, tokens(("a", 5, "stop")), 0.1)
    s.tick(0.1)
    (prefill,) = to(s.take_outbox(), P, Prefill)
    assert prefill.request_id == "b"


def test_kv_accounting_holds_back_what_does_not_fit_yet_and_lets_what_fits_pass():
    s = make(kv=30, max_batch=8)
    gen(s, "a", "hi", max_tokens=20)  # 22 tokens of KV
    run_to_decode(s, "a")
    assert to(gen(s, "b", "hi", max_tokens=20), P, Prefill) == []  # 22 + 22 > 30
    assert [m.request_id for m in to(gen(s, "c", "hi", max_tokens=1), P, Prefill)] == ["c"]  # 3 fits: it goes
    s.on_worker(P, Prefilled("c", ord("x"), -1, "slots", 2, "length"), 0.2)  # its first token ended it
    s.tick(0.2)
    s.take_outbox()
    s.on_worker(D, tokens(("a", 5, "length")), 0.3)
    s.tick(0.3)
    assert [m.request_id for m in to(s.take_outbox(), P, Prefill)] == ["b"]


def test_a_request_waiting_prefill_starve_s_without_room_holds_back_the_rest():
    s = make(RouterConfig(prefill_starve_s=5.0), kv=30, max_batch=8)
    gen(s, "a", "hi", max_tokens=20)
    run_to_decode(s, "a")
    gen(s, "b", "hi", max_tokens=20)  # does not fit yet
    alive(s, 5.9)
    assert to(gen(s, "c", "hi", max_tokens=1, now=6.0), P, Prefill) == []  # b is due and still waits: c too
    s.on_worker(D, tokens(("a", 5, "length")), 6.1)
    s.tick(6.1)
    assert [m.request_id for m in to(s.take_outbox(), P, Prefill)] == ["b"]


def test_a_short_prompt_is_prefilled_before_a_long_one_that_came_first():
    s = make()
    gen(s, "busy")  # the prefill worker runs it
    gen(s, "long", "x" * 300, now=0.1)
    gen(s, "short", "hi", now=0.2)
    out = run_to_decode(s, "busy", now=0.3)
    assert [m.request_id for m in to(out, P, Prefill)] == ["short"]


def test_cancel_in_each_phase_tells_the_holder_and_finishes_at_once():
    s = make()
    gen(s, "q1"), gen(s, "q2")  # q1 at prefill, q2 queued
    s.on_client(C1, Cancel("q2"), 0.0)
    out = s.take_outbox()
    assert [m.finish_reason for m in to(out, C1, Finished)] == ["cancelled"] and not to(out, P, Cancel)
    s.on_client(C1, Cancel("q1"), 0.0)
    s.tick(0.0)
    out = s.take_outbox()
    assert to(out, P, Cancel) == [Cancel("q1")] and to(out, C1, Finished)[0].finish_reason == "cancelled"
    assert s.workers.get(P).busy is None and s.workers.get(D).kv_reserved_tokens == 0
    s.on_worker(P, Prefilled("q1", 7, 3, "slots", 2), 0.1)  # crossed the cancel: free its slot
    assert s.take_outbox() == [("worker", P, Cancel("q1"))]
    gen(s, "d1")
    run_to_decode(s, "d1")
    s.on_client(C2, Cancel("d1"), 0.2)  # another client cannot cancel it
    assert s.take_outbox() == []
    s.on_client(C1, Cancel("d1"), 0.2)
    out = s.take_outbox()
    assert to(out, D, Cancel) == [Cancel("d1")] and to(out, C1, Finished)[0].token_ids == [ord("a")]


def test_stop_string_trims_text_and_cancels_at_the_worker():
    s = make()
    gen(s, "r", stop=["o w"])
    run_to_decode(s, "r", ord("h"))
    deltas = []
    for ch in "ello world":
        s.on_worker(D, tokens(("r", ord(ch), None)), 0.1)
        deltas += [m.text for m in to(s.take_outbox(), C1, Delta)]
        if s.requests == {}:
            break
    assert "".join(deltas) == "hell"  # "o" was held back: it could have begun "o w"
    s.on_worker(D, tokens(("r", ord("x"), None)), 0.2)
    assert s.take_outbox() == []


def test_stop_string_end_of_stream_and_utf8_split_over_tokens():
    s = make()
    gen(s, "r", stop=["zz"])
    run_to_decode(s, "r", 0xC3)  # first half of "é"
    out = []
    for token, reason in ((0xA9, None), (ord("z"), None), (ord("!"), None), (ord("z"), "length")):
        s.on_worker(D, tokens(("r", token, reason)), 0.1)
        out += s.take_outbox()
    texts = [m.text for m in to(out, C1, Delta)]  # one character is held back: it may begin "zz"
    assert texts == ["", "é", "z", "!", "z"] and to(out, C1, Finished)[0].text == "éz!z"


def test_first_token_that_ends_the_request():
    s = make()
    gen(s, "one", max_tokens=1)
    s.on_worker(P, Prefilled("one", ord("A"), -1, "", 2, "length"), 0.1)  # the worker says why it ended
    (fin,) = to(s.take_outbox(), C1, Finished)
    assert (fin.finish_reason, fin.text, fin.usage.tpot_s) == ("length", "A", None)
    gen(s, "eos")
    s.on_worker(P, Prefilled("eos", EOS, -1, "", 2, "stop"), 0.1)
    out = s.take_outbox()
    assert to(out, C1, Finished)[0].finish_reason == "stop" and not to(out, D, Adopt) and not to(out, P, Cancel)


def test_deadline_and_vanished_client():
    s = make(RouterConfig(request_timeout_s=5.0, client_timeout_s=3.0))
    gen(s, "late", now=0.0)
    run_to_decode(s, "late")
    s.on_client(C2, Generate("own", prompt="x", timeout_s=1.0), 0.0)
    s.on_client(C1, Ping(), 2.9)
    s.tick(2.0)
    assert [m.finish_reason for m in to(s.take_outbox(), C2, Finished)] == ["timeout"]
    alive(s, 5.0)
    s.tick(5.0)
    out = s.take_outbox()
    assert to(out, C1, Finished)[0].finish_reason == "timeout" and to(out, D, Cancel) == [Cancel("late")]
    alive(s, 10.0)
    gen(s, "gone", client=C2, now=10.0)
    run_to_decode(s, "gone", now=10.0)
    alive(s, 11.5)
    s.tick(12.9)
    assert s.take_outbox() == []
    alive(s, 13.0)
    s.tick(13.1)  # silent for > client_timeout_s
    out = s.take_outbox()
    assert to(out, C2, Finished)[0].finish_reason == "cancelled" and to(out, D, Cancel) == [Cancel("gone")]
    assert s.clients == {}


def test_heartbeats_and_lost_decode_worker_ends_its_requests_with_worker_lost():
    s = make()
    s.on_worker(D, WorkerPing("decode", 900, 1, 0), 1.0)
    assert s.take_outbox() == [("worker", D, WorkerPong())]
    s.on_client(C1, Ping(3.5), 1.0)
    assert s.take_outbox() == [("client", C1, Pong(3.5))]
    gen(s, "a", now=1.0)
    run_to_decode(s, "a", now=1.0)
    gen(s, "b", now=1.0)
    s.on_worker(P, WorkerPing("prefill", 1000, 1), 3.0)
    s.tick(3.0)  # decode silent 2.0 s = 0.5 s * 4: not yet
    assert s.take_outbox() == [("worker", P, WorkerPong())]
    s.tick(3.01)
    out = s.take_outbox()
    (fin,) = to(out, C1, Finished)
    assert (fin.request_id, fin.finish_reason, fin.error.code) == ("a", "error", "worker_lost")
    assert "b" in s.requests  # at prefill: it needs a decode worker only after its first token
    s.on_worker(P, Prefilled("b", 7, 1, "slots", 2), 3.1)
    s.tick(3.1)
    assert not to(s.take_outbox(), D, Adopt) and s.awaiting_decode == ["b"]
    register(s, b"decode-2", "decode", now=3.5)
    s.tick(3.5)
    (adopt,) = to(s.take_outbox(), b"decode-2", Adopt)
    assert adopt.request_id == "b" and adopt.slot == 1


def test_lost_prefill_worker_retries_once_then_worker_lost():
    s = make(RouterConfig(client_timeout_s=3600.0))
    gen(s, "a")
    gen(s, "b")
    s.on_worker(D, WorkerPing("decode", 1, 0), 2.5)
    s.tick(2.5)  # the prefill worker is lost with "a" in prefill
    out = s.take_outbox()
    assert not to(out, C1, Finished) and list(s.queue) == ["a", "b"]
    register(s, b"prefill-2", "prefill", now=2.6)
    s.tick(2.6)
    assert [m.request_id for m in to(s.take_outbox(), b"prefill-2", Prefill)] == ["a"]
    s.on_worker(D, WorkerPing("decode", 1, 0), 4.6)
    s.tick(4.7)  # lost again: no second retry
    (fin,) = to(s.take_outbox(), C1, Finished)
    assert fin.request_id == "a" and fin.error.code == "worker_lost"
    s.tick(4.7 + 29.0)
    assert not to(s.take_outbox(), C1, Finished)
    s.tick(4.7 + 31.0)  # no prefill worker within worker_wait_s: "b" gives up
    (fin,) = to(s.take_outbox(), C1, Finished)
    assert fin.request_id == "b" and fin.error.code == "no_worker"


def test_unknown_worker_is_told_to_register_and_bad_registrations_are_refused():
    s = make()
    s.on_worker(b"stranger", WorkerPing("w9", 1, 0), 0.0)  # this router restarted, or lost it: it registers again
    s.on_worker(b"stranger", Error("unknown_message", "?"), 0.0)  # (no error answers an error)
    ((_, who, error),) = s.take_outbox()
    assert who == b"stranger" and isinstance(error, Error) and error.code == "not_registered"
    s.on_worker(b"other", Register("w", "decode", 1, "cpu", dataclasses.replace(MODEL, name="other"), 100, 1), 0.0)
    assert s.take_outbox()[0][2].code == "worker_rejected" and s.workers.get(b"other") is None
    s.on_worker(b"odd", Register("w", "embed", 1, "cpu", MODEL, 100, 1), 0.0)
    assert s.take_outbox()[0][2].code == "worker_rejected"


def test_protocol_versions_are_negotiated_at_register_and_a_peer_too_old_is_refused():
    s = make()
    s.on_worker(b"new", Register("w-new", "decode", 1, "cpu", MODEL, 100, 1, MIN_VERSION, VERSION + 3), 0.0)
    assert s.take_outbox() == [("worker", b"new", Registered("w-new", VERSION))]  # the highest both speak
    assert s.workers.get(b"new").version == VERSION
    for low, high, upgrade in ((1, MIN_VERSION - 1, "worker"), (VERSION + 1, VERSION + 2, "router")):
        s.on_worker(b"odd", Register("w-odd", "decode", 1, "cpu", MODEL, 100, 1, low, high), 0.0)
        ((_, who, error),) = s.take_outbox()
        assert (who, type(error), error.code) == (b"odd", Error, "version_too_old")
        assert f"upgrade the {upgrade}" in error.message and s.workers.get(b"odd") is None


def test_a_worker_registering_again_on_a_new_socket_replaces_its_old_registration():
    """A worker that stopped hearing the router registers on a new socket; the old entry must not take work."""
    s = Scheduler(RouterConfig(), ByteTokenizer())
    s.on_worker(P, Register("prefill-host-a-7-1", "prefill", 7, "cpu", MODEL, 1000, 4), 0.0)
    s.on_worker(D, Register("decode-host-a-8-1", "decode", 8, "cpu", MODEL, 1000, 4), 0.0)
    gen(s, "r1")
    s.on_worker(b"p-new", Register("prefill-host-a-7-2", "prefill", 7, "cpu", MODEL, 1000, 4), 0.1)
    assert list(s.workers.by_identity) == [D, b"p-new"]  # the stale one went, its request back in line
    s.on_worker(b"p-other-host", Register("prefill-host-b-7-1", "prefill", 7, "cpu", MODEL, 1000, 4), 0.1)
    assert b"p-new" in s.workers.by_identity  # same pid on another host: another process
    s.tick(0.2)
    assert any(isinstance(m, Prefill) and m.request_id == "r1" for _, _, m in s.take_outbox())


def test_a_lost_decode_worker_gives_its_unadopted_handoff_slots_back_at_once():
    s = make()
    gen(s, "r1")
    run_to_decode(s, "r1")  # Adopt sent: the slot is the decode worker's to free, unless it died first
    s.on_worker(P, WorkerPing("prefill", 1000, 0), 2.5)
    s.take_outbox()
    s.tick(2.6)  # the decode worker silent past 2 s, the prefill worker heard at 2.5
    out = s.take_outbox()
    assert (P, Cancel("r1")) in [(who, m) for _, who, m in out]  # the prefill worker frees it, if still filled
    assert any(isinstance(m, Finished) and m.error.code == "worker_lost" for _, _, m in out)


def test_pong_names_the_requests_this_router_does_not_hold():
    s = make()
    gen(s, "mine")
    s.on_client(C1, Ping(1.0, ["mine", "gone"]), 0.1)
    s.on_client(C2, Ping(2.0, ["mine"]), 0.1)  # another client's id is not its request
    assert [m.unknown for _, _, m in s.take_outbox()] == [["gone"], ["mine"]]


def test_request_error_from_a_worker_ends_only_that_request():
    s = make()
    gen(s, "a")
    s.on_worker(P, RequestError("a", "kv_capacity", "needs 4 GiB, has 3"), 0.1)
    s.tick(0.1)
    out = s.take_outbox()
    (fin,) = to(out, C1, Finished)
    assert fin.finish_reason == "error" and fin.error == Failure("kv_capacity", "needs 4 GiB, has 3")
    assert s.workers.get(P).busy is None


def test_a_draining_worker_gets_nothing_new_and_its_refusals_wait_for_another():
    s = make()
    gen(s, "a")
    s.on_worker(P, RequestError("a", "draining", "the worker is shutting down"), 0.1)
    s.tick(0.1)
    assert not s.take_outbox() and list(s.queue) == ["a"]  # not failed, not sent to the draining worker again
    register(s, b"prefill-2", "prefill", now=0.2)
    s.tick(0.2)
    assert [m.request_id for m in to(s.take_outbox(), b"prefill-2", Prefill)] == ["a"]
    assert [w.draining for w in s.status(0.2).workers if w.role == "prefill"] == [True, False]


def test_drain_refuses_new_work_finishes_the_rest_then_stops():
    s = make()
    gen(s, "a")
    run_to_decode(s, "a")
    s.on_client(C2, Drain(10.0), 1.0)
    (status,) = to(s.take_outbox(), C2, Status)
    assert status.draining and status.running == 1
    s.on_client(C1, Generate("b", prompt="x"), 1.0)
    assert s.take_outbox()[0][2].code == "draining"
    s.on_worker(D, tokens(("a", 5, "stop")), 2.0)
    s.tick(2.0)
    assert s.stopped and to(s.take_outbox(), C1, Finished)[0].finish_reason == "stop"
    s = make()
    gen(s, "c")
    s.drain(1.0, 0.0)
    s.tick(0.5)
    assert not s.stopped
    s.tick(1.0)
    out = s.take_outbox()
    assert s.stopped and to(out, C1, Finished)[0].error.code == "server_shutdown" and to(out, P, Cancel)


def test_status_reports_workers_queue_kv_and_throughput():
    s = make()
    gen(s, "a")
    run_to_decode(s, "a")
    gen(s, "b")
    s.on_worker(D, tokens(("a", 5, None)), 10.0)
    s.on_client(C2, StatusRequest(), 10.0)
    (st_,) = to(s.take_outbox(), C2, Status)
    assert (st_.queued, st_.running, st_.draining) == (0, 2, False)
    assert {w.role for w in st_.workers} == {"prefill", "decode"}
    assert st_.kv.capacity_tokens == 1000 and st_.kv.used_tokens == 20  # two requests of 2 + 8
    assert st_.throughput.tokens_per_s > 0


# -- every admitted request ends exactly once, whatever happens ------------------------------------

EVENTS = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "gen",
                "cancel",
                "prefilled",
                "prefilled_end",
                "token",
                "token_end",
                "request_error",
                "ping_p",
                "ping_d",
                "tick",
                "register_p",
                "register_d",
                "drain",
            ]
        ),
        st.integers(0, 5),
        st.floats(0.0, 1.5),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(EVENTS)
def test_exactly_one_finished_per_admitted_request(events):
    s = make(RouterConfig(max_queued=3, request_timeout_s=4.0), max_batch=2, kv=40)
    now, admitted, seq = 0.0, set(), 0
    identities = {"prefill": P, "decode": D}
    for kind, n, dt in events:
        now += dt
        rid = f"r{n}"
        if kind == "gen":
            s.on_client(
                C1 if n % 2 else C2,
                Generate(rid, token_ids=[1, 2, 3], params=SamplingParams(max_tokens=1 + n % 3, stop=("\x05",))),
                now,
            )
        elif kind == "cancel":
            s.on_client(C1 if n % 2 else C2, Cancel(rid), now)
        elif kind.startswith("prefilled"):
            end = kind.endswith("end")
            s.on_worker(
                identities["prefill"], Prefilled(rid, n, -1 if end else n, "slots", 3, "length" if end else None), now
            )
        elif kind.startswith("token"):
            s.on_worker(identities["decode"], tokens((rid, n, "length" if kind.endswith("end") else None)), now)
        elif kind == "request_error":
            s.on_worker(identities["prefill" if n % 2 else "decode"], RequestError(rid, "oops", "failed"), now)
        elif kind.startswith("ping"):
            role = "prefill" if kind.endswith("p") else "decode"
            s.on_worker(identities[role], WorkerPing(role, 10, 0), now)
        elif kind.startswith("register"):
            role = "prefill" if kind.endswith("p") else "decode"
            seq += 1
            identities[role] = f"{role}-{seq}".encode()
            register(s, identities[role], role, now, kv=40, max_batch=2)
        elif kind == "drain":
            s.drain(3.0, now)
        else:
            s.tick(now)
        for _peer, _who, msg in s.take_outbox():
            if isinstance(msg, Finished):
                assert msg.request_id in admitted, "Finished for a request never admitted"
                admitted.discard(msg.request_id)
            elif isinstance(msg, Delta):
                assert msg.request_id in admitted, "Delta after Finished"
        admitted |= set(s.requests)
    s.drain(0.0, now)
    s.tick(now + 1)
    for _peer, _who, msg in s.take_outbox():
        if isinstance(msg, Finished):
            admitted.discard(msg.request_id)
    assert not admitted and s.requests == {} and not s.queue
    assert all(
        w.kv_reserved_tokens == 0 and not w.request_ids and w.busy is None for w in s.workers.by_identity.values()
    )


def test_requests_queue_through_a_worker_restart_up_to_worker_wait_s():
    s = make(RouterConfig(worker_wait_s=5.0))
    s.on_worker(D, WorkerPing("decode", 1000, 0), 2.5)
    s.tick(2.6)  # the prefill worker is lost (silent past 2 s); it is restarting
    assert s.workers.of_role("prefill") == []
    s.take_outbox()
    s.on_client(C1, Generate("during", prompt="hi", params=SamplingParams(max_tokens=4)), 3.0)
    s.on_worker(D, WorkerPing("decode", 1000, 0), 3.0)
    assert to(s.take_outbox(), C1, Error) == [] and s.queue == deque(["during"])  # admitted, waiting
    s.on_worker(b"p2", Register("prefill-2", "prefill", 2, "cpu", MODEL, 1000, 4), 4.0)
    s.tick(4.0)
    assert [m.request_id for _, who, m in s.take_outbox() if who == b"p2" and isinstance(m, Prefill)] == ["during"]
    s2 = make(RouterConfig(worker_wait_s=5.0))
    s2.on_worker(D, WorkerPing("decode", 1000, 0), 2.5)
    s2.tick(2.6)
    s2.take_outbox()
    s2.on_client(C1, Generate("late", prompt="hi"), 8.0)  # gone for 5.4 s > worker_wait_s
    ((_, _, error),) = s2.take_outbox()
    assert error.code == "no_worker"


def test_a_busy_worker_whose_steps_stand_still_is_stuck_its_requests_fail_and_it_is_told_to_restart():
    s = make(RouterConfig(stuck_after_s=5.0))
    gen(s, "r1")
    run_to_decode(s, "r1")
    s.take_outbox()
    for t in range(1, 12):  # both keep pinging (their I/O threads are fine); the decode worker's steps stop at 3
        s.on_worker(P, WorkerPing("prefill", 1000, 0, steps=100 + t), float(t))
        s.on_worker(D, WorkerPing("decode", 1000, 1, steps=min(t, 3)), float(t))
        s.tick(float(t))
        out = s.take_outbox()
        if s.workers.get(D) is None:
            break
    assert t == 9  # steps last moved at 3: stuck once more than 5 s later
    assert s.workers.get(P) is not None  # the idle prefill worker is not judged
    assert (D, "worker_stuck") in [(who, m.code) for _, who, m in out if isinstance(m, Error)]
    (finished,) = [m for _, _, m in out if isinstance(m, Finished)]
    assert finished.error.code == "worker_stuck"


def test_with_two_prefill_workers_a_prompt_goes_where_its_prefix_was_prefilled():
    s = make(kv=4000)
    register(s, b"prefill-2", "prefill", name="prefill-2")
    s.take_outbox()
    document = "".join(chr(97 + i % 26) for i in range(600))  # the byte tokenizer: 600 tokens, two spans
    assert to(gen(s, "other", "something else entirely"), P, Prefill)  # both idle: the first in the pool
    assert to(gen(s, "first", document + " one?"), b"prefill-2", Prefill)  # P is busy
    s.on_worker(P, Prefilled("other", ord("a"), 1, "slots", 23, generation=1), 1.0)
    s.on_worker(b"prefill-2", Prefilled("first", ord("a"), 0, "slots", 605, generation=1), 1.0)
    s.take_outbox()
    assert to(gen(s, "again", document + " two?", now=1.0), b"prefill-2", Prefill)  # it holds the document


def test_the_router_reserves_decode_kv_in_the_workers_whole_blocks():
    s = Scheduler(RouterConfig(), ByteTokenizer())
    register(s, P, "prefill")
    s.on_worker(D, Register("decode", "decode", 1, "cpu", MODEL, 64, 8, kv_block_size=16), 0.0)
    s.take_outbox()
    for rid in ("a", "b", "c"):  # 2 + 8 = 10 tokens each: one block of 16 apiece at the worker
        gen(s, rid, max_tokens=8)
        run_to_decode(s, rid)
    (worker,) = s.status(0.0).workers[1:]
    assert worker.kv_reserved_tokens == 3 * 16  # not 3 * 10: the ledger the worker keeps
    gen(s, "d", max_tokens=8)
    assert run_to_decode(s, "d") and s.status(0.0).workers[1].kv_reserved_tokens == 64
    assert not to(gen(s, "e", max_tokens=8), P, Prefill)  # a fifth block does not exist: it waits


def test_a_short_prompt_is_interleaved_into_a_long_prefill_one_at_a_time():
    s = make(kv=4000)
    long = "x" * 300  # the byte tokenizer: 300 tokens, past interleave_max_tokens = 128
    (first,) = to(gen(s, "long", long), P, Prefill)
    assert not first.interleave
    (short,) = to(gen(s, "short", "hello"), P, Prefill)  # the worker is busy, yet it goes: between layers
    assert short.interleave
    assert to(gen(s, "short-2", "again"), P, Prefill) == []  # one interleaved at a time
    assert to(gen(s, "long-2", long), P, Prefill) == []  # a long one is never interleaved
    s.on_worker(P, Prefilled("short", ord("a"), 1, "slots", 5, generation=1), 0.5)
    s.tick(0.5)
    (next_short,) = to(s.take_outbox(), P, Prefill)
    assert next_short.request_id == "short-2" and next_short.interleave
    s.on_worker(P, Prefilled("long", ord("a"), 0, "slots", 300, generation=1), 1.0)
    s.on_worker(P, Prefilled("short-2", ord("a"), 2, "slots", 5, generation=1), 1.0)
    s.tick(1.0)
    (after,) = to(s.take_outbox(), P, Prefill)
    assert after.request_id == "long-2" and not after.interleave


def test_interleaving_off_keeps_one_prompt_per_prefill_worker():
    s = make(RouterConfig(interleave_max_tokens=0), kv=4000)
    to(gen(s, "long", "x" * 300), P, Prefill)
    assert to(gen(s, "short", "hello"), P, Prefill) == []
