"""Request bodies of the HTTP API: every supported field parsed, every refused one named in a 400."""

from __future__ import annotations

import pytest

from hmoe.runtime.error_codes import ERROR_CODES
from hmoe.runtime.http.schema import NEUTRAL, ApiError, parse_chat, parse_completion

USER = [{"role": "user", "content": "Hi"}]


def refused(parse, body: dict) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, 8)
    assert info.value.status == 400 and info.value.code in ERROR_CODES and info.value.message
    return info.value


def test_chat_fields_are_parsed_into_sampling_and_messages():
    chat = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None, "reasoning_content": "thought"},
                {"role": "user", "content": "c", "name": "bob"},
            ],
            "max_completion_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": -1,
            "seed": 3,
            "stop": "x",
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logprobs": True,
            "top_logprobs": 2,
            "ignore_eos": True,
            "chat_template_kwargs": {"thinking": True},
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "response_format": {"type": "text"},
            "tools": [],
            "tool_choice": "none",
            "user": "u1",
        },
        8,
    )
    s = chat.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop, s.n) == (7, 0.5, 0.9, 0, 3, ("x",), 2)
    assert s.stream and s.include_usage and s.logprobs == 2 and s.ignore_eos
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "user"]
    assert chat.messages[1]["content"] == "a\nb" and chat.messages[2]["content"] == ""
    assert chat.messages[3] == {"role": "user", "content": "c", "name": "bob"}
    assert chat.messages[2]["reasoning_content"] == chat.messages[2]["reasoning"] == "thought"
    assert chat.template_kwargs == {"thinking": True} and chat.add_generation_prompt
    assert s.generate_kwargs(1, 7)["seed"] == 4 and s.generate_kwargs(0, 7)["stop"] == ["x"]


def test_defaults_follow_openai():
    chat = parse_chat({"messages": USER}, 8).sampling
    assert chat.max_tokens is None and chat.temperature == 1.0 and chat.n == 1 and not chat.stream
    assert chat.logprobs is None and chat.seed is None
    completion = parse_completion({"prompt": "x"}, 8).sampling
    assert completion.max_tokens == 16 and completion.logprobs is None
    assert parse_chat({"messages": USER, "max_tokens": 5}, 8).sampling.max_tokens == 5
    assert parse_chat({"messages": USER, "logprobs": True}, 8).sampling.logprobs == 0


@pytest.mark.parametrize(
    "field, value",
    [
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "auto"),
        ("response_format", {"type": "json_object"}),
        ("logit_bias", {"5": 10}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -1),
        ("functions", [{"name": "f"}]),
        ("best_of", 3),
        ("min_tokens", 4),
        ("echo", True),
        ("suffix", "s"),
        ("parallel_tool_calls", True),
        ("bogus", 1),
    ],
)
def test_unsupported_fields_are_refused_by_name(field, value):
    for parse, body in ((parse_chat, {"messages": USER}), (parse_completion, {"prompt": "p"})):
        err = refused(parse, {**body, field: value})
        assert err.code == "unsupported_field" and err.param == field and field in err.message


def test_every_neutral_value_is_accepted():
    for field, value in NEUTRAL.items():
        parse_chat({"messages": USER, field: value}, 8)


@pytest.mark.parametrize(
    "body, code, param",
    [
        ({"messages": []}, "invalid_request", "messages"),
        ({"messages": "hi"}, "invalid_request", "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "invalid_request", "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "unsupported_field", "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "unsupported_field", None),
        ({"messages": [{"role": "user", "content": 5}]}, "invalid_request", "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "audio": 1}]}, "unsupported_field", "messages[0].audio"),
        ({"messages": USER, "max_tokens": 0}, "invalid_request", "max_tokens"),
        ({"messages": USER, "max_tokens": 3, "max_completion_tokens": 3}, "invalid_request", None),
        ({"messages": USER, "n": 0}, "invalid_request", "n"),
        ({"messages": USER, "n": 9}, "invalid_request", "n"),
        ({"messages": USER, "temperature": "hot"}, "invalid_sampling", "temperature"),
        ({"messages": USER, "temperature": 500}, "invalid_sampling", "temperature"),
        ({"messages": USER, "top_p": 0}, "invalid_sampling", "top_p"),
        ({"messages": USER, "seed": -1}, "invalid_sampling", "seed"),
        ({"messages": USER, "stop": 5}, "invalid_sampling", "stop"),
        ({"messages": USER, "stop": [""]}, "invalid_sampling", "stop"),
        ({"messages": USER, "stream_options": {"include_usage": True}}, "invalid_request", "stream_options"),
        ({"messages": USER, "stream": True, "stream_options": {"continuous_usage_stats": True}}, "unsupported_field",
         "stream_options.continuous_usage_stats"),
        ({"messages": USER, "top_logprobs": 2}, "invalid_request", "top_logprobs"),
        ({"messages": USER, "logprobs": True, "top_logprobs": 21}, "invalid_request", "top_logprobs"),
        ({"messages": USER, "chat_template_kwargs": {"messages": []}}, "invalid_request", "chat_template_kwargs"),
        ({"messages": USER, "stream": "yes"}, "invalid_request", "stream"),
    ],
)  # fmt: skip
def test_invalid_chat_bodies_get_a_400_naming_the_field(body, code, param):
    err = refused(parse_chat, body)
    assert err.code == code and (param is None or err.param == param), (err.code, err.param, err.message)


def test_completion_prompts_in_every_form():
    assert parse_completion({"prompt": "a"}, 8).prompts == ["a"]
    assert parse_completion({"prompt": ["a", "b"]}, 8).prompts == ["a", "b"]
    assert parse_completion({"prompt": [1, 2, 3]}, 8).prompts == [[1, 2, 3]]
    assert parse_completion({"prompt": [[1, 2], [3]]}, 8).prompts == [[1, 2], [3]]
    assert parse_completion({"prompt": "a", "logprobs": 3}, 8).sampling.logprobs == 3
    for bad_prompt in (None, [], [[]], [1, "a"], 5, [True]):
        assert refused(parse_completion, {"prompt": bad_prompt}).code == "invalid_prompt"
    assert refused(parse_completion, {"prompt": "a", "logprobs": True}).param == "logprobs"
    assert refused(parse_completion, [1, 2]).code == "invalid_request"
