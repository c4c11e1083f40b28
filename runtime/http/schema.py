"""The request bodies of /v1/chat/completions and /v1/completions, checked field by field at the edge.

A body becomes a `ChatRequest` or a `CompletionRequest` (plain frozen dataclasses) or an `ApiError`
400 with a stable code that names the field. Every field the OpenAI API defines is either supported
(SUPPORTED_*), accepted only at its no-op value (NEUTRAL: e.g. presence_penalty 0), or refused by
name; an unknown field is refused too, never silently ignored. Ranges that SamplingParams owns
(temperature, top_p, top_k, seed, stop limits) are checked there, once, and reported under the same
code (invalid_sampling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hmoe.runtime.errors import HmoeError
from hmoe.runtime.sampling_params import SamplingParams

MAX_TOP_LOGPROBS = 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's legacy default, which benchmark clients rely on

COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "n",
    "stream",
    "stream_options",
    "ignore_eos",
    "user",
    "logprobs",
}
SUPPORTED_CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "chat_template_kwargs"}
SUPPORTED_CHAT |= {"add_generation_prompt"}
SUPPORTED_COMPLETION = COMMON | {"prompt"}
# Accepted only at the value that changes nothing; any other value is refused by name.
NEUTRAL = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "logit_bias": None,
    "tools": None,
    "tool_choice": "none",
    "parallel_tool_calls": None,
    "functions": None,
    "function_call": "none",
    "response_format": {"type": "text"},
    "echo": False,
    "suffix": None,
    "best_of": 1,
    "min_tokens": 0,
    "store": False,
    "metadata": None,
    "service_tier": None,
    "include_stop_str_in_output": False,
    "skip_special_tokens": True,
}
MESSAGE_ROLES = ("system", "developer", "user", "assistant")
MESSAGE_FIELDS = {"role", "content", "name", "reasoning_content", "reasoning"}


class ApiError(HmoeError):
    """An HTTP error reply: status, stable code, message (and the offending field, when one is)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None):
        super().__init__(code, message)
        self.status, self.param = status, param


def bad(code: str, message: str, param: str | None = None) -> ApiError:
    return ApiError(400, code, message, param)


@dataclass(frozen=True)
class Sampling:
    """What every request shares: how to sample, how many choices, how to stream."""

    max_tokens: int | None  # None: as much as the context and the KV cache allow
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and k alternatives

    def generate_kwargs(self, index: int, max_tokens: int) -> dict:
        """AsyncClient.generate arguments of choice `index` (seed + index, so n choices differ)."""
        return dict(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=None if self.seed is None else (self.seed + index) % 2**63,
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=self.logprobs,
        )


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict]  # role + content as plain strings, ready for the template
    sampling: Sampling
    template_kwargs: dict = field(default_factory=dict)
    add_generation_prompt: bool = True


@dataclass(frozen=True)
class CompletionRequest:
    prompts: list[str | list[int]]  # each a text or token ids
    sampling: Sampling


