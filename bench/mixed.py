"""Mixed workload: does a running generation keep its pace while long prompts prefill beside it?

    python bench/mixed.py                                              # the demo model, 4 streams
    python bench/mixed.py --make qwen3_moe:30b-a3b:fp8:48 --device cuda --streams 16 --long-tokens 32768 \
        --kv-cache-gib 12

For each setting (--settings; overlap: dual-batch attention/expert overlap on, [worker] micro_batches
2 with the engine's timed choice; no-overlap: micro_batches 1; colocated: one worker that prefills a
chunk between decode steps, the peers' way, the baseline; overlap-halves: overlap with the cores split
half and half, not by policy.cpu_threads), through a real `hmoe serve` and the SDK:
    alone   --streams generations of --output-tokens each run back to back for --seconds; their
            inter-token gaps (TPOT) p50/p99 and the decode tokens/s;
    mixed   the same load while long prompts of --long-tokens arrive one after another, each followed
            at once by a short one (--short-tokens): TTFT of both, the long one's gap to its second
            token (its KV adopted by the decode worker), the streams' TPOT again.

    tpot_p99_increase        (overlap) mixed TPOT p99 / alone TPOT p99 - 1; per setting in its row
    throughput_gain_overlap  alone decode tokens/s with overlap / without
    short_behind_long_ttft   TTFT of a short prompt sent right after a long one (p50, max)
Writes bench/results/serve-mixed-TAG.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_options, machine_name, prepare_model, start_serve, write_results  # noqa: E402
from serve import percentiles  # noqa: E402

from hmoe.runtime import AsyncClient  # noqa: E402
from hmoe.runtime.policy import cpu_threads  # noqa: E402

CPUS = len(os.sched_getaffinity(0))
SETTINGS = {
    "overlap": {"HMOE_WORKER_MICRO_BATCHES": "2"},
    "no-overlap": {"HMOE_WORKER_MICRO_BATCHES": "1"},
    "colocated": {"HMOE_WORKER_MICRO_BATCHES": "2", "HMOE_WORKER_LAYOUT": "colocated"},
    # overlap with the cores split half and half whatever the prefill worker does (before policy.cpu_threads)
    "overlap-halves": {"HMOE_WORKER_MICRO_BATCHES": "2", "HMOE_WORKER_CPU_THREADS": str(max(1, CPUS // 2))},
}


async def stream_once(client: AsyncClient, prompt: list[int], max_tokens: int) -> tuple[float | None, list[float]]:
    """(TTFT, the arrival time of every token) of one request."""
    sent, stamps = time.perf_counter(), []
    async for chunk in client.generate(token_ids=prompt, max_tokens=max_tokens, ignore_eos=True):
        stamps += [time.perf_counter()] * len(chunk.token_ids)
    return (stamps[0] - sent if stamps else None), stamps


async def decode_load(client, args, rng, until: float, gaps: list[float], tokens: list[int]) -> None:
    """One stream slot: generations back to back until `until`; every inter-token gap goes to `gaps`."""
    while time.perf_counter() < until:
        prompt = [rng.randrange(2, args.vocab_size) for _ in range(args.prompt_tokens)]
        _, stamps = await stream_once(client, prompt, args.output_tokens)
        gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))
        tokens.append(len(stamps))


async def long_prompts(client, args, rng, until: float, long_ttft: list, long_gap: list, short_ttft: list) -> None:
    while time.perf_counter() < until:
        long = [rng.randrange(2, args.vocab_size) for _ in range(args.long_tokens)]
        short = [rng.randrange(2, args.vocab_size) for _ in range(args.short_tokens)]
        pending = asyncio.ensure_future(stream_once(client, long, 2))
        await asyncio.sleep(args.short_after_s)  # the long one is prefilling by now
        short_ttft.append((await stream_once(client, short, 2))[0])
        ttft, stamps = await pending
        long_ttft.append(ttft)
        if len(stamps) > 1:  # the wait for its KV's adoption shows here
            long_gap.append(stamps[1] - stamps[0])


async def phase(endpoint: str, args, rng, mixed: bool) -> dict:
    async with AsyncClient(endpoint) as client:
        gaps, tokens, long_ttft, long_gap, short_ttft = [], [], [], [], []
        start = time.perf_counter()
        until = start + args.seconds
        jobs = [decode_load(client, args, rng, until, gaps, tokens) for _ in range(args.streams)]
        if mixed:
            jobs.append(long_prompts(client, args, rng, until, long_ttft, long_gap, short_ttft))
        await asyncio.gather(*jobs)
        elapsed = time.perf_counter() - start
    row = {"tpot_s": percentiles(gaps), "decode_tokens_per_s": sum(tokens) / elapsed, "generations": len(tokens)}
    if mixed:
        row |= {"long_ttft_s": percentiles(long_ttft), "short_behind_long_ttft_s": percentiles(short_ttft)}
        row["long_second_token_gap_s"] = percentiles(long_gap)  # first token (prefill) -> second (decode)
        row["short_behind_long_ttft_max_s"] = max(short_ttft) if short_ttft else None
    return row


def run_setting(args, name: str) -> dict:
    env = {"HMOE_WORKER_DEVICE": args.device, **SETTINGS[name]}
    env["HMOE_ROUTER_MAX_PROMPT_TOKENS"] = str(max(args.long_tokens, args.prompt_tokens) + 64)
    env["HMOE_WORKER_KV_CACHE_GIB"] = str(args.kv_cache_gib)
    proc, endpoint = start_serve(args.model_dir, env)
    rng = random.Random(args.seed)
    try:
        asyncio.run(phase(endpoint, with_args(args, seconds=min(5.0, args.seconds)), rng, mixed=False))  # warm-up
        alone = asyncio.run(phase(endpoint, args, rng, mixed=False))
        mixed = asyncio.run(phase(endpoint, args, rng, mixed=True))
    finally:
        proc.send_signal(2)
        proc.wait(120)
    increase = mixed["tpot_s"]["p99"] / alone["tpot_s"]["p99"] - 1 if alone["tpot_s"]["p99"] else None
    print(
        f"{name}: alone TPOT p50/p99 {alone['tpot_s']['p50'] * 1e3:.1f}/{alone['tpot_s']['p99'] * 1e3:.1f} ms, "
        f"{alone['decode_tokens_per_s']:.0f} tok/s; mixed {mixed['tpot_s']['p50'] * 1e3:.1f}/"
        f"{mixed['tpot_s']['p99'] * 1e3:.1f} ms (p99 {increase:+.0%}); long TTFT p50 "
        f"{mixed['long_ttft_s']['p50']:.2f} s, short behind long p50 {mixed['short_behind_long_ttft_s']['p50']:.2f} s",
        file=sys.stderr,
    )
    return {"setting": name, "alone": alone, "mixed": mixed, "tpot_p99_increase": increase}


def with_args(args, **changes):
    copy = argparse.Namespace(**vars(args))
    for key, value in changes.items():
        setattr(copy, key, value)
    return copy


def plot(payload: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = payload["runs"]
    names = [r["setting"] for r in rows]
    for i, (phase_name, offset) in enumerate((("alone", -0.2), ("mixed", 0.2))):
        for q, hatch in (("p50", ""), ("p99", "//")):
            values = [r[phase_name]["tpot_s"][q] * 1e3 for r in rows]
            axes[0].bar([x + offset + (0.1 if q == "p99" else -0.1) for x in range(len(rows))], values, 0.18,
                        hatch=hatch, color=f"C{i}", label=f"{phase_name} {q}")  # fmt: skip
    axes[0].set(xticks=range(len(rows)), xticklabels=names, ylabel="TPOT (ms)", title="decode inter-token gap")
    axes[0].legend(fontsize=8)
    for i, key in enumerate(("long_ttft_s", "short_behind_long_ttft_s")):
        axes[1].bar([x + (i - 0.5) * 0.35 for x in range(len(rows))], [r["mixed"][key]["p50"] for r in rows], 0.35,
                    label=key.replace("_s", " p50 (s)"))  # fmt: skip
    axes[1].set(xticks=range(len(rows)), xticklabels=names, ylabel="s", yscale="log", title="TTFT beside the load")
    axes[1].legend(fontsize=8)
    fig.suptitle(
        f"hmoe mixed load — {payload['model']} on {payload['machine']['name']}: {payload['args']['streams']} streams, "
        f"{payload['args']['long_tokens']}-token prompts beside them",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument(
        "--settings", default="overlap,no-overlap,colocated", help=f"Comma-separated, of {', '.join(SETTINGS)}."
    )
    p.add_argument("--streams", type=int, default=4, help="Generations running at once.")
    p.add_argument("--prompt-tokens", type=int, default=32, help="Their prompts.")
    p.add_argument("--output-tokens", type=int, default=64, help="Their length.")
    p.add_argument("--long-tokens", type=int, default=2048, help="The long prompts that arrive beside them.")
    p.add_argument("--short-tokens", type=int, default=16, help="The short prompt sent right after each long one.")
    p.add_argument("--short-after-s", type=float, default=0.05)
    p.add_argument("--seconds", type=float, default=30.0, help="Per phase.")
    p.add_argument("--vocab-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="Result name: serve-mixed-TAG.json (default: this machine's name).")
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="[worker] kv_cache_gib: a long prompt's KV fits.")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hmoe-bench-") as tmp:
        model = prepare_model(args, tmp)
        runs = []
        for name in args.settings.split(","):  # results written after each: a later setting may not finish
            runs.append(run_setting(args, name))
            path = write_results(f"serve-mixed-{args.tag or machine_name()}", summary(args, model, runs), plot)
    print(f"wrote {path}")


def summary(args, model: str, runs: list[dict]) -> dict:
    by_name = {r["setting"]: r for r in runs}
    gain = None
    if {"overlap", "no-overlap"} <= by_name.keys():
        gain = (
            by_name["overlap"]["alone"]["decode_tokens_per_s"] / by_name["no-overlap"]["alone"]["decode_tokens_per_s"]
        )
    first = by_name.get("overlap") or runs[0]
    return {
        "model": model,
        "device": args.device,
        "args": {k: v for k, v in vars(args).items() if k != "model_dir"},
        "cpu_threads": {  # the workers' default split on this machine (policy.cpu_threads)
            role: cpu_threads(role, CPUS, args.device != "cpu") for role in ("prefill", "decode", "colocated")
        },
        "runs": runs,
        "tpot_p99_increase": first["tpot_p99_increase"],
        "throughput_gain_overlap": gain,
        "short_behind_long_ttft_s": first["mixed"]["short_behind_long_ttft_s"],
        "colocated_tpot_p99_increase": by_name["colocated"]["tpot_p99_increase"] if "colocated" in by_name else None,
        "targets": "tpot_p99_increase <= 0.10; throughput_gain_overlap >= 1.5 where GPU and CPU time balance; "
        "short_behind_long_ttft <= 2 s behind a 32K prompt",
    }


if __name__ == "__main__":
    main()
