"""The wire protocol: every message between clients, router and workers, defined once.

A message is one ZeroMQ frame holding a msgpack map {"v": sender's VERSION, "t": type tag, ...fields}.
Each type is a frozen slotted dataclass whose fields have concrete types (scalars, Literal choices,
bounded ints, request ids, token ids, lists and records: SamplingParams, Usage, Failure, ModelInfo,
TokenItem, WorkerStatus, ...). `encode` and `decode` are the one codec and the one validation path
(runtime/codec.py): decode checks size, version, tag, every field's type and the bounds its type
declares (Range, the request-id format, SamplingParams' own ranges) before a message object exists,
and raises ProtocolError with a code listed in error_codes.py that the receiver turns into an error
reply. Token ids travel packed, so a 128K-token prompt decodes as one copy.
No pickle anywhere; bulk data (KV caches) never rides in a message: a handle to shared memory does.

Evolution: a router and its workers are upgraded one at a time, so
1. A new field is optional (it has a default) and an older peer ignores it: decode drops fields it
   does not know, in messages and records alike; a frame from an older peer gets the default.
   A field's type and meaning never change and a field a peer may still send is never removed:
   such a change is a new field. SamplingParams alone is strict (an unknown key is refused with
   "invalid_sampling"), so a sampling option a peer would not honour is never silently dropped.
2. Every frame carries its sender's VERSION. A frame from a version below MIN_VERSION is refused
   with "version_too_old"; newer versions are read by rule 1. VERSION goes up with each set of new
   fields or message types; MIN_VERSION goes up only for a change rule 1 cannot absorb (as version 2
   did: packed token ids, typed token items; and version 3: Adopt's required token_ids became
   prompt_len) and then refuses every older peer.
3. Versions are negotiated at Register: a worker sends the range it speaks (min_version..max_version);
   the router answers Registered with the highest version both speak, or refuses a worker with no
   common version with Error "version_too_old" saying which side to upgrade. A new message type is
   sent only to a peer whose negotiated version has it.

Sockets: clients (DEALER) -> router frontend (ROUTER); workers (DEALER) -> router backend (ROUTER).

Past 400 lines because the whole wire contract (every message and record, the version rule) is read
in one place; the codec's machinery lives in codec.py.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import msgpack

from hmoe.runtime.codec import (
    MAX_LIST_LEN,
    PACKED,
    ProtocolError,
    Range,
    record_decoder,
    record_encoder,
)
from hmoe.runtime.sampling_params import FinishReason, SamplingParams

VERSION = 3  # what this side speaks
MIN_VERSION = 3  # the oldest peer version this side reads (3: Adopt carries prompt_len, not the prompt's ids;
# Prefilled, Usage, WorkerPing and WorkerStatus gained the prefix cache's fields)
MAX_MESSAGE_BYTES = 4 << 20  # a 128K-token prompt as ids is 0.5 MB; text prompts are capped by this
REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}\Z")

Count = Annotated[int, Range(0)]
TokenId = Annotated[int, Range(0, 2**32 - 1)]
Ids = Annotated[Sequence[int], PACKED]  # token ids: any sequence of ints when built, TokenIds when decoded
RequestId = Annotated[str, REQUEST_ID]
Version = Annotated[int, Range(1)]
TopLogprob = tuple[TokenId, float]  # [token id, its logprob]
TokenLogprob = tuple[float, list[TopLogprob]]  # [the sampled token's logprob, the most likely alternatives]

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


def record(cls):
    """A frozen slotted dataclass that rides inside messages (a msgpack map, evolved as messages are)."""
    return dataclass(frozen=True, slots=True)(cls)


# -- records ----------------------------------------------------------------------------------------


@record
class Usage:
    prompt_tokens: Count
    output_tokens: Count
    ttft_s: float | None = None  # arrival at the router -> first token
    tpot_s: float | None = None  # mean time per output token after the first
    queue_s: float | None = None  # arrival at the router -> sent to a prefill worker
    cached_tokens: Count = 0  # prompt tokens whose KV the prefix cache had (not prefilled again)


@record
class PrefixStats:
    """A prefill worker's prefix cache: its size, and its lookups since the worker started (in tokens)."""

    cached_tokens: Count
    capacity_tokens: Count
    query_tokens: Count  # prompt tokens looked up
    hit_tokens: Count  # of those, found cached


