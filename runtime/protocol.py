"""The wire protocol: every message between clients, router and workers, defined once.

A message is one ZeroMQ frame holding a msgpack map {"v": VERSION, "t": type tag, ...fields}.
Each type is a frozen slotted dataclass; `encode` and `decode` are the one codec and the one
validation path: decode checks size, version, tag and every field's type and bounds before a
message object exists, and raises ProtocolError (code "bad_message" / "unknown_message" /
"message_too_large" / "version_mismatch") that the receiver turns into an error reply.
No pickle anywhere; bulk data (KV caches) never rides in a message: a handle to shared memory does.

Sockets: clients (DEALER) -> router frontend (ROUTER); workers (DEALER) -> router backend (ROUTER).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field

import msgpack

from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import SamplingParams

VERSION = 1
MAX_MESSAGE_BYTES = 4 << 20  # a 128K-token prompt as ids is ~0.6 MB; text prompts are capped by this
MAX_LIST_LEN = 1 << 20
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}\Z")


class ProtocolError(HmoeError):
    """A frame that is not a valid message: the receiver replies with this code and keeps serving."""

    request_id: str | None = None  # the frame's request_id when it had a valid one (for the error reply)


_TYPES: dict[str, type] = {}


def message(tag: str):
    """Register a frozen slotted dataclass as the message type `tag`."""

    def wrap(cls):
        cls = dataclass(frozen=True, slots=True)(cls)
        cls.TAG = tag
        assert tag not in _TYPES, tag
        _TYPES[tag] = cls
        return cls

    return wrap


# -- client <-> router ----------------------------------------------------------------------------


@message("generate")
class Generate:
    """Start a request. Exactly one of prompt / token_ids; the client makes request_id."""

    request_id: str
    prompt: str | None = None
    token_ids: list[int] | None = None
    params: dict = field(default_factory=dict)  # SamplingParams fields
    stream: bool = True
    timeout_s: float | None = None  # deadline from arrival; the request ends with "timeout"


@message("cancel")
class Cancel:
    request_id: str


@message("ping")
class Ping:
    """Liveness both ways: clients with requests in flight and workers send it; the router answers Pong."""

    sent_s: float = 0.0
    request_ids: list[str] = field(default_factory=list)  # the client's requests in flight: which are unknown?


@message("pong")
class Pong:
    sent_s: float = 0.0
    unknown: list[str] = field(default_factory=list)  # of Ping.request_ids, those this router does not hold
    incarnation: str = ""  # the router process that answers (a new one after a restart)


@message("status_request")
class StatusRequest:
    pass


@message("status")
class Status:
    workers: list[dict]
    queued: int
    running: int
    kv: dict  # used_tokens, capacity_tokens
    throughput: dict  # tokens/s over the last minute etc.
    draining: bool = False
    incarnation: str = ""


@message("delta")
class Delta:
    """New tokens of a streaming request and the text they complete (UTF-8-safe)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list | None = None  # asked for (params.logprobs): per token, [logprob, [[id, logprob], ...]]
    incarnation: str = ""


@message("finished")
class Finished:
    request_id: str
    finish_reason: str  # stop | length | cancelled | timeout | error
    token_ids: list[int]  # every generated token (the non-streaming answer)
    text: str
    usage: dict  # prompt_tokens, output_tokens, ttft_s, tpot_s
    error: dict | None = None  # {code, message} when finish_reason is "error"
    logprobs: list | None = None  # asked for: per generated token, as in Delta
    incarnation: str = ""


@message("error")
class Error:
    """A refusal or failure with a stable code; request_id is None when the frame had none."""

    code: str
    message: str
    request_id: str | None = None
    incarnation: str = ""


# -- router <-> workers -----------------------------------------------------------------------------


@message("register")
class Register:
    """A worker is ready to serve (weights attached, kernels compiled)."""

    worker_id: str
    role: str  # "prefill" | "decode"
    pid: int
    device: str
    model: dict  # name, vocab_size, eos_token_ids, max_position_embeddings
    kv_capacity_tokens: int
    max_batch: int


@message("worker_ping")
class WorkerPing:
    """Worker heartbeat with its load; the router answers WorkerPong."""

    worker_id: str
    kv_free_tokens: int
    running: int
    waiting: int = 0
    steps: int = 0  # engine steps (forward passes) since the worker started
    step_s: float = 0.0  # their total time: the mean step time is a rate of the two


@message("worker_pong")
class WorkerPong:
    incarnation: str = ""  # the router process that answers: a worker registers again when it changes


@message("prefill")
class Prefill:
    request_id: str
    token_ids: list[int]
    params: dict
    handoff: bool = True  # False: the prefill worker only samples (max_tokens == 1)


