"""Metrics: Prometheus series of the HTTP API, named and bucketed in vLLM's style with the prefix `hmoe:`.

Per request, as a client sees it (measured here, at the gateway, from the HTTP request's arrival):
time to first token, inter-token latency (per token), time per output token (per request), end-to-end
latency, prompt and generation tokens, finish reasons. Per scrape, from the router's Status: requests
running and waiting, KV cache use per decode worker, tokens/s, registered workers, and each worker's
engine steps and their time (counters from its heartbeat: rate(seconds) / rate(steps) is the mean
prefill or decode step time), and each prefill worker's prefix cache (queries and hits in tokens, as
vLLM counts them: rate(hits) / rate(queries) is the hit rate; its size). Cached prompt tokens per
request are counted too (`hmoe:prompt_tokens_cached`).
Every series carries model_name; the registry is the gateway's own (no process-global state).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
LATENCY_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
TOKEN_BUCKETS = tuple(float(m * 10**e) for e in range(6) for m in (1, 2, 5))


class Metrics:
    def __init__(self, model_name: str):
        self.registry = registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"hmoe:{name}", doc, labels, buckets=buckets, registry=registry)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to first token (HTTP arrival to first token).", TTFT_BUCKETS
        )
        self.itl = histogram("inter_token_latency_seconds", "Time between output tokens, per token.", ITL_BUCKETS)
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            ITL_BUCKETS,
        )
        self.e2e = histogram("e2e_request_latency_seconds", "HTTP arrival to last token.", LATENCY_BUCKETS)
        self.queue = histogram(
            "request_queue_time_seconds", "Router arrival to the start of prefill (router-measured).", LATENCY_BUCKETS
        )
        self.prompt_hist = histogram("request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.gen_hist = histogram("request_generation_tokens", "Generated tokens per request.", TOKEN_BUCKETS)
        self.prompt_tokens = Counter("hmoe:prompt_tokens", "Prompt tokens processed.", labels, registry=registry)
        self.cached_tokens = Counter(
            "hmoe:prompt_tokens_cached", "Prompt tokens whose KV came from the prefix cache.", labels, registry=registry
        )
        self.generation_tokens = Counter("hmoe:generation_tokens", "Tokens generated.", labels, registry=registry)
        self.success = Counter(
            "hmoe:request_success",
            "Requests finished, by finish reason.",
            [*labels, "finished_reason"],
            registry=registry,
        )
        self.errors = Counter(
            "hmoe:request_errors", "Requests refused or failed, by error code.", [*labels, "code"], registry=registry
        )
        self.running = Gauge("hmoe:num_requests_running", "Requests at a worker (router).", labels, registry=registry)
        self.waiting = Gauge("hmoe:num_requests_waiting", "Requests queued at the router.", labels, registry=registry)
        self.kv_usage = Gauge(
            "hmoe:kv_cache_usage_perc",
            "KV cache in use per decode worker, 0-1 (its heartbeat).",
            [*labels, "worker_id"],
            registry=registry,
        )
        self.workers = Gauge("hmoe:workers", "Registered workers, by role.", [*labels, "role"], registry=registry)
        self.throughput = Gauge(
            "hmoe:generation_tokens_per_second",
            "Router-side output tokens/s over its window.",
            labels,
            registry=registry,
        )
        self.worker_rows: list[dict] = []
        registry.register(_WorkerCounters(self))
        self.router_up = Gauge(
            "hmoe:router_up", "1 when the router answered the last scrape.", labels, registry=registry
        )

    def first_token(self, ttft_s: float) -> None:
        self.ttft.labels(self.model_name).observe(ttft_s)

    def tokens(self, gap_s: float, count: int) -> None:
        """`count` tokens arrived `gap_s` after the previous ones: each waited gap_s / count."""
        for _ in range(count):
            self.itl.labels(self.model_name).observe(gap_s / count)

    def finished(self, reason: str, usage, e2e_s: float) -> None:
        m = self.model_name
        self.e2e.labels(m).observe(e2e_s)
        self.prompt_tokens.labels(m).inc(usage.prompt_tokens)
        self.cached_tokens.labels(m).inc(usage.cached_tokens)
        self.generation_tokens.labels(m).inc(usage.output_tokens)
        self.prompt_hist.labels(m).observe(usage.prompt_tokens)
        self.gen_hist.labels(m).observe(usage.output_tokens)
        if usage.tpot_s is not None:
            self.tpot.labels(m).observe(usage.tpot_s)
        if usage.queue_s is not None:
            self.queue.labels(m).observe(usage.queue_s)
        self.success.labels(m, reason).inc()

    def error(self, code: str) -> None:
        self.errors.labels(self.model_name, code).inc()

    def router_status(self, status: dict | None) -> None:
        m = self.model_name
        self.router_up.labels(m).set(status is not None)
        if status is None:
            return
        self.running.labels(m).set(status["running"])
        self.waiting.labels(m).set(status["queued"])
        self.throughput.labels(m).set(status.get("throughput", {}).get("tokens_per_s", 0.0))
        self.worker_rows = list(status["workers"])
        roles = {"prefill": 0, "decode": 0}
        for w in status["workers"]:
            roles[w["role"]] = roles.get(w["role"], 0) + 1
            if w["role"] == "decode" and w["kv_capacity_tokens"]:
                used = 1.0 - w["kv_free_tokens"] / w["kv_capacity_tokens"]
                self.kv_usage.labels(m, w["worker_id"]).set(used)
        for role, count in roles.items():
            self.workers.labels(m, role).set(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerCounters:
    """Each worker's cumulative counters, as its last heartbeat said (a restart resets them): engine steps
    and their time; a prefill worker's prefix-cache lookups and hits (tokens) and its size."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        labels = ["model_name", "role", "worker_id"]
        steps = CounterMetricFamily("hmoe:worker_steps", "Engine steps (forward passes) of a worker.", labels=labels)
        seconds = CounterMetricFamily("hmoe:worker_step_seconds", "Time in those steps.", labels=labels)
        queries = CounterMetricFamily(
            "hmoe:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", labels=labels
        )
        hits = CounterMetricFamily("hmoe:prefix_cache_hits", "Of those, tokens found cached.", labels=labels)
        size = GaugeMetricFamily("hmoe:prefix_cache_tokens", "Tokens of KV the prefix cache holds.", labels=labels)
        for w in self.metrics.worker_rows:
            key = [self.metrics.model_name, w["role"], w["worker_id"]]
            steps.add_metric(key, w.get("steps", 0))
            seconds.add_metric(key, w.get("step_s", 0.0))
            if prefix := w.get("prefix"):
                queries.add_metric(key, prefix["query_tokens"])
                hits.add_metric(key, prefix["hit_tokens"])
                size.add_metric(key, prefix["cached_tokens"])
        return [steps, seconds, queries, hits, size]
