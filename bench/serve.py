"""Serving benchmark: Poisson arrivals against a running router, TTFT / TPOT percentiles, throughput
and SLO attainment, at one or more request rates.

    python bench/serve.py --rates 1,2,4,8 --num-requests 48 --tag dev          # starts hmoe serve (demo model)
    python bench/serve.py --endpoint tcp://127.0.0.1:5555 --rates 0.5,1 ...    # an existing service
    python bench/serve.py --http [--http-url http://127.0.0.1:8000] ...          # through the HTTP API
    python bench/serve.py --compare ...      # SDK and HTTP alternately on one service: the HTTP API's cost

Each request is token ids (uniform in [2, vocab_size)) with a prompt length and an output length drawn
from the given distributions ("fixed:N", "uniform:LO:HI", "lognormal:MEDIAN:SIGMA"), seeded, and
ignore_eos so it produces exactly its output length. Arrival gaps are exponential (a Poisson process
of the given rate). --http sends the same requests as streaming /v1/completions calls to the
OpenAI-compatible API (as vLLM's and SGLang's serving benchmarks do), else through the SDK. Measured
at the client, per request: TTFT (send -> first token), TPOT (mean gap
between later tokens), end-to-end latency; per rate: their p50/p90/p99, output tokens/s over the
run, and SLO attainment (the share of requests with TTFT <= --ttft-slo-s and TPOT <= --tpot-slo-s).
Writes JSON with the machine's description (bench/results/serve-TAG.json) and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, start_serve  # noqa: E402

from hmoe.runtime import AsyncClient  # noqa: E402
from hmoe.runtime.client import status_once  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def draw(spec: str, rng: random.Random) -> int:
    """One length from "fixed:N", "uniform:LO:HI" or "lognormal:MEDIAN:SIGMA" (at least 1)."""
    kind, *args = spec.split(":")
    if kind == "fixed":
        return int(args[0])
    if kind == "uniform":
        return rng.randint(int(args[0]), int(args[1]))
    if kind == "lognormal":
        return max(1, round(float(args[0]) * rng.lognormvariate(0.0, float(args[1]))))
    raise SystemExit(f"length distribution {spec!r}: use fixed:N, uniform:LO:HI or lognormal:MEDIAN:SIGMA")


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    s = sorted(values)
    pick = lambda q: s[min(len(s) - 1, round(q * (len(s) - 1)))]  # noqa: E731  (nearest rank)
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "mean": sum(s) / len(s)}


async def one_request(client: AsyncClient, prompt: list[int], output_len: int, timeout_s: float) -> dict:
    sent = time.perf_counter()
    stamps: list[float] = []
    stream = client.generate(token_ids=prompt, max_tokens=output_len, ignore_eos=True, timeout=timeout_s)
    try:
        async for chunk in stream:
            stamps += [time.perf_counter()] * len(chunk.token_ids)
        error = None
    except Exception as exc:  # noqa: BLE001  (a failed request is a data point: it misses the SLO)
        error = getattr(exc, "code", type(exc).__name__)
    done = time.perf_counter()
    ttft = stamps[0] - sent if stamps else None
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None
    reason = stream.result.finish_reason if stream.result else "error"
    return {
        "prompt_tokens": len(prompt),
        "output_tokens": len(stamps),
        "ttft_s": ttft,
        "tpot_s": tpot,
        "latency_s": done - sent,
        "finish_reason": reason,
        "error": error,
    }


async def one_http_request(client, model: str, prompt: list[int], output_len: int, timeout_s: float) -> dict:
    """The same request as a streaming /v1/completions call (the openai package); tokens counted by the
    final usage chunk."""
    sent = time.perf_counter()
    stamps, usage, reason, error = [], None, "error", None
    try:
        stream = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=output_len,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
            timeout=timeout_s,
        )
        async for chunk in stream:
            if chunk.choices:
                stamps.append(time.perf_counter())
                reason = chunk.choices[0].finish_reason or reason
            else:
                usage = chunk.usage
    except Exception as exc:  # noqa: BLE001  (a failed request is a data point: it misses the SLO)
        error = getattr(exc, "code", None) or type(exc).__name__
    done = time.perf_counter()
    n = usage.completion_tokens if usage else 0
    return {
        "prompt_tokens": len(prompt),
        "output_tokens": n,
        "ttft_s": stamps[0] - sent if stamps else None,
        "tpot_s": (stamps[-1] - stamps[0]) / (n - 1) if n > 1 and len(stamps) > 1 else None,
        "latency_s": done - sent,
        "finish_reason": reason,
        "error": error,
    }


async def run_rate(endpoint: str, rate: float, args, rng: random.Random) -> dict:
    """num_requests requests arriving as a Poisson process of `rate` per second."""
    if args.http:
        import openai  # (the bench extra)

        client = openai.AsyncOpenAI(base_url=f"{args.http_url}/v1", api_key="none", max_retries=0)
        model = (await client.models.list()).data[0].id
        send = lambda prompt, n: one_http_request(client, model, prompt, n, args.request_timeout_s)  # noqa: E731
    else:
        client = AsyncClient(endpoint, router_timeout_s=30.0)
        send = lambda prompt, n: one_request(client, prompt, n, args.request_timeout_s)  # noqa: E731
    try:
        tasks, start = [], time.perf_counter()
        next_s = 0.0
        for _ in range(args.num_requests):
            prompt = [rng.randrange(2, args.vocab_size) for _ in range(draw(args.prompt_len, rng))]
            output_len = draw(args.output_len, rng)
            await asyncio.sleep(max(0.0, start + next_s - time.perf_counter()))
            tasks.append(asyncio.ensure_future(send(prompt, output_len)))
            next_s += rng.expovariate(rate)
        results = await asyncio.gather(*tasks)
        makespan = time.perf_counter() - start
    finally:
        await client.close()
    ok = [r for r in results if r["error"] is None and r["finish_reason"] == "length"]
    met = [r for r in ok if r["ttft_s"] <= args.ttft_slo_s and (r["tpot_s"] or 0.0) <= args.tpot_slo_s]
    return {
        "rate": rate,
        "num_requests": len(results),
        "completed": len(ok),
        "makespan_s": makespan,
        "output_tokens_per_s": sum(r["output_tokens"] for r in results) / makespan,
        "requests_per_s": len(ok) / makespan,
        "ttft_s": percentiles([r["ttft_s"] for r in ok]),
        "tpot_s": percentiles([r["tpot_s"] for r in ok if r["tpot_s"]]),
        "latency_s": percentiles([r["latency_s"] for r in ok]),
        "slo_attainment": len(met) / len(results),
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "requests": results,
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "cpu_model": cpu,
        "logical_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": os.getloadavg(),
    }


def plot(payload: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax2 = axes[2].twinx()
    for client in sorted({r["client"] for r in payload["runs"]}):
        runs = [r for r in payload["runs"] if r["client"] == client]
        rates = [r["rate"] for r in runs]
        for key, ax in (("ttft_s", axes[0]), ("tpot_s", axes[1])):
            for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
                ax.plot(rates, [(r[key][q] or float("nan")) * 1000 for r in runs], style, label=f"{client} {q}")
        axes[2].plot(rates, [r["slo_attainment"] * 100 for r in runs], "o-", label=f"{client} SLO attainment (%)")
        ax2.plot(rates, [r["output_tokens_per_s"] for r in runs], "s--", label=f"{client} output tokens/s")
    for key, ax, slo in (("ttft_s", axes[0], payload["slo"]["ttft_s"]), ("tpot_s", axes[1], payload["slo"]["tpot_s"])):
        ax.axhline(slo * 1000, color="red", lw=0.8, label=f"SLO {slo * 1000:g} ms")
        ax.set(xlabel="request rate (req/s)", ylabel=f"{key[:4].upper()} (ms)", yscale="log", title=key[:4].upper())
        ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
    axes[2].set(xlabel="request rate (req/s)", ylabel="SLO attainment (%)", ylim=(0, 105), title="SLO and throughput")
    axes[2].set_xscale("log", base=2)
    ax2.set_ylabel("output tokens/s")
    axes[2].legend(loc="lower left")
    ax2.legend(loc="lower right")
    fig.suptitle(
        f"hmoe serve — {payload['model']} on {payload['machine']['cpu_model']} "
        f"({payload['machine']['logical_cpus']} CPUs); prompt {payload['args']['prompt_len']}, "
        f"output {payload['args']['output_len']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", help="A running router; default: start hmoe serve for the run.")
    p.add_argument("--model-dir", help="What hmoe serve serves (default: the tiny demo model).")
    p.add_argument("--http", action="store_true", help="Drive the OpenAI-compatible HTTP API instead of the SDK.")
    p.add_argument("--http-url", default="http://127.0.0.1:8000", help="The HTTP API of a running service.")
    p.add_argument("--compare", action="store_true", help="Each rate through the SDK and then through HTTP.")
    p.add_argument("--rates", default="1,2,4,8", help="Request rates to run, req/s, comma-separated.")
    p.add_argument("--num-requests", type=int, default=48, help="Requests per rate.")
    p.add_argument("--prompt-len", default="uniform:16:256")
    p.add_argument("--output-len", default="uniform:16:64")
    p.add_argument("--vocab-size", type=int, default=500, help="Prompt token ids are drawn below this.")
    p.add_argument("--ttft-slo-s", type=float, default=30.0)
    p.add_argument("--tpot-slo-s", type=float, default=0.050)
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--kv-cache-gib", type=float, default=0.25, help="Per worker, when this run starts hmoe serve.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="dev")
    p.add_argument("--json", dest="json_path", help="Where to write (default bench/results/serve-TAG.json).")
    args = p.parse_args()

    if args.endpoint:
        proc, endpoint = None, args.endpoint
    else:
        http_port = free_port() if args.http or args.compare else 0
        args.http_url = f"http://127.0.0.1:{http_port}" if http_port else args.http_url
        proc, endpoint = start_serve(args.model_dir, {"HMOE_WORKER_KV_CACHE_GIB": str(args.kv_cache_gib)}, http_port)
    try:
        status = status_once(endpoint, 5.0)
        model = next((w["model"] for w in status["workers"]), "?")
        runs = []
        clients = ["sdk", "http"] if args.compare else ["http" if args.http else "sdk"]
        for rate in [float(r) for r in args.rates.split(",")]:
            for client in clients:
                args.http = client == "http"
                run = asyncio.run(run_rate(endpoint, rate, args, random.Random(args.seed)))  # same requests
                runs.append(run | {"client": client})
                t, o = run["ttft_s"], run["tpot_s"]
                print(
                    f"{client:4s} rate {rate:5.2f}/s: TTFT p50 {t['p50'] * 1e3:8.1f} p99 {t['p99'] * 1e3:8.1f} ms | "
                    f"TPOT p50 {o['p50'] * 1e3:6.1f} p99 {o['p99'] * 1e3:6.1f} ms | "
                    f"{run['output_tokens_per_s']:7.1f} tok/s | SLO {run['slo_attainment']:.0%}"
                    f" | {run['completed']}/{run['num_requests']} done",
                    flush=True,
                )
            if args.compare:
                sdk, http = runs[-2], runs[-1]
                ratio = {k: http[k]["p50"] / sdk[k]["p50"] for k in ("ttft_s", "tpot_s", "latency_s")}
                http["http_over_sdk_p50"] = ratio
                print(f"     HTTP / SDK p50: TTFT {ratio['ttft_s']:.2f}x, TPOT {ratio['tpot_s']:.2f}x, "
                      f"latency {ratio['latency_s']:.2f}x", flush=True)  # fmt: skip
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            proc.wait(120)
    payload = {
        "bench": "serve",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "model": model,
        "endpoint": endpoint if args.endpoint else "hmoe serve (started by the bench)",
        "clients": "sdk: AsyncClient over ZeroMQ; http: openai.AsyncOpenAI, streaming /v1/completions",
        "workers": [
            {k: w[k] for k in ("role", "device", "max_batch", "kv_capacity_tokens")} for w in status["workers"]
        ],
        "slo": {"ttft_s": args.ttft_slo_s, "tpot_s": args.tpot_slo_s},
        "args": vars(args),
        "runs": runs,
    }
    path = Path(args.json_path) if args.json_path else RESULTS / f"serve-{args.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    try:
        plot(payload, path.with_suffix(".png"))
    except ImportError:
        print("matplotlib is not installed: no PNG", file=sys.stderr)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