@record
class Failure:
    """Why a request failed after it started (Finished.error): a stable code and what to do."""

    code: str
    message: str


@record
class ModelInfo:
    """What a worker serves (Register.model); the router checks prompts against it."""

    name: str
    vocab_size: Count
    eos_token_ids: list[Count]
    max_position_embeddings: Count


@record
class TokenItem:
    """One request's token of a decode step."""

    request_id: RequestId
    token: TokenId
    finish_reason: FinishReason | None = None  # set on the request's last token


@record
class WorkerStatus:
    worker_id: str
    role: str
    pid: int
    device: str
    model: str
    max_batch: int
    kv_capacity_tokens: int
    kv_reserved_tokens: int  # what the router reserved there (prompt + max_tokens per request, in whole blocks)
    kv_free_tokens: int  # what the worker last reported free
    running: int
    waiting: int
    requests: int
    busy: str | None  # prefill: the request it is running
    draining: bool
    last_seen_s: float  # seconds since its last message
    uptime_s: float
    steps: int = 0  # engine steps since the worker started (its last heartbeat)
    step_s: float = 0.0  # their total time
    prefix: PrefixStats | None = None  # a prefill worker's prefix cache, as its last heartbeat said


@record
class KVStatus:
    """KV cache of the decode workers, in tokens."""

    capacity_tokens: int
    used_tokens: int  # reserved by the router
    free_tokens_reported: int  # free as the workers last reported it


@record
class Throughput:
    tokens_per_s: float
    window_s: float
    finished: dict[str, int]  # finish_reason -> requests finished since start


# -- client <-> router ----------------------------------------------------------------------------


@message("generate")
class Generate:
    """Start a request. Exactly one of prompt / token_ids; the client makes request_id."""

    request_id: RequestId
    prompt: str | None = None
    token_ids: Ids | None = None
    params: SamplingParams = SamplingParams()
    stream: bool = True
    timeout_s: float | None = None  # deadline from arrival; the request ends with "timeout"


@message("cancel")
class Cancel:
    request_id: RequestId


@message("ping")
class Ping:
    """Liveness both ways: clients with requests in flight and workers send it; the router answers Pong."""

    sent_s: float = 0.0
    request_ids: list[RequestId] = field(default_factory=list)  # the client's requests in flight: which are unknown?


@message("pong")
class Pong:
    sent_s: float = 0.0
    unknown: list[RequestId] = field(default_factory=list)  # of Ping.request_ids, those this router does not hold
    incarnation: str = ""  # the router process that answers (a new one after a restart)


@message("status_request")
class StatusRequest:
    pass


@message("status")
class Status:
    workers: list[WorkerStatus]
    queued: Count
    running: Count
    kv: KVStatus
    throughput: Throughput
    draining: bool = False
    incarnation: str = ""


@message("delta")
class Delta:
    """New tokens of a streaming request and the text they complete (UTF-8-safe)."""

    request_id: RequestId
    token_ids: Ids
    text: str
    logprobs: list[TokenLogprob | None] | None = None  # asked for (params.logprobs): per token
    incarnation: str = ""


@message("finished")
class Finished:
    request_id: RequestId
    finish_reason: Literal["stop", "length", "cancelled", "timeout", "error"]
    token_ids: Ids  # every generated token (the non-streaming answer)
    text: str
    usage: Usage
    error: Failure | None = None  # when finish_reason is "error"
    logprobs: list[TokenLogprob | None] | None = None  # asked for: per generated token, as in Delta
    incarnation: str = ""


@message("error")
class Error:
    """A refusal or failure with a stable code; request_id is None when the frame had none."""

    code: str
    message: str
    request_id: RequestId | None = None
    incarnation: str = ""


# -- router <-> workers -----------------------------------------------------------------------------


