"""bench/kernels.py's A/B (--against): another checkout's kernels load as a package of their own beside
ours, and time_calls lets each function go first every other call (the second one finds the first one's
experts partly still in L3). And its decode-order T=1 row: calls back to back that still read their
experts from DRAM."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import hmoe.kernels.moe as ours

# bench/ is imported from the checkout's root, which must not stay on sys.path: its kernels/ folder would
# then shadow the `kernels` package that transformers looks for (test_model_parity, in the same process).
ROOT = str(Path(__file__).resolve().parents[2])
sys.path.insert(0, ROOT)
try:
    import bench.kernels as bench_kernels
    from bench.kernels import (
        _commit,
        bench_decode_order,
        call_timeline,
        decode_order_calls,
        decode_order_layers,
        load_kernels,
        time_calls,
    )
finally:
    sys.path.remove(ROOT)


@pytest.fixture
def fresh_against():
    """load_kernels leaves what it imported in sys.modules: take it out after each test."""
    yield
    for n in [n for n in sys.modules if n.startswith("hmoe_against_kernels")]:
        del sys.modules[n]


def _checkout(root: Path, marker: str) -> Path:
    """A copy of our kernels under root/kernels, its moe.py tagged with `marker`."""
    other = root / "kernels"
    shutil.copytree(Path(ours.__file__).parent, other, ignore=shutil.ignore_patterns("__pycache__"))
    (other / "moe.py").write_text((other / "moe.py").read_text() + f"\nMARKER = {marker!r}\n")
    return other


def test_another_checkouts_kernels_load_beside_ours(tmp_path, fresh_against):
    other = _checkout(tmp_path / "checkout", "the other checkout")

    moe = load_kernels(tmp_path / "checkout")  # the checkout, or its kernels/ folder: both name it

    assert moe.MARKER == "the other checkout"
    assert Path(moe.__file__).resolve() == (other / "moe.py").resolve()
    assert moe.MoeKernel is not ours.MoeKernel
    assert not hasattr(ours, "MARKER")


def test_a_second_checkout_replaces_the_first(tmp_path, fresh_against):
    _checkout(tmp_path / "one", "one")
    second = _checkout(tmp_path / "two", "two")

    assert load_kernels(tmp_path / "one").MARKER == "one"
    moe = load_kernels(second)  # its kernels/ folder this time

    assert moe.MARKER == "two"


def test_a_folder_without_kernels_is_refused_by_name(tmp_path, fresh_against):
    with pytest.raises(SystemExit, match="no kernels/moe.py"):
        load_kernels(tmp_path)


def test_time_calls_lets_each_function_go_first_every_other_call():
    order = []
    fns = [lambda i: order.append(("a", i)) or 2, lambda i: order.append(("b", i)) or 3]

    rows = time_calls(fns, [(0,), (1,), (2,)], lambda n: n * 10**9, lambda: None)

    assert order[2:] == [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2), ("b", 2)]  # after one warm call each
    assert [r["bytes"] for r in rows] == [2 * 10**9, 3 * 10**9]
    assert all(r["seconds"] <= r["seconds_median"] for r in rows)


def test_the_against_commit_is_named_only_for_a_checkouts_root(tmp_path):
    """--against DIR records the commit of DIR (a checkout, or its kernels/ folder); kernels exported into
    a folder of this checkout have none (they reported this checkout's commit)."""
    import subprocess

    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()

    assert _commit(ROOT) == (head or None)
    assert _commit(Path(ROOT) / "kernels") == (head or None)
    assert _commit(Path(ROOT) / "tests") is None  # a folder inside the checkout, as .dev/old-kernels is
    assert _commit(tmp_path) is None


def test_decode_order_reads_a_layer_again_only_after_the_others(monkeypatch):
    """Calls back to back, both versions alternating: each reads all top_k experts of the next layer, and
    between two calls on one layer the others are read (all but one where the alternating order brings it
    back a call early), EVICT_BYTES at least: its experts are in DRAM again, as in a decode step."""
    shape = dict(hidden=256, inter=128, experts=4, top_k=2)
    monkeypatch.setattr(bench_kernels, "EVICT_BYTES", 1 << 20)
    reads = []
    run = ours.MoeKernel.run

    def spy(self, x, ids, weights, layer, out):
        reads.append((layer, sorted(ids.ravel().tolist())))
        return run(self, x, ids, weights, layer, out)

    monkeypatch.setattr(ours.MoeKernel, "run", spy)

    layers = decode_order_layers("int4-g128", shape, seed=0)
    row = bench_decode_order(layers, shape, 6, 2, np.random.default_rng(0), against=ours)

    n, per_call = row["layers"], shape["top_k"] * reads[0][0].nbytes_per_expert
    assert n == len(layers) and {id(layer) for layer, _ in reads} == {id(layer) for layer in layers}
    assert all(ids == [0, 1] for _, ids in reads)  # every expert of the layer, each call
    first_timed = len(reads) - 12  # 6 calls, two versions
    for i in range(first_timed, len(reads)):
        last = max(j for j in range(i) if reads[j][0] is reads[i][0])
        between = {id(reads[j][0]) for j in range(last + 1, i)}
        assert len(between) >= n - 2 and (n - 2) * per_call >= 1 << 20
    assert row["bytes"] == shape["top_k"] * reads[0][0].nbytes_per_expert
    assert row["against"]["bytes"] == row["bytes"] and row["against_speedup"] > 0


def test_call_timeline_in_decode_order_walks_the_layers_in_turn(monkeypatch):
    """call_timeline over decode_order_layers: call j on layer j mod n, the caller's evict before each (decode
    order passes a no-op); what it returns is a timeline in the order a call runs (entered, region, tasks,
    phases, the region's end, back)."""
    shape = dict(hidden=256, inter=128, experts=4, top_k=2)
    monkeypatch.setattr(bench_kernels, "EVICT_BYTES", 1 << 20)
    layers = decode_order_layers("fp8", shape, seed=0)
    reads, evictions = [], []
    run = ours.MoeKernel.run

    def spy(self, x, ids, weights, layer, out):
        reads.append(layer)
        return run(self, x, ids, weights, layer, out)

    monkeypatch.setattr(ours.MoeKernel, "run", spy)
    calls = decode_order_calls(np.random.default_rng(0), len(layers) + 4, shape["top_k"])

    line = call_timeline(layers, shape, calls, 2, lambda: evictions.append(1), untimed=len(layers))

    assert reads == [layers[j % len(layers)] for j in range(len(calls))]
    assert len(evictions) == len(calls)
    order = ["entered", "region", "tasks started", "pack x: phase done", "gate/up: phase done"]
    assert all(line[a] <= line[b] for a, b in zip(order, order[1:]))
    assert line["gate/up: phase done"] <= line["down: last task done"] <= line["region ended"] <= line["returned"]
