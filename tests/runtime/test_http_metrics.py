"""What /metrics and error replies are made of: the router's queue time, Prometheus series in vLLM's
names, and the HTTP status of each error code."""

from __future__ import annotations

import json

from prometheus_client.parser import text_string_to_metric_families

from hmoe.runtime.client import QueueFull, RequestRefused, Usage, WorkerLost
from hmoe.runtime.config import RouterConfig
from hmoe.runtime.http.app import error_response
from hmoe.runtime.http.metrics import Metrics
from hmoe.runtime.http.schema import ApiError
from hmoe.runtime.protocol import Finished, Generate, ModelInfo, Prefilled, Register, TokenItem, Tokens
from hmoe.runtime.sampling_params import SamplingParams
from hmoe.runtime.scheduler import Scheduler

MODEL = ModelInfo("tiny", 257, [256], 4096)


def test_queue_time_is_arrival_to_prefill_as_the_router_saw_it():
    s = Scheduler(RouterConfig())
    s.on_worker(b"p", Register("p", "prefill", 1, "cpu", MODEL, 1000, 4), 0.0)
    s.on_worker(b"d", Register("d", "decode", 2, "cpu", MODEL, 1000, 4), 0.0)
    for rid in ("first", "second"):
        s.on_client(b"c", Generate(rid, token_ids=[5, 6], params=SamplingParams(max_tokens=2)), 1.0)
    s.tick(1.0)  # one prefill worker: "second" waits for it
    s.on_worker(b"p", Prefilled("first", 7, 0, "slots", 2), 1.5)
    s.tick(1.75)
    s.on_worker(b"p", Prefilled("second", 7, 1, "slots", 2), 2.0)
    s.tick(2.0)
    s.on_worker(b"d", Tokens([TokenItem("first", 8, "length"), TokenItem("second", 8, "length")]), 2.5)
    ends = {m.request_id: m.usage for _, _, m in s.take_outbox() if isinstance(m, Finished)}
    assert ends["first"].queue_s == 0.0 and ends["second"].queue_s == 0.75


def samples(metrics: Metrics) -> dict:
    text = metrics.exposition().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
            for s in f.samples}  # fmt: skip


def test_series_move_with_requests_and_router_status():
    m = Metrics("tiny")
    m.first_token(0.2)
    m.tokens(0.1, 2)  # two tokens in one piece, 0.1 s after the last: 0.05 s each
    m.finished("length", Usage(5, 3, 0.2, 0.05, 0.01), 0.4)
    m.error("queue_full")
    m.router_status({"running": 2, "queued": 1, "throughput": {"tokens_per_s": 9.5}, "workers": [
        {"role": "prefill", "worker_id": "p", "kv_free_tokens": 10, "kv_capacity_tokens": 10},
        {"role": "decode", "worker_id": "d", "kv_free_tokens": 750, "kv_capacity_tokens": 1000, "steps": 40,
         "step_s": 2.0}]})  # fmt: skip
    got, model = samples(m), (("model_name", "tiny"),)
    assert got[("hmoe:time_to_first_token_seconds_count", model)] == 1
    assert got[("hmoe:inter_token_latency_seconds_count", model)] == 2
    assert got[("hmoe:inter_token_latency_seconds_bucket", (("le", "0.05"), *model))] == 2
    assert got[("hmoe:request_queue_time_seconds_sum", model)] == 0.01
    assert got[("hmoe:prompt_tokens_total", model)] == 5 and got[("hmoe:generation_tokens_total", model)] == 3
    assert got[("hmoe:request_success_total", (("finished_reason", "length"), *model))] == 1
    assert got[("hmoe:request_errors_total", (("code", "queue_full"), *model))] == 1
    assert got[("hmoe:kv_cache_usage_perc", (*model, ("worker_id", "d")))] == 0.25
    assert got[("hmoe:num_requests_running", model)] == 2 and got[("hmoe:num_requests_waiting", model)] == 1
    decode = (*model, ("role", "decode"), ("worker_id", "d"))
    assert got[("hmoe:worker_steps_total", decode)] == 40 and got[("hmoe:worker_step_seconds_total", decode)] == 2.0
    m.router_status(None)
    assert samples(m)[("hmoe:router_up", model)] == 0


def test_error_replies_carry_the_status_clients_expect():
    cases = [
        (QueueFull("queue_full", "busy"), 429, True),
        (RequestRefused("no_worker", "none"), 503, True),
        (RequestRefused("draining", "bye"), 503, True),
        (RequestRefused("prompt_too_long", "long"), 400, False),
        (WorkerLost("worker_lost", "died"), 503, True),
        (ApiError(404, "model_not_found", "no", "model"), 404, False),
    ]
    for exc, status, retry in cases:
        response = error_response(exc)
        body = json.loads(response.body)["error"]
        assert response.status_code == status and body["code"] == exc.code and body["message"] == exc.message
        assert ("retry-after" in response.headers) == retry and set(body) == {"message", "type", "code", "param"}
