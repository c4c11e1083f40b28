"""Prefix cache: time to first token of prompts that repeat a long prefix, with the cache on and off,
through a real `hmoe serve` and the SDK.

    python bench/prefix.py                                       # the demo model, its longest prompt
    python bench/prefix.py --make qwen3_moe:30b-a3b:fp8:48 --device cuda --prefix-tokens 16384 --modes on

Two workloads, per mode (on: the default [worker] prefix_cache_gib; off: 0), each on a fresh prefix
of random token ids (seeded):
    shared        one request of PREFIX + NEW tokens, then --shared-requests more with the same prefix
                  and other NEW tokens (RAG over one document, a long system prompt);
    conversation  --turns turns of a chat: each prompt is the last one, its answer and NEW more tokens.
Requests run one at a time (TTFT is the prefill's, not a queue's), output --output-tokens each.

    ttft_ratio_cached   (mode on) median TTFT of the shared requests after the first / the first's
    hit_rate            prompt tokens found cached / prompt tokens looked up (the prefill worker's count)
Writes bench/results/prefix-TAG.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_options, machine_name, prepare_model, start_serve, write_results  # noqa: E402

from hmoe.runtime import Client  # noqa: E402
from hmoe.runtime.client import status_once  # noqa: E402


def ask(client: Client, prompt: list[int], args) -> dict:
    start = time.perf_counter()
    first = None
    stream = client.generate(token_ids=prompt, max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)
    for _ in stream:
        first = first or time.perf_counter() - start
    result = stream.result
    return {
        "prompt_tokens": len(prompt),
        "cached_tokens": result.usage.cached_tokens,
        "ttft_s": first,
        "output": list(result.token_ids),
    }


def prefix_stats(endpoint: str) -> dict:
    prefill = [w for w in status_once(endpoint, 10.0)["workers"] if w["role"] == "prefill"]
    return prefill[0].get("prefix") or {} if prefill else {}


def run_mode(args, mode: str, rng: random.Random) -> dict:
    env = {"HMOE_ROUTER_MAX_PROMPT_TOKENS": str(args.max_prompt), "HMOE_WORKER_DEVICE": args.device}
    env["HMOE_WORKER_KV_CACHE_GIB"] = str(args.kv_cache_gib)
    if mode == "off":
        env["HMOE_WORKER_PREFIX_CACHE_GIB"] = "0"
    proc, endpoint = start_serve(args.model_dir, env)
    try:
        with Client(endpoint) as client:
            words = lambda n: [rng.randrange(2, args.vocab_size) for _ in range(n)]  # noqa: E731
            ask(
                client, words(args.prefix_tokens + args.new_tokens), args
            )  # warm-up: one-time costs of this length aside
            prefix = words(args.prefix_tokens)
            shared = [ask(client, prefix + words(args.new_tokens), args) for _ in range(args.shared_requests + 1)]
            print(f"{mode} shared: ttft {[round(r['ttft_s'], 3) for r in shared]}", file=sys.stderr)
            turns, context = [], words(args.turn_tokens)
            for _ in range(args.turns):
                turns.append(ask(client, context, args))
                context = context + turns[-1]["output"] + words(args.new_tokens)
            print(f"{mode} conversation: ttft {[round(r['ttft_s'], 3) for r in turns]}", file=sys.stderr)
            time.sleep(1.5)  # the prefill worker's next heartbeat carries its counts
            stats = prefix_stats(endpoint)
    finally:
        proc.send_signal(2)
        proc.wait(120)
    for r in shared + turns:
        del r["output"]
    first, later = shared[0]["ttft_s"], [r["ttft_s"] for r in shared[1:]]
    return {
        "mode": mode,
        "shared": shared,
        "conversation": turns,
        "ttft_first_s": first,
        "ttft_repeat_median_s": statistics.median(later),
        "ttft_ratio": statistics.median(later) / first,
        "hit_rate": stats["hit_tokens"] / stats["query_tokens"] if stats.get("query_tokens") else 0.0,
        "prefix_stats": stats,
    }


def plot(payload: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for run in payload["runs"]:
        style = "o-" if run["mode"] == "on" else "s--"
        axes[0].plot([r["ttft_s"] for r in run["shared"]], style, label=f"cache {run['mode']}")
        axes[1].plot(
            [r["prompt_tokens"] for r in run["conversation"]],
            [r["ttft_s"] for r in run["conversation"]],
            style,
            label=f"cache {run['mode']}",
        )
    axes[0].set(
        xlabel="request (0: the first with this prefix)",
        ylabel="TTFT (s)",
        yscale="log",
        title=f"{payload['args']['prefix_tokens']}-token shared prefix + {payload['args']['new_tokens']} new",
    )
    axes[1].set(xlabel="prompt tokens (conversation turn)", ylabel="TTFT (s)", yscale="log", title="growing chat")
    for ax in axes:
        ax.legend()
    ratio = payload.get("ttft_ratio_cached")
    fig.suptitle(
        f"hmoe prefix cache — {payload['model']} on {payload['machine']['name']}; ttft_ratio_cached {ratio:.3f}"
        if ratio is not None
        else "",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_options(p)
    p.add_argument("--modes", default="on,off", help="on, off or both: serve runs with the cache on / off.")
    p.add_argument("--prefix-tokens", type=int, default=0, help="Default: the longest the model takes.")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--shared-requests", type=int, default=4)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--turn-tokens", type=int, default=0, help="The chat's first prompt (default: prefix / 4).")
    p.add_argument("--vocab-size", type=int, default=500, help="Prompt token ids are drawn below this.")
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default=None, help="Result name: prefix-TAG.json (default: this machine's name).")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="hmoe-bench-") as tmp:
        model = prepare_model(args, tmp)
        context = 4096  # the demo model's max_position_embeddings
        if args.model_dir:
            import json

            context = json.loads((Path(args.model_dir) / "config.json").read_text())["max_position_embeddings"]
        longest = context - args.new_tokens - args.output_tokens - 1
        args.prefix_tokens = min(args.prefix_tokens or longest, longest)
        args.turn_tokens = args.turn_tokens or args.prefix_tokens // 4
        conversation = args.turn_tokens + args.turns * (args.new_tokens + args.output_tokens)
        args.max_prompt = max(args.prefix_tokens + args.new_tokens, conversation) + 64  # sizes the hand-off slots
        rng = random.Random(args.seed)
        runs = [run_mode(args, mode, rng) for mode in args.modes.split(",")]
    on = next((r for r in runs if r["mode"] == "on"), None)
    payload = {
        "model": model,
        "device": args.device,
        "args": {k: v for k, v in vars(args).items() if k != "model_dir"},
        "runs": runs,
        "ttft_ratio_cached": on["ttft_ratio"] if on else None,
        "ttft_first_s": on["ttft_first_s"] if on else None,
        "ttft_cached_s": on["ttft_repeat_median_s"] if on else None,
        "hit_rate": on["hit_rate"] if on else None,
        "target": "ttft_ratio_cached <= 0.1",
    }
    path = write_results(f"prefix-{args.tag or machine_name()}", payload, plot)
    for run in runs:
        print(
            f"cache {run['mode']}: first {run['ttft_first_s']:.3f} s, repeated {run['ttft_repeat_median_s']:.3f} s "
            f"(ratio {run['ttft_ratio']:.3f}), hit rate {run['hit_rate']:.2f}; "
            f"conversation TTFT {[round(r['ttft_s'], 3) for r in run['conversation']]}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