@message("register")
class Register:
    """A worker is ready to serve (weights attached, kernels compiled), speaking protocol versions
    min_version..max_version; the router answers Registered or refuses with Error."""

    worker_id: str
    role: str  # "prefill" | "decode"
    pid: Annotated[int, Range(1)]
    device: str
    model: ModelInfo
    kv_capacity_tokens: Count
    max_batch: Annotated[int, Range(1)]
    min_version: Version = MIN_VERSION
    max_version: Version = VERSION
    kv_block_size: Annotated[int, Range(1)] = 1  # its KV pool's block: a request takes whole blocks


@message("registered")
class Registered:
    """The router took a worker's Register; `version` is the protocol version they agreed on."""

    worker_id: str
    version: Version
    incarnation: str = ""  # the router process that took the registration


@message("worker_ping")
class WorkerPing:
    """Worker heartbeat with its load; the router answers WorkerPong."""

    worker_id: str
    kv_free_tokens: Count
    running: Count
    waiting: Count = 0
    steps: Count = 0  # engine steps (forward passes) since the worker started
    step_s: Annotated[float, Range(0)] = 0.0  # their total time: the mean step time is a rate of the two
    prefix: PrefixStats | None = None  # a prefill worker with a prefix cache


@message("worker_pong")
class WorkerPong:
    incarnation: str = ""  # the router process that answers: a worker registers again when it changes


@message("prefill")
class Prefill:
    request_id: RequestId
    token_ids: Ids
    params: SamplingParams
    interleave: bool = False  # run it between the layers of the prompt the worker is prefilling (it is short)


@message("prefilled")
class Prefilled:
    """The prompt's KV sits in hand-off slot `slot` of `segment` (a handle, not data); first token
    sampled. slot -1: the first token ended the request (finish_reason says why), no KV was kept."""

    request_id: RequestId
    first_token: TokenId
    slot: Annotated[int, Range(-1)]
    segment: str
    prompt_len: Count
    finish_reason: FinishReason | None = None
    logprobs: TokenLogprob | None = None  # asked for: the first token's
    generation: Annotated[int, Range(-1)] = -1  # the slot's fill (HandoffPool generation); -1: no slot
    cached_tokens: Count = 0  # of the prompt, tokens the prefix cache had


@message("adopt")
class Adopt:
    """Decode worker: take a prefilled request (copy its KV from the slot, free the slot). The prompt's ids
    stay with the router: the decode worker needs only their count."""

    request_id: RequestId
    prompt_len: Annotated[int, Range(1)]  # tokens of KV the slot holds
    first_token: TokenId
    slot: Count
    segment: str
    params: SamplingParams
    generation: Annotated[int, Range(-1)] = -1  # the fill Prefilled named: a slot refilled since is handoff_lost


@message("tokens")
class Tokens:
    """One decode step's output: a token for every running request."""

    items: list[TokenItem]
    logprobs: list[TokenLogprob | None] | None = None  # when any request asked: per item (None: not asked)


@message("request_error")
class RequestError:
    """A worker could not run one request (e.g. KV capacity); others are unaffected."""

    request_id: RequestId
    code: str
    message: str


@message("drain")
class Drain:
    """Stop admitting; finish or cancel running requests within grace_s; then exit."""

    grace_s: Annotated[float, Range(0)]


# -- codec ------------------------------------------------------------------------------------------


def encode(msg) -> bytes:
    body = {"v": VERSION, "t": msg.TAG}
    body.update(record_encoder(type(msg))(msg))
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
            max_bin_len=MAX_MESSAGE_BYTES,
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
    version = body.get("v")
    if type(version) is not int:
        raise ProtocolError("version_mismatch", f"the frame carries no protocol version (got {version!r})")
    if version < MIN_VERSION:
        raise ProtocolError(
            "version_too_old", f"protocol version {version} is older than {MIN_VERSION}: upgrade the sender"
        )
    tag = body.get("t")
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None or (allowed is not None and cls not in allowed):
        raise ProtocolError("unknown_message", f"unknown or unexpected message type {tag!r}")
    return record_decoder(cls)(body)
