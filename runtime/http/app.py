"""The OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions, /v1/completions, /v1/models,
/health, /metrics — a client of the router like the SDK, no torch.

A request: body checked (schema.py) → chat messages rendered with the model's template and tokenized
here (so special tokens are never added twice and usage counts exactly what ran) → n requests to the
router (seed + i) → their pieces as one JSON answer or as server-sent events in OpenAI's shape (a
first delta with the role, text deltas, a delta with finish_reason, with stream_options.include_usage
a last chunk with `choices: []` and usage, then `data: [DONE]`). Errors are `{"error": {message, type,
code, param}}`: 400 for invalid input, 429 + Retry-After for queue_full, 503 for no_worker/draining;
once a stream has begun, a failure is an error event in it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hmoe.runtime.client import AsyncClient, RouterError, RouterUnreachable
from hmoe.runtime.errors import HmoeError
from hmoe.runtime.http import choices as ch
from hmoe.runtime.http.chat_template import ChatTemplate
from hmoe.runtime.http.format import ChatFormat, CompletionFormat, usage_of
from hmoe.runtime.http.logprobs import TokenText
from hmoe.runtime.http.metrics import Metrics
from hmoe.runtime.http.reasoning import END, START, opens_reasoning
from hmoe.runtime.http.schema import ApiError, Sampling, bad, parse_chat, parse_completion
from hmoe.runtime.protocol import MAX_MESSAGE_BYTES
from hmoe.runtime.worker_pool import ROLES, roles_served

if TYPE_CHECKING:
    from tokenizers import Tokenizer

log = structlog.get_logger("hmoe.http")

STATUS_OF = {
    "queue_full": 429,
    "no_worker": 503,
    "draining": 503,
    "router_unreachable": 503,
    "server_shutdown": 503,
    "shutting_down": 503,
    "worker_lost": 503,
    "handoff_lost": 503,
    "model_not_found": 404,
    "cancelled": 499,
}
RETRY_AFTER_S = 1
MAX_BODY_BYTES = 4 * MAX_MESSAGE_BYTES  # JSON spells token ids longer than msgpack
HEALTH_TIMEOUT_S = 2.0


@dataclass
class Gateway:
    """What the routes share: the router client, the model's tokenizer and template, metrics."""

    client: AsyncClient
    tokenizer: Tokenizer
    template: ChatTemplate | None
    model_name: str
    context_len: int  # max_position_embeddings (0: unknown)
    max_n: int = 16
    default_max_tokens: int = 2048
    metrics: Metrics = field(init=False)
    reasoning: bool = field(init=False)  # the vocabulary has the think markers as tokens
    token_text: TokenText = field(init=False)
    kv_capacity: int = 0  # the decode worker's KV tokens, from the last Status
    status_s: float = -1e9

    def __post_init__(self) -> None:
        self.metrics = Metrics(self.model_name)
        self.reasoning = all(self.tokenizer.token_to_id(m) is not None for m in (START, END))
        self.token_text = TokenText(self.tokenizer)

    async def status(self, timeout_s: float = HEALTH_TIMEOUT_S) -> dict | None:
        try:
            status = await asyncio.wait_for(self.client.status(), timeout_s)
        except (RouterUnreachable, TimeoutError):
            return None
        self.status_s = time.monotonic()
        decode = [w["kv_capacity_tokens"] for w in status["workers"] if w["role"] == "decode"]
        self.kv_capacity = max(decode, default=0)
        return status

    async def max_tokens(self, sampling: Sampling, prompt_len: int) -> int:
        """The request's max_tokens, or (none given) default_max_tokens within what the context and the
        decode worker's KV cache leave (the router reserves prompt + max_tokens of KV up front)."""
        if sampling.max_tokens is not None:
            return sampling.max_tokens
        if time.monotonic() - self.status_s > 5.0:
            await self.status()
        room = [x - prompt_len for x in (self.context_len, self.kv_capacity) if x]
        return max(min([self.default_max_tokens, *room]), 1)