def parse_chat(body, max_n: int) -> ChatRequest:
    body = _object(body)
    _refuse_unknown(body, SUPPORTED_CHAT)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise bad("invalid_request", "give max_completion_tokens or max_tokens, not both", "max_completion_tokens")
    top = body.get("top_logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise bad("invalid_request", f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs")
    logprobs = _typed(body, "logprobs", bool, False)
    if top is not None and not logprobs:
        raise bad("invalid_request", "top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    sampling = _sampling(body, max_tokens, (top or 0) if logprobs else None, max_n)
    kwargs = _typed(body, "chat_template_kwargs", dict, {})
    if any(not isinstance(k, str) or k in ("messages", "add_generation_prompt") for k in kwargs):
        raise bad(
            "invalid_request", "chat_template_kwargs keys must be strings other than messages", "chat_template_kwargs"
        )
    add_generation_prompt = _typed(body, "add_generation_prompt", bool, True)
    return ChatRequest(_messages(body.get("messages")), sampling, kwargs, add_generation_prompt)


def parse_completion(body, max_n: int) -> CompletionRequest:
    body = _object(body)
    _refuse_unknown(body, SUPPORTED_COMPLETION)
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_TOP_LOGPROBS):
        raise bad("invalid_request", f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
    max_tokens = body.get("max_tokens", COMPLETIONS_DEFAULT_MAX_TOKENS)
    return CompletionRequest(_prompts(body.get("prompt")), _sampling(body, max_tokens, logprobs, max_n))


def _object(body) -> dict:
    if not isinstance(body, dict):
        raise bad("invalid_request", "the body must be a JSON object")
    return body


def _refuse_unknown(body: dict, supported: set[str]) -> None:
    for name, value in body.items():
        if name in supported:
            continue
        if name in NEUTRAL:
            if (
                value is None
                or value == NEUTRAL[name]
                or (name in ("tools", "functions", "logit_bias", "metadata") and not value)
            ):
                continue
            raise bad("unsupported_field", f"{name} = {_short(value)} is not supported by hmoe; drop it", name)
        raise bad("unsupported_field", f"unknown field {name!r}: hmoe does not support it", name)


def _sampling(body: dict, max_tokens, logprobs: int | None, max_n: int) -> Sampling:
    if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 1):
        raise bad("invalid_request", f"max_tokens must be an integer >= 1, got {_short(max_tokens)}", "max_tokens")
    n = body.get("n")
    n = 1 if n is None else n
    if not _is_int(n) or not 1 <= n <= max_n:
        raise bad("invalid_request", f"n must be an integer in [1, {max_n}], got {_short(n)}", "n")
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)):
        raise bad("invalid_sampling", "stop must be a string or a list of strings", "stop")
    stream = _typed(body, "stream", bool, False)
    options = _typed(body, "stream_options", dict, {})
    if options and not stream:
        raise bad("invalid_request", "stream_options needs stream: true", "stream_options")
    if set(options) - {"include_usage"}:
        name = sorted(set(options) - {"include_usage"})[0]
        raise bad("unsupported_field", f"stream_options.{name} is not supported", f"stream_options.{name}")
    values = {
        "temperature": _number(body, "temperature", 1.0),
        "top_p": _number(body, "top_p", 1.0),
        "top_k": _int_or(body, "top_k", 0, allow_minus_one=True),
        "seed": body.get("seed"),
        "stop": tuple(stop),
        "stop_token_ids": tuple(_typed(body, "stop_token_ids", list, [])),
        "ignore_eos": body.get("ignore_eos", False),
    }
    try:  # SamplingParams owns the ranges; checked here so a bad value is a 400 naming the field
        SamplingParams(max_tokens=max_tokens or 1, **values)
    except HmoeError as exc:
        raise bad(exc.code, exc.message, exc.message.split(":", 1)[0]) from None
    include_usage = _typed(options, "include_usage", bool, False)
    return Sampling(max_tokens, n=n, stream=stream, include_usage=include_usage, logprobs=logprobs, **values)


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("invalid_request", "messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad("invalid_request", f"{where} must be an object", where)
        role = message.get("role")
        if role in ("tool", "function") or "tool_calls" in message or "tool_call_id" in message:
            raise bad("unsupported_field", f"{where}: tool calls and tool messages are not supported", where)
        if role not in MESSAGE_ROLES:
            raise bad("invalid_request", f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}", f"{where}.role")
        extra = sorted(set(message) - MESSAGE_FIELDS)
        if extra:
            raise bad("unsupported_field", f"{where}.{extra[0]} is not supported", f"{where}.{extra[0]}")
        plain = {"role": "system" if role == "developer" else role, "content": _content(message, where)}
        if isinstance(message.get("name"), str):
            plain["name"] = message["name"]
        reasoning = message.get("reasoning_content", message.get("reasoning"))
        if reasoning is not None:
            if not isinstance(reasoning, str):
                raise bad("invalid_request", f"{where}.reasoning_content must be a string", where)
            plain["reasoning_content"] = plain["reasoning"] = reasoning  # templates read either name
        out.append(plain)
    return out


def _content(message: dict, where: str) -> str:
    """A string, or the text parts of an OpenAI list-of-parts content, joined."""
    content = message.get("content")
    if content is None and message["role"] == "assistant":
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad("invalid_request", f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise bad(
                "unsupported_field",
                f"{where}.content[{j}]: only text parts are supported, got {kind!r}",
                f"{where}.content[{j}]",
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _prompts(prompt) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_int(t) for t in prompt):
            return [list(prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
            return [list(p) for p in prompt]
    raise bad("invalid_prompt", "prompt must be a string, a list of strings or a list of token ids", "prompt")


def _typed(body: dict, name: str, kind: type, default):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise bad("invalid_request", f"{name} must be a {kind.__name__}, got {_short(value)}", name)
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad("invalid_sampling", f"{name} must be a number, got {_short(value)}", name)
    return float(value)


def _int_or(body: dict, name: str, default: int, allow_minus_one: bool = False) -> int:
    value = body.get(name)
    if value is None or (allow_minus_one and value == -1):  # vLLM's spelling of "no top-k"
        return default
    if not _is_int(value):
        raise bad("invalid_sampling", f"{name} must be an integer, got {_short(value)}", name)
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
