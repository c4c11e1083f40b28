"""Logprobs from the workers to the client: the router passes them through (only when asked), and the
HTTP API writes them in OpenAI's shapes with each token's exact bytes."""

from __future__ import annotations

from helpers.net import ByteTokenizer

from hmoe.runtime.config import RouterConfig
from hmoe.runtime.http.logprobs import TokenText, chat_logprobs, completion_logprobs
from hmoe.runtime.protocol import Delta, Finished, Generate, ModelInfo, Prefilled, Register, TokenItem, Tokens
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.runtime.scheduler import Scheduler
from hmoe.runtime.tokenizer import load_tokenizer

MODEL = ModelInfo("tiny", 257, [256], 4096)
C, P, D = b"client", b"prefill", b"decode"


def served_scheduler() -> Scheduler:
    s = Scheduler(RouterConfig(), ByteTokenizer())
    s.on_worker(P, Register("p", "prefill", 1, "cpu", MODEL, 1000, 4), 0.0)
    s.on_worker(D, Register("d", "decode", 2, "cpu", MODEL, 1000, 4), 0.0)
    return s


def test_the_router_passes_logprobs_through_only_to_requests_that_asked():
    s = served_scheduler()
    s.on_client(C, Generate("asks", prompt="hi", params=SamplingParams(max_tokens=3, logprobs=1)), 0.0)
    s.on_client(C, Generate("plain", prompt="hi", params=SamplingParams(max_tokens=3)), 0.0)
    s.tick(0.0)
    s.on_worker(P, Prefilled("asks", ord("a"), 0, "slots", 2, logprobs=[-0.5, [[97, -0.5]]]), 0.1)
    s.tick(0.1)
    s.on_worker(P, Prefilled("plain", ord("x"), 1, "slots", 2), 0.2)
    s.tick(0.2)
    step = Tokens([TokenItem("asks", ord("b")), TokenItem("plain", ord("y"))], [[-1.0, [[98, -1.0]]], None])
    s.on_worker(D, step, 0.3)
    last = Tokens([TokenItem("asks", ord("c"), "length"), TokenItem("plain", ord("z"), "length")])
    s.on_worker(D, last, 0.4)  # none sent
    out = [m for _, identity, m in s.take_outbox() if identity == C]
    deltas = {rid: [m.logprobs for m in out if isinstance(m, Delta) and m.request_id == rid and m.token_ids]
              for rid in ("asks", "plain")}  # fmt: skip
    assert deltas == {"asks": [[[-0.5, [[97, -0.5]]]], [[-1.0, [[98, -1.0]]]], [None]], "plain": [None] * 3}
    ends = {m.request_id: m for m in out if isinstance(m, Finished)}
    assert ends["asks"].logprobs == [[-0.5, [[97, -0.5]]], [-1.0, [[98, -1.0]]], None]
    assert ends["plain"].logprobs is None and ends["asks"].token_ids == [97, 98, 99]


def test_token_bytes_are_exact_even_inside_a_character(tiny_models):
    tokenizer = load_tokenizer(tiny_models("deepseek_v3", "fp32"))
    tokens = TokenText(tokenizer)
    text = "Grüße, 東京 <think>ok</think>"
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert b"".join(tokens.of(i)[1] for i in ids) == text.encode()
    assert tokens.of(tokenizer.token_to_id("<think>")) == ("<think>", b"<think>")
    entries = [[-0.25 * n, [[ids[0], -0.1], [ids[1], -0.2]]] for n in range(len(ids))]
    chat = chat_logprobs(tokens, ids, entries)["content"]
    assert [c["logprob"] for c in chat] == [e[0] for e in entries]
    assert bytes(b for c in chat for b in c["bytes"]) == text.encode()
    assert chat[0]["top_logprobs"][1] == {
        "token": tokens.of(ids[1])[0],
        "logprob": -0.2,
        "bytes": list(tokens.of(ids[1])[1]),
    }
    completion = completion_logprobs(tokens, ids[:3], entries[:3], offset=10)
    assert completion["text_offset"][0] == 10 and completion["token_logprobs"] == [0.0, -0.25, -0.5]
    assert completion["text_offset"][2] == 10 + len(completion["tokens"][0]) + len(completion["tokens"][1])
    assert completion["top_logprobs"][0] == {tokens.of(ids[0])[0]: -0.1, tokens.of(ids[1])[0]: -0.2}
    assert chat_logprobs(tokens, ids, None) is None and completion_logprobs(tokens, ids, None) is None