@message("prefilled")
class Prefilled:
    """The prompt's KV sits in hand-off slot `slot` (a handle, not data); first token sampled."""

    request_id: str
    first_token: int
    slot: int
    segment: str
    prompt_len: int
    logprobs: list | None = None  # asked for: the first token's [logprob, [[id, logprob], ...]]


@message("adopt")
class Adopt:
    """Decode worker: take a prefilled request (copy its KV from the slot, free the slot)."""

    request_id: str
    token_ids: list[int]  # prompt ids (the decode worker needs the length and stop context)
    first_token: int
    slot: int
    segment: str
    params: dict


@message("tokens")
class Tokens:
    """One decode step's output: (request_id, token, finish_reason or None) per running request."""

    items: list[list]
    logprobs: list | None = None  # when any request asked: per item, [logprob, [[id, logprob], ...]] or None


@message("request_error")
class RequestError:
    """A worker could not run one request (e.g. KV capacity); others are unaffected."""

    request_id: str
    code: str
    message: str


@message("drain")
class Drain:
    """Stop admitting; finish or cancel running requests within grace_s; then exit."""

    grace_s: float


# -- codec ------------------------------------------------------------------------------------------


def encode(msg) -> bytes:
    body = {"v": VERSION, "t": msg.TAG}
    for f in dataclasses.fields(msg):
        body[f.name] = getattr(msg, f.name)
    return msgpack.packb(body, use_bin_type=True)


def decode(frame: bytes, allowed: tuple[type, ...] | None = None):
    """bytes -> message object, or ProtocolError. `allowed` limits the types this socket accepts."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError("message_too_large", f"message of {len(frame)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(
            frame,
            raw=False,
            strict_map_key=True,
            max_str_len=MAX_MESSAGE_BYTES,
            max_bin_len=0,
            max_array_len=MAX_LIST_LEN,
            max_map_len=64,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise ProtocolError("bad_message", f"frame is not msgpack: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError("bad_message", "message must be a msgpack map")
    try:
        return _build(body, allowed)
    except ProtocolError as exc:  # route the refusal to the request that caused it, when it names one
        rid = body.get("request_id")
        exc.request_id = rid if isinstance(rid, str) and REQUEST_ID.match(rid) else None
        raise


def _build(body: dict, allowed: tuple[type, ...] | None):
    if body.get("v") != VERSION:
        raise ProtocolError("version_mismatch", f"protocol version {body.get('v')!r}, this side speaks {VERSION}")
    cls = _TYPES.get(body.get("t")) if isinstance(body.get("t"), str) else None
    if cls is None or (allowed is not None and cls not in allowed):
        raise ProtocolError("unknown_message", f"unknown or unexpected message type {body.get('t')!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in body:
            kwargs[f.name] = _check(body[f.name], hints[f.name], f.name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ProtocolError("bad_message", f"{cls.TAG}: missing field {f.name!r}")
    extra = set(body) - {"v", "t"} - {f.name for f in dataclasses.fields(cls)}
    if extra:
        raise ProtocolError("bad_message", f"{cls.TAG}: unknown fields {sorted(extra)}")
    msg = cls(**kwargs)
    if hasattr(msg, "request_id") and msg.request_id is not None and not REQUEST_ID.match(msg.request_id):
        raise ProtocolError("bad_message", "request_id must be 1-64 characters of [A-Za-z0-9._:-]")
    return msg


def _check(value, hint, name: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        return _check(value, next(o for o in options if o is not type(None)), name)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError("bad_message", f"field {name!r} must be a list")
        (item,) = typing.get_args(hint) or (typing.Any,)
        return [_check(v, item, name) for v in value] if item is not typing.Any else value
    if hint is typing.Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = isinstance(value, hint) and not (hint is int and isinstance(value, bool))
    if not ok:
        raise ProtocolError("bad_message", f"field {name!r} must be {hint.__name__}, got {type(value).__name__}")
    return value


def sampling_params(params: dict, seeded: bool = False) -> SamplingParams:
    """Generate.params -> SamplingParams; unknown keys and bad values are 'invalid_sampling'. Workers
    pass seeded=True: a sampled request reaches them with the seed the router gave it."""
    known = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = set(params) - known
    if unknown:
        raise HmoeError("invalid_sampling", f"unknown sampling parameters {sorted(unknown)}")
    fixed = dict(params)
    for key in ("stop_token_ids", "stop"):
        if key in fixed:
            if not isinstance(fixed[key], (list, tuple)):
                raise HmoeError("invalid_sampling", f"{key}: must be a list")
            fixed[key] = tuple(fixed[key])
    try:
        result = SamplingParams(**fixed)
    except TypeError as exc:
        raise HmoeError("invalid_sampling", str(exc)) from None
    if seeded and result.temperature > 0 and result.seed is None:
        raise HmoeError("invalid_sampling", "a sampled request needs a seed here (the router assigns one)")
    return result


def params_dict(params: SamplingParams) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}
