"""moe.py: the fused layer against the float64 reference, every format, token count and routing shape."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from helpers.kernel_layers import random_layer

from hmoe.kernels import reference as ref
from hmoe.kernels.amx import AMX_BLOCK_GROUPS
from hmoe.kernels.formats import ExpertFormat, LayerExperts
from hmoe.kernels.jit import amx_usable
from hmoe.kernels.moe import (
    AMX_MIN_SLOTS,
    INT4_AMX_MIN_SLOTS,
    ITEMS_PER_TASK,
    MIN_STREAM_BYTES,
    PACK_COLS,
    PHASES,
    QUANT_MIN_COLS,
    TASK_END,
    TASK_START,
    MoeKernel,
    down_item,
    down_items,
    item_rows,
    quant_chunk,
    route,
)

E, H, I = 12, 256, 384


def routing(rng, tokens: int, top_k: int, num_experts: int, kind: str):
    """ids [T, K] (distinct per token) and weights [T, K]; 'skewed': most tokens share a few experts."""
    if kind == "uniform":
        ids = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :top_k]
    else:  # uneven loads: expert 0 in every token, experts 1-3 in most, the rest rarely; neighbours share
        p = np.r_[np.full(3, 8.0), np.ones(num_experts - 4)]
        ids = np.stack(
            [np.r_[0, 1 + rng.choice(num_experts - 1, top_k - 1, replace=False, p=p / p.sum())] for _ in range(tokens)]
        )
    return np.ascontiguousarray(ids, np.int64), rng.random((tokens, top_k), dtype=np.float32) + 0.1


@pytest.fixture(scope="module")
def layers():
    return {
        f.name: random_layer(f, E, H, I, seed=i)
        for i, f in enumerate(
            [ExpertFormat("bf16"), ExpertFormat("fp8"), ExpertFormat("int4", 32), ExpertFormat("int4", 128)]
        )
    }


@pytest.mark.parametrize("tokens", [1, 2, 7, 64])
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_layer_matches_reference(layers, fmt, tokens, kind):
    rng = np.random.default_rng(tokens * 10 + len(kind))
    layer = layers[fmt.name]
    top_k = 8 if kind == "skewed" else (1 + tokens % 8)
    ids, w = routing(rng, tokens, top_k, E, kind)
    x = rng.standard_normal((tokens, H), dtype=np.float32)
    out = np.full((tokens, H), np.nan, np.float32)  # poison: every element must be written
    kernel = MoeKernel(H, I, 64, top_k, num_threads=3)  # 3 tasks on 2 cores: uneven row shares too
    n_active = kernel.run(x, ids, w, layer, out)
    assert n_active == len(np.unique(ids))
    if fmt.kind == "int4":  # int8 activations: compare with the reference that quantizes them the same way
        want = ref.moe_reference(x, ids, w, layer, kernel_activations=True)
        assert np.linalg.norm(out - want) / np.linalg.norm(want) < 2e-3
        exact = ref.moe_reference(x, ids, w, layer)
        assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < 3e-2  # what int8 activations cost
    else:  # bf16, fp8: bf16 activations
        want = ref.moe_reference(x, ids, w, layer, kernel_activations=True)
        assert np.linalg.norm(out - want) / np.linalg.norm(want) < 1e-4  # h's rounding may differ by an ulp
        exact = ref.moe_reference(x, ids, w, layer)
        assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < 1e-2  # what bf16 activations cost


@pytest.mark.skipif(not amx_usable(), reason="needs AMX (tile, bf16, int8) and the kernel's permission to use it")
@pytest.mark.parametrize("tokens,top_k", [(5, 8), (30, 3), (24, 2), (150, 8)])
@pytest.mark.parametrize("fmt_name", ["bf16", "fp8", "int4-g128"])
def test_experts_with_many_slots_run_on_amx_tiles(layers, fmt_name, tokens, top_k):
    """A call with experts of many slots (AMX) and of few (AVX-512 tiles), with AMX and without: the same
    results but for the order of sums, both as the reference with the kernels' activations (bf16; int8 for
    int4) says. 150 tokens x 8: an expert with more than AMX_BLOCK_GROUPS groups of 16 (fp8 decodes, int4
    unpacks, a block once per that many). INT4 quantizes h per slot: where AMX and AVX-512 sum h an ulp
    apart, a code may round the other way, an int8 step of that h (tolerance as in
    test_layer_matches_reference)."""
    rng = np.random.default_rng(tokens)
    layer = layers[fmt_name]
    ids, w = routing(rng, tokens, top_k, E, "skewed")
    x = rng.standard_normal((tokens, H), dtype=np.float32)
    counts = np.bincount(ids.reshape(-1), minlength=E)
    min_slots = INT4_AMX_MIN_SLOTS if fmt_name.startswith("int4") else AMX_MIN_SLOTS
    if tokens < 100 and counts.max() >= min_slots:
        assert min_slots > counts[counts > 0].min()  # both paths in one call
    elif tokens < 100:
        assert fmt_name.startswith("int4") and tokens == 5  # int4's threshold is higher: AVX-512 only here
    else:
        assert counts.max() > 16 * AMX_BLOCK_GROUPS
    outs = {}
    for amx in (True, False):
        out = np.full((tokens, H), np.nan, np.float32)
        MoeKernel(H, I, 256, top_k, num_threads=3, amx=amx).run(x, ids, w, layer, out)
        outs[amx] = out
    want = ref.moe_reference(x, ids, w, layer, kernel_activations=True)
    tolerance, apart = (5e-4, 2e-3) if fmt_name.startswith("int4") else (1e-4, 1e-4)
    for out in outs.values():  # an element of h whose float32 and float64 values round apart: one bf16 ulp
        assert np.linalg.norm(out - want) / np.linalg.norm(want) < tolerance
    assert np.abs(outs[True] - outs[False]).max() <= apart * np.abs(want).max()
    # The AMX path ran (its sums go in another order), where an expert had enough slots for it.
    assert np.array_equal(outs[True], outs[False]) == (counts.max() < min_slots)


@pytest.mark.skipif(not amx_usable(), reason="needs AMX (tile, bf16, int8) and the kernel's permission to use it")
@pytest.mark.parametrize("fmt_name", ["bf16", "fp8", "int4-g128"])
def test_amx_packs_rows_longer_than_a_pack_item(fmt_name):
    """x (and int4's h) packed as B tiles in items of PACK_COLS columns, the last one shorter (x in 2 items,
    h in 3): with AMX and without, the same results as the reference but for the order of sums."""
    hidden, inter = PACK_COLS + 128, 2 * PACK_COLS + 128
    layer = random_layer(ExpertFormat.parse(fmt_name), 4, hidden, inter, seed=13)
    rng = np.random.default_rng(13)
    ids, w = routing(rng, 16, 4, 4, "uniform")  # every expert's 16 slots: one AMX group each
    x = rng.standard_normal((16, hidden), dtype=np.float32)
    outs = {}
    for amx in (True, False):
        outs[amx] = np.full((16, hidden), np.nan, np.float32)
        MoeKernel(hidden, inter, 16, 4, num_threads=3, amx=amx).run(x, ids, w, layer, outs[amx])
    want = ref.moe_reference(x, ids, w, layer, kernel_activations=True)
    tolerance, apart = (2e-3, 2e-3) if fmt_name.startswith("int4") else (1e-4, 1e-4)  # as in the tests above
    for out in outs.values():
        assert np.linalg.norm(out - want) / np.linalg.norm(want) < tolerance
    assert np.abs(outs[True] - outs[False]).max() <= apart * np.abs(want).max()
    assert not np.array_equal(outs[True], outs[False])  # the AMX pass ran


def test_padded_dims_and_thread_counts(fmt):
    hidden, inter = 200, 72
    layer = random_layer(fmt, 5, hidden, inter, seed=7)
    rng = np.random.default_rng(0)
    ids, w = routing(rng, 12, 4, 5, "uniform")
    # Where the CPU has AMX, bf16, fp8 and int4-g128 take it here (int4-g32 stays on AVX-512).
    assert np.bincount(ids.reshape(-1)).max() >= INT4_AMX_MIN_SLOTS
    x = rng.standard_normal((12, hidden), dtype=np.float32)
    want = ref.moe_reference(x, ids, w, layer, kernel_activations=True)
    tolerance = 2e-3 if fmt.kind == "int4" else 1e-4
    for threads in (1, 2, 5):
        out = np.full((12, hidden), np.nan, np.float32)
        MoeKernel(hidden, inter, 16, 4, num_threads=threads).run(x, ids, w, layer, out)
        assert np.linalg.norm(out - want) / np.linalg.norm(want) < tolerance
        if amx_usable() and fmt.name != "int4-g32":  # the AMX pass ran: its sums go in another order
            avx = np.full((12, hidden), np.nan, np.float32)
            MoeKernel(hidden, inter, 16, 4, num_threads=threads, amx=False).run(x, ids, w, layer, avx)
            assert not np.array_equal(out, avx)


def test_route_groups_slots_by_expert():
    ids = np.array([[3, 1], [1, 0], [3, 2]], np.int64)
    n = ids.size
    keys, slot_of, active_id, active_start = (np.zeros(n, np.int64) for _ in range(4))
    active_start = np.zeros(n + 1, np.int64)
    n_active = route(ids, 4, keys, slot_of, active_id, active_start)
    assert n_active == 4 and active_id[:4].tolist() == [0, 1, 2, 3]
    groups = {
        int(active_id[a]): sorted(slot_of[active_start[a] : active_start[a + 1]].tolist()) for a in range(n_active)
    }
    assert groups == {0: [3], 1: [1, 2], 2: [5], 3: [0, 4]}
    assert route(np.array([[4]], np.int64), 4, keys, slot_of, active_id, active_start) == -1


@pytest.mark.parametrize(
    "rows,units,tasks,row_bytes",
    [
        (768, 8, 16, 2048),
        (2048, 8, 16, 7168),
        (7168, 1, 16, 2048),
        (2048, 1, 16, 768),
        (2048, 1, 16, 384),
        (128, 1, 3, 256),
        (2048, 60, 2, 4096),
    ],
)
def test_item_rows_split_finely_but_keep_streams_long(rows, units, tasks, row_bytes):
    r = item_rows(rows, units, tasks, row_bytes)
    assert r in (16, 32, 64, 128) and 128 % r == 0  # an item never straddles a 128-row FP8 scale block
    assert r == 128 or r * row_bytes >= MIN_STREAM_BYTES  # an expert's part of an item streams long enough
    enough = units * -(-rows // r) >= ITEMS_PER_TASK * tasks
    assert enough or r == 16 or (r // 2) * row_bytes < MIN_STREAM_BYTES  # finer only where it would still stream
    assert r == 128 or units * -(-rows // (2 * r)) < ITEMS_PER_TASK * tasks  # the largest that is fine enough


@pytest.mark.parametrize("hp,tasks", [(2048, 16), (7168, 16), (7168, 13), (256, 2), (128, 3), (1280, 2), (2048, 1)])
def test_down_items_cover_the_rows_once_and_end_in_small_ones(hp, tasks):
    """Every output row in exactly one item, in order, none across a 128-row FP8 scale block; the last ones
    (at most `tasks`, at most half the rows) a quarter of the others, for the tasks that finish early."""
    for rows in (16, 32, 64, 128):
        items = [down_item(i, hp, rows, tasks) for i in range(down_items(hp, rows, tasks))]
        assert [r for item in items for r in range(*item)] == list(range(hp))
        assert all(r0 // 128 == (r1 - 1) // 128 for r0, r1 in items)
        small = [r1 - r0 for r0, r1 in items if r1 - r0 < rows]
        assert len(small) <= tasks + 1 and sum(small) <= hp // 2 + rows
        tail = [r1 - r0 for r0, r1 in items[-min(tasks, hp // 2 // max(16, rows // 4)) :]]
        assert all(size == max(16, rows // 4) for size in tail)


@pytest.mark.parametrize(
    "cols,rows,tasks", [(7168, 1, 16), (2048, 1, 16), (768, 8, 16), (2048, 8, 16), (7168, 16, 16), (1280, 1, 2)]
)
def test_quant_chunks_are_whole_128s_within_a_row(cols, rows, tasks):
    c = quant_chunk(cols, rows, tasks)
    assert c % 128 == 0 and 0 < c <= cols
    assert c == cols or c >= QUANT_MIN_COLS


@pytest.mark.parametrize("group", [32, 128])
def test_int4_activations_quantized_in_pieces(group):
    """x and h longer than QUANT_MIN_COLS at T=1, K=1: each is quantized in two items, the second shorter."""
    hidden = inter = QUANT_MIN_COLS + 256
    layer = random_layer(ExpertFormat("int4", group), 2, hidden, inter, seed=11)
    rng = np.random.default_rng(2)
    x, ids, w = (
        rng.standard_normal((1, hidden), dtype=np.float32),
        np.array([[1]], np.int64),
        np.array([[0.7]], np.float32),
    )
    assert quant_chunk(hidden, 1, 2) == QUANT_MIN_COLS  # two items: 1024 + 256 inputs
    out = np.full((1, hidden), np.nan, np.float32)
    MoeKernel(hidden, inter, 1, 1, num_threads=2).run(x, ids, w, layer, out)
    want = ref.moe_reference(x, ids, w, layer, kernel_activations=True)
    assert np.linalg.norm(out - want) / np.linalg.norm(want) < 2e-3


def test_fewer_threads_than_tasks_still_ends_and_agrees(layers, fmt):
    """Tasks claim work items; one that waits never waits on a task that has not started, so a call whose
    tasks run one after another on a single thread finishes, with the same result."""
    import numba

    rng = np.random.default_rng(5)
    ids, w = routing(rng, 6, 4, E, "skewed")
    x = rng.standard_normal((6, H), dtype=np.float32)
    kernel = MoeKernel(H, I, 8, 4, num_threads=2)
    want, out = np.empty((6, H), np.float32), np.empty((6, H), np.float32)
    kernel.run(x, ids, w, layers[fmt.name], want)
    numba.set_num_threads(1)  # the kernel's 2 tasks now run on one thread, one after the other
    try:
        kernel.run(x, ids, w, layers[fmt.name], out)
    finally:
        numba.set_num_threads(kernel.num_threads)
    assert np.array_equal(out, want)


@pytest.mark.parametrize("tokens", [1, 16])
def test_timeline_stamps_every_phase_in_the_order_it_runs(layers, fmt, tokens):
    """Each task stamps its start, the start and end of its wait for each phase, and its end, in the order it
    runs them, after the kernel entered and its region began, and before the region ended (16 tokens: some
    experts on AMX where usable)."""
    rng = np.random.default_rng(6)
    ids, w = routing(rng, tokens, 4, E, "skewed")
    x = rng.standard_normal((tokens, H), dtype=np.float32)
    kernel = MoeKernel(H, I, 16, 4, num_threads=2)
    kernel.run(x, ids, w, layers[fmt.name], np.empty_like(x))

    entered, region, ended, tasks = kernel.timeline()

    order = [TASK_START] + [s for _, p in PHASES[fmt.kind] for s in (2 * p, 2 * p + 1)] + [TASK_END]
    assert 0 < entered <= region
    assert len(tasks) == 2
    for stamps in tasks[:, order]:
        assert region <= stamps[0] and stamps[-1] <= ended
        assert np.all(np.diff(stamps) >= 0), stamps - stamps[0]


def test_bad_inputs_fail_loudly(layers):
    """Every input the kernel cannot take is refused before it runs, with the reason, and the next good
    call gives the same output as one before the refusals (the scratch is left as it was)."""
    layer = layers["fp8"]
    kernel = MoeKernel(H, I, 4, 2, num_threads=2)
    rng = np.random.default_rng(3)
    x, out = rng.standard_normal((1, H), dtype=np.float32), np.empty((1, H), np.float32)
    ids, w = np.array([[0, 1]], np.int64), np.array([[0.25, 0.75]], np.float32)
    kernel.run(x, ids, w, layer, out)
    want = out.copy()
    wide = np.ones((1, 2 * H), np.float32)
    bad = [
        (ValueError, "outside", (x, np.array([[0, E]], np.int64), w, layer, out)),
        (ValueError, "outside", (x, np.array([[-1, 0]], np.int64), w, layer, out)),
        (TypeError, "ids int32", (x, ids.astype(np.int32), w, layer, out)),
        (TypeError, "x float64", (x.astype(np.float64), ids, w, layer, out)),
        (TypeError, "out float64", (x, ids, w, layer, out.astype(np.float64))),
        (
            ValueError,
            "at most 4 tokens",
            (
                np.ones((5, H), np.float32),
                np.zeros((5, 2), np.int64),
                np.ones((5, 2), np.float32),
                layer,
                np.empty((5, H), np.float32),
            ),
        ),
        (ValueError, "H=", (wide, ids, w, layer, np.empty_like(wide))),
        (ValueError, "H=", (x[0], ids, w, layer, out[0])),
        (ValueError, "out", (x, ids, w, layer, np.empty((2, H), np.float32))),
        (ValueError, "top-2", (x, np.zeros((1, 3), np.int64), np.ones((1, 3), np.float32), layer, out)),
        (ValueError, "weights", (x, ids, np.ones((2, 1), np.float32), layer, out)),
        (ValueError, "C-contiguous", (wide[:, ::2], ids, w, layer, out)),
        (ValueError, "C-contiguous", (x, ids, w, layer, np.empty((1, 2 * H), np.float32)[:, ::2])),
        (ValueError, "I=", (x, ids, w, LayerExperts.allocate(layer.fmt, E, H, 2 * I), out)),
    ]
    for error, reason, args in bad:
        with pytest.raises(error, match=reason):
            kernel.run(*args)
    kernel.run(x, ids, w, layer, out)
    np.testing.assert_array_equal(out, want)


def test_call_releases_the_gil():
    """A Python thread keeps running while a kernel call is in progress."""
    layer = random_layer(ExpertFormat("fp8"), 8, 2048, 768, seed=3)
    kernel = MoeKernel(2048, 768, 64, 8, num_threads=2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 2048), dtype=np.float32)
    ids = np.tile(np.arange(8, dtype=np.int64), (64, 1))
    w = np.ones((64, 8), np.float32)
    out = np.empty_like(x)
    kernel.run(x, ids, w, layer, out)  # compiled before the measured call
    in_call, done = threading.Event(), threading.Event()

    def work():
        in_call.set()
        kernel.run(x, ids, w, layer, out)
        done.set()

    thread = threading.Thread(target=work)
    thread.start()
    in_call.wait()
    progress = 0
    while not done.is_set():
        progress += 1
    thread.join()
    assert progress > 10_000  # with the GIL held during the call this stays near zero