def error_response(exc: ApiError | RouterError) -> JSONResponse:
    status = getattr(exc, "status", None) or STATUS_OF.get(exc.code, 400)
    kind = "invalid_request_error" if status < 500 and status != 429 else "server_error"
    body = {"error": {"message": exc.message, "type": kind, "code": exc.code, "param": getattr(exc, "param", None)}}
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="hmoe", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gateway = gateway

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(RouterError)
    async def _router_error(request: Request, exc: RouterError):
        return error_response(exc)

    @app.exception_handler(RouterUnreachable)
    async def _unreachable(request: Request, exc: RouterUnreachable):
        return error_response(ApiError(503, exc.code, exc.message))

    @app.exception_handler(StarletteHTTPException)
    async def _no_route(request: Request, exc: StarletteHTTPException):  # 404 / 405, in OpenAI's shape
        where = f"{request.method} {request.url.path}"
        return error_response(ApiError(exc.status_code, "invalid_request", f"{where}: {exc.detail}"))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("request_failed", path=request.url.path)
        return error_response(
            ApiError(500, "internal_error", f"{type(exc).__name__}: the HTTP API failed (see its log)")
        )

    @app.get("/v1/models")
    async def models():
        card = {"id": gateway.model_name, "object": "model", "created": 0, "owned_by": "hmoe"}
        return {"object": "list", "data": [card | {"max_model_len": gateway.context_len or None}]}

    @app.get("/health")
    async def health():
        status = await gateway.status()
        if status is None:
            return JSONResponse({"status": "unhealthy", "reason": "the router does not answer"}, status_code=503)
        roles = {r for w in status["workers"] for r in roles_served(w["role"])}
        missing = sorted(set(ROLES) - roles)
        if missing or status["draining"]:
            reason = "draining" if status["draining"] else f"no {' or '.join(missing)} worker registered"
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return {"status": "healthy", "workers": len(status["workers"])}

    @app.get("/metrics")
    async def metrics():
        gateway.metrics.router_status(await gateway.status())
        return Response(gateway.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        arrival_s = time.monotonic()
        body = await _json(request)
        _check_model(body, gateway)
        chat = parse_chat(body, gateway.max_n)
        if gateway.template is None:
            raise bad(
                "chat_template_missing", "this model has no chat template: use /v1/completions or --chat-template"
            )
        text = gateway.template.render(chat.messages, chat.add_generation_prompt, **chat.template_kwargs)
        token_ids = gateway.tokenizer.encode(text, add_special_tokens=False).ids
        opened = gateway.reasoning and opens_reasoning(text)
        tokens = gateway.token_text if chat.sampling.logprobs is not None else None
        fmt = ChatFormat(f"chatcmpl-{uuid.uuid4().hex}", gateway.model_name, gateway.reasoning, opened, tokens)
        return await _serve(request, gateway, fmt, [token_ids], chat.sampling, arrival_s)

    @app.post("/v1/completions")
    async def completions(request: Request):
        arrival_s = time.monotonic()
        body = await _json(request)
        _check_model(body, gateway)
        req = parse_completion(body, gateway.max_n)
        prompts = [p if isinstance(p, list) else gateway.tokenizer.encode(p).ids for p in req.prompts]
        if any(not p for p in prompts):
            raise bad("invalid_prompt", "the prompt is empty", "prompt")
        tokens = gateway.token_text if req.sampling.logprobs is not None else None
        fmt = CompletionFormat(f"cmpl-{uuid.uuid4().hex}", gateway.model_name, tokens)
        return await _serve(request, gateway, fmt, prompts, req.sampling, arrival_s)

    return app


async def _json(request: Request):
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise ApiError(413, "message_too_large", f"the body of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad("invalid_request", f"the body is not JSON: {exc}") from None


def _check_model(body, gateway: Gateway) -> None:
    model = body.get("model") if isinstance(body, dict) else None
    if model is not None and model != gateway.model_name:
        raise ApiError(
            404, "model_not_found", f"model {model!r} is not served here; this serves {gateway.model_name!r}", "model"
        )


async def _serve(request: Request, gateway: Gateway, fmt, prompts: list[list[int]], sampling: Sampling, arrival_s):
    """Start n choices per prompt, then answer as JSON or as a stream of events."""
    started: list[ch.Choice] = []
    try:
        for p, token_ids in enumerate(prompts):
            max_tokens = await gateway.max_tokens(sampling, len(token_ids))
            for i in range(sampling.n):
                kwargs = sampling.generate_kwargs(i, max_tokens)
                index = p * sampling.n + i
                started.append(ch.Choice(gateway.client, index, token_ids, kwargs, arrival_s, gateway.metrics))
        await ch.until_disconnected(request, ch.start(started))
    except BaseException:
        await ch.close_all(started)
        raise
    if sampling.stream:
        return StreamingResponse(_events(fmt, started, sampling), media_type="text/event-stream")
    try:
        done = await ch.until_disconnected(request, _collect(started))
    finally:
        await ch.close_all(started)
    return fmt.response(done, prompts, sampling.n)


async def _collect(started: list[ch.Choice]):
    return await asyncio.gather(*(c.collect() for c in started))  # all at once: each piece timed as it comes


async def _events(fmt, started: list[ch.Choice], sampling: Sampling) -> AsyncIterator[str]:
    """The SSE body. A client that disconnects cancels this generator: every choice is closed upstream."""
    try:
        for choice in started:
            if (first := fmt.first_chunk(choice.index)) is not None:
                yield _sse(fmt.with_usage(first, sampling.include_usage))
        async for piece in ch.merge(started):
            if piece.error is not None:
                yield _sse(_error_body(piece.error))
                break
            for chunk in fmt.piece_chunks(piece, started[piece.index].result):
                yield _sse(fmt.with_usage(chunk, sampling.include_usage))
        else:
            if sampling.include_usage:
                yield _sse(fmt.usage_chunk(usage_of([c.result for c in started], sampling.n)))
        yield "data: [DONE]\n\n"
    finally:
        await ch.close_all(started)


def _error_body(exc: HmoeError) -> dict:
    return {"error": {"message": exc.message, "type": "server_error", "code": exc.code, "param": None}}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"
