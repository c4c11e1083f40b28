"""End to end through the OpenAI-compatible HTTP API, as a user's client sees it: the official `openai`
package against a real `hmoe serve` (hmoe-http, router, prefill and decode worker processes on the
tiny DeepSeek-style model with its own chat template, CPU, real shared memory). Nothing faked."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest
from helpers.net import free_port
from helpers.serve import Served, serve
from prometheus_client.parser import text_string_to_metric_families

from hmoe.runtime.client import status_once
from hmoe.runtime.http.chat_template import ChatTemplate
from hmoe.runtime.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow
PACK = "http-test"
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


class HttpServed:
    """`hmoe serve` with its HTTP API on (tests/helpers/serve.py) and an openai client of it."""

    def __init__(self, base: Served, url: str, model_dir: Path):
        self.base, self.endpoint, self.url, self.model_dir = base, base.endpoint, url, model_dir
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)

    def wait_kv_free(self) -> None:
        """Nothing running and every KV block of the decode worker free again (its heartbeat's word)."""
        self.base.wait_kv_free(timeout_s=15.0)

    def metrics(self) -> dict:
        """Every sample's value summed over its labels (buckets aside), by sample name."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        sums: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if not s.name.endswith(("_created", "_bucket")):
                    sums[s.name] = sums.get(s.name, 0.0) + s.value
        return sums


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    http_port, model_dir = free_port(), tiny_models("deepseek_v3", "fp32")
    env = {"HMOE_HTTP_PORT": str(http_port), "HMOE_ROUTER_DRAIN_GRACE_S": "10", "HMOE_ROUTER_CLIENT_TIMEOUT_S": "10"}
    for base in serve(model_dir, tmp_path_factory.mktemp("http"), PACK, "OpenAI-compatible API at", **env):
        yield HttpServed(base, f"http://127.0.0.1:{http_port}", model_dir)


def prompt_ids(served: HttpServed, messages: list[dict], **kwargs) -> list[int]:
    files = {n: (served.model_dir / n).read_bytes() for n in ("tokenizer_config.json",)}
    text = ChatTemplate.from_files(files).render(messages, True, **kwargs)
    return load_tokenizer(served.model_dir).encode(text, add_special_tokens=False).ids


def test_chat_streaming_and_not_agree_with_exact_usage(served):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    whole = served.client.chat.completions.create(model=PACK, messages=messages, max_tokens=8, **GREEDY)
    choice = whole.choices[0]
    assert whole.id.startswith("chatcmpl-") and whole.model == PACK and whole.object == "chat.completion"
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    assert whole.usage.prompt_tokens == len(prompt_ids(served, messages)) and whole.usage.completion_tokens == 8
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 8

    chunks = list(
        served.client.chat.completions.create(
            model=PACK, messages=messages, max_tokens=8, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.id == chunks[0].id for c in chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, 8)
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens  # the same prompt again: cached
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + ["length"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == choice.message.content
    assert all(c.usage is None for c in chunks[:-1]) and chunks[1].object == "chat.completion.chunk"


def test_completions_from_text_and_token_ids_streaming_and_not(served):
    tokenizer = load_tokenizer(served.model_dir)
    text = served.client.completions.create(model=PACK, prompt="The quick brown fox", max_tokens=6, **GREEDY)
    ids = tokenizer.encode("The quick brown fox").ids  # with the BOS, as a text prompt gets it
    by_ids = served.client.completions.create(model=PACK, prompt=ids, max_tokens=6, **GREEDY)
    assert text.choices[0].text == by_ids.choices[0].text and text.choices[0].finish_reason == "length"
    assert text.usage.prompt_tokens == len(ids) and text.usage.completion_tokens == 6
    streamed = served.client.completions.create(model=PACK, prompt=ids, max_tokens=6, stream=True, **GREEDY)
    pieces = list(streamed)
    assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length" and pieces[0].id.startswith("cmpl-")
    several = served.client.completions.create(
        model=PACK, prompt=["The quick brown fox", "Hello"], max_tokens=6, **GREEDY
    )
    assert [c.index for c in several.choices] == [0, 1] and several.choices[0].text == text.choices[0].text
    assert several.usage.prompt_tokens == len(ids) + len(tokenizer.encode("Hello").ids)


def test_stop_n_and_seeds(served):
    base = served.client.completions.create(model=PACK, prompt="Hello world", max_tokens=20, **GREEDY)
    stop = base.choices[0].text[6:9]
    cut = served.client.completions.create(model=PACK, prompt="Hello world", max_tokens=20, stop=[stop], **GREEDY)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == base.choices[0].text.split(stop)[0]

    def sampled(seed: int):
        answer = served.client.chat.completions.create(
            model=PACK, messages=[{"role": "user", "content": "Tell a story"}], max_tokens=12, n=2, seed=seed,
            temperature=1.0, extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert [c.index for c in answer.choices] == [0, 1] and answer.usage.completion_tokens == 24
        return [c.message.content for c in answer.choices]

    first, again, other = sampled(7), sampled(7), sampled(8)
    assert first == again and first[0] != first[1]  # choice i samples with seed + i
    assert first[1] == other[0]  # so seed 7's second choice is seed 8's first


def test_thinking_template_splits_reasoning_from_content(served):
    user = [{"role": "user", "content": "What is 2+2?"}]
    think = {"ignore_eos": True, "chat_template_kwargs": {"thinking": True}}
    thinking = served.client.chat.completions.create(
        model=PACK, messages=user, max_tokens=8, extra_body=think, temperature=0.0
    )
    message = thinking.choices[0].message
    # The template opened <think> in the prompt; the random model never closes it: all of it is reasoning.
    assert message.reasoning_content and not message.content
    assert thinking.usage.prompt_tokens == len(prompt_ids(served, user, thinking=True))
    plain = served.client.chat.completions.create(model=PACK, messages=user, max_tokens=8, **GREEDY)
    assert plain.choices[0].message.content and plain.choices[0].message.reasoning_content is None
    stream = served.client.chat.completions.create(
        model=PACK, messages=user, max_tokens=8, stream=True, temperature=0.0, extra_body=think
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == message.reasoning_content
    assert not "".join(d.content or "" for d in deltas)


def test_logprobs_streaming_and_not(served):
    messages = [{"role": "user", "content": "Count with me"}]
    asked = dict(model=PACK, messages=messages, max_tokens=6, logprobs=True, top_logprobs=3, **GREEDY)
    whole = served.client.chat.completions.create(**asked).choices[0].logprobs.content
    assert len(whole) == 6
    for entry in whole:  # greedy: the picked token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.token == entry.top_logprobs[0].token
        assert entry.logprob == entry.top_logprobs[0].logprob <= 0 and bytes(entry.bytes).decode(errors="replace")
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
    streamed = [
        e for c in served.client.chat.completions.create(**asked, stream=True) if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]  # fmt: skip
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in whole]
    plain = served.client.chat.completions.create(model=PACK, messages=messages, max_tokens=6, **GREEDY)
    assert plain.choices[0].logprobs is None
    completion = served.client.completions.create(model=PACK, prompt="Count", max_tokens=4, logprobs=2, **GREEDY)
    lp = completion.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4 and lp.text_offset[0] == 0
    assert all(len(top) <= 2 and max(top.values()) == v for top, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_a_client_that_disconnects_mid_stream_frees_its_kv(served):
    stream = served.client.completions.create(model=PACK, prompt="Go on and on", max_tokens=2000, stream=True, **GREEDY)
    got = [next(stream) for _ in range(3)]
    assert status_once(served.endpoint)["running"] == 1 and len(got) == 3
    stream.close()  # drops the connection
    served.wait_kv_free()


def test_32_concurrent_streams_equal_sequential_runs(served):
    prompts = [f"Request {i}: the fox {'jumps ' * (i % 5)}over {i * 7} dogs." for i in range(32)]
    sequential = [
        served.client.completions.create(model=PACK, prompt=p, max_tokens=6, **GREEDY).choices[0].text for p in prompts
    ]

    async def all_at_once():
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0, timeout=120)

        async def one(prompt: str) -> str:
            stream = await client.completions.create(model=PACK, prompt=prompt, max_tokens=6, stream=True, **GREEDY)
            return "".join([c.choices[0].text async for c in stream])

        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    assert asyncio.run(all_at_once()) == sequential
    served.wait_kv_free()


def test_metrics_move_and_errors_are_coded(served):
    before = served.metrics()
    served.client.chat.completions.create(
        model=PACK, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True, **GREEDY
    ).close()
    list(served.client.completions.create(model=PACK, prompt="Hi", max_tokens=5, stream=True, **GREEDY))
    after = served.metrics()
    label = 'model_name="' + PACK + '"'
    histograms = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "inter_token_latency_seconds",
                  "request_queue_time_seconds", "request_time_per_output_token_seconds")  # fmt: skip
    for histogram in histograms:
        key = f"hmoe:{histogram}_count"
        assert after[key] > before.get(key, 0), (key, label)
    assert after["hmoe:generation_tokens_total"] >= before.get("hmoe:generation_tokens_total", 0) + 5
    assert after["hmoe:request_success_total"] > before.get("hmoe:request_success_total", 0)
    assert after["hmoe:num_requests_waiting"] == 0
    deadline = time.monotonic() + 5
    while after["hmoe:kv_cache_usage_perc"] != 0.0 or after["hmoe:worker_steps_total"] <= before.get(
        "hmoe:worker_steps_total", 0
    ):  # the decode worker's next heartbeat: its KV free again, its steps counted
        assert time.monotonic() < deadline
        time.sleep(0.2)
        after = served.metrics()
    assert after["hmoe:worker_step_seconds_total"] > before.get("hmoe:worker_step_seconds_total", 0)

    with pytest.raises(openai.BadRequestError) as bad:
        served.client.chat.completions.create(
            model=PACK,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f"}}],
        )
    assert bad.value.status_code == 400 and bad.value.code == "unsupported_field" and bad.value.param == "tools"
    with pytest.raises(openai.BadRequestError) as long:
        served.client.completions.create(model=PACK, prompt="x", max_tokens=100_000)
    assert long.value.code in ("context_too_long", "kv_capacity")
    with pytest.raises(openai.NotFoundError) as missing:
        served.client.completions.create(model="gpt-4o", prompt="x")
    assert missing.value.code == "model_not_found"
    assert [m.id for m in served.client.models.list().data] == [PACK]
    for path, body, status, code in (("/v1/nothing", b"{}", 404, "invalid_request"),
                                     ("/v1/completions", b"{not json", 400, "invalid_request")):  # fmt: skip
        with pytest.raises(urllib.error.HTTPError) as raw:
            urllib.request.urlopen(urllib.request.Request(f"{served.url}{path}", body), timeout=10)
        assert raw.value.code == status and json.loads(raw.value.read())["error"]["code"] == code
    assert urllib.request.urlopen(f"{served.url}/health", timeout=10).status == 200


def test_a_repeated_long_system_prompt_is_reported_cached_and_counted(served):
    system = {"role": "system", "content": f"{uuid.uuid4().hex} " + "You answer in rhymes about rivers. " * 14}
    first, second = (
        served.client.chat.completions.create(
            model=PACK, messages=[system, {"role": "user", "content": question}], max_tokens=4, **GREEDY
        )
        for question in ("Where does the Rhine begin?", "And the Danube?")
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0.5 * second.usage.prompt_tokens < cached < second.usage.prompt_tokens  # the system prompt's blocks
    deadline, after = time.monotonic() + 5, served.metrics()
    while after.get("hmoe:prefix_cache_hits_total", 0) < cached:  # the prefill worker's next heartbeat
        assert time.monotonic() < deadline, after
        time.sleep(0.2)
        after = served.metrics()
    assert after["hmoe:prompt_tokens_cached_total"] >= cached
    assert after["hmoe:prefix_cache_queries_total"] >= first.usage.prompt_tokens + second.usage.prompt_tokens
    assert after["hmoe:prefix_cache_tokens"] >= cached


def test_a_worker_lost_mid_stream_is_an_error_event_then_health_recovers(served):
    decode_pid = next(w["pid"] for w in status_once(served.endpoint)["workers"] if w["role"] == "decode")
    stream = served.client.completions.create(model=PACK, prompt="Long", max_tokens=2000, stream=True, **GREEDY)
    next(stream)
    os.kill(decode_pid, signal.SIGKILL)
    with pytest.raises(openai.APIError) as lost:
        for _ in stream:
            pass
    assert "worker" in str(lost.value.message) and lost.value.code == "worker_lost"
    deadline = time.monotonic() + 120
    while True:  # hmoe serve restarts the worker; /health says 503 until it registers
        try:
            if urllib.request.urlopen(f"{served.url}/health", timeout=10).status == 200:
                break
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert (
        served.client.completions.create(model=PACK, prompt="Back", max_tokens=3, **GREEDY).usage.completion_tokens == 3
    )
