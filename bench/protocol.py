"""Wire-protocol benchmark: protocol.decode and encode of the messages on the hot paths, against what
the same ids cost as a plain msgpack array (the wire form before token ids were packed), in one run.

    python bench/protocol.py [--tag dev] [--repeats 30]

Per message (a Tokens of 32 items; Prefill and Generate with 2K, 32K and 128K prompt ids; Adopt carries
no ids since protocol 3):
- decode and encode: median of `repeats` (ms), decode's input a frame encode made;
- baseline: msgpack.unpackb of the old wire form, no checks at all (ms): the ids as a plain array, or
  Tokens' positional [request_id, token, reason] triples;
- ratio: baseline / decode (how many times cheaper a checked decode is than an unchecked parse of
  the old form). A 128K-token Prefill must decode in <= 2 ms (issue 11, measured on Adopt then).
Writes bench/results/protocol-TAG.json and a PNG beside it (when matplotlib is there).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import msgpack

from hmoe.runtime import protocol as p
from hmoe.runtime.sampling_params import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
PROMPT_LENS = (2048, 32768, 131072)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def messages() -> dict[str, tuple[object, list]]:
    """name -> (message, what it carried in the old wire form: plain ids, or positional token triples)."""
    rng = random.Random(0)
    params = SamplingParams(max_tokens=128, temperature=0.7, seed=5)
    out: dict[str, tuple[object, list]] = {}
    tokens = [p.TokenItem(f"req-{i}", rng.randrange(129280)) for i in range(32)]
    out["tokens_32"] = (p.Tokens(tokens), [[t.request_id, t.token, None] for t in tokens])
    for n in PROMPT_LENS:
        ids = [rng.randrange(129280) for _ in range(n)]
        k = f"{n // 1024}k"
        out[f"prefill_{k}"] = (p.Prefill("req-1", ids, params), ids)
        out[f"generate_{k}"] = (p.Generate("req-1", token_ids=ids, params=params), ids)
    return out


def run(repeats: int) -> dict:
    rows = {}
    for name, (msg, ids) in messages().items():
        frame = p.encode(msg)
        plain = msgpack.packb({"v": p.VERSION, "t": "x", "items" if name.startswith("tokens") else "token_ids": ids})
        n = repeats if len(ids) > 4096 else repeats * 100
        decode_ms = median_ms(lambda: p.decode(frame), n)  # noqa: B023 (called before the loop moves on)
        baseline_ms = median_ms(lambda: msgpack.unpackb(plain), n)  # noqa: B023
        rows[name] = {
            "ids": len(ids),
            "frame_bytes": len(frame),
            "decode_ms": round(decode_ms, 4),
            "encode_ms": round(median_ms(lambda: p.encode(msg), n), 4),  # noqa: B023
            "plain_unpack_ms": round(baseline_ms, 4),
            "ratio": round(baseline_ms / decode_ms, 1),
        }
        print(
            f"{name:14s} {len(frame):8d} B  decode {decode_ms:8.3f} ms  encode {rows[name]['encode_ms']:8.3f} ms  "
            f"plain unpack {baseline_ms:8.3f} ms  ({rows[name]['ratio']}x)"
        )
    return rows


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = results["messages"]
    names = list(rows)
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [rows[n]["decode_ms"] for n in names], 0.4, label="protocol.decode")
    ax.bar(
        [x + 0.2 for x in xs],
        [rows[n]["plain_unpack_ms"] for n in names],
        0.4,
        label="old wire form, parse only (no checks)",
    )
    ax.axhline(2.0, color="red", lw=0.8, ls="--", label="2 ms (128K-token target)")
    ax.set_yscale("log")
    ax.set_ylabel("ms (median)")
    ax.set_xticks(list(xs), names, rotation=30, ha="right")
    ax.set_title(f"protocol.decode vs parsing the old wire form, {results['machine']['cpu_model']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tag", default="dev", help="results file: bench/results/protocol-TAG.json")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per large message (x100 for small)")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    results = {
        "bench": "protocol",
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu_model": cpu or platform.processor(), "python": platform.python_version()},
        "protocol_version": p.VERSION,
        "messages": run(args.repeats),
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"protocol-{args.tag}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
