"""Weight packs across real processes: shared pages, failed writes, SIGKILLed and concurrent loaders, ls/rm/gc."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
from helpers.shm_pack import CHILD_TIMEOUT_S, child, expected, fill_pattern, small_manifest, wait_line

from hmoe.shm import Pack, ShmError, build_pack, collect_garbage, list_packs, remove_pack

EXPERT_BYTES = 32 << 20  # per layer; the pack holds two layers, 64 MiB


def smaps_rollup(pid: int) -> dict[str, int]:
    """kB fields of /proc/PID/smaps_rollup."""
    fields = {}
    for line in open(f"/proc/{pid}/smaps_rollup").read().splitlines()[1:]:
        key, value, *_ = line.split()
        fields[key.rstrip(":")] = int(value)
    return fields


ATTACH_AND_TOUCH = """
pack = Pack.attach("p", config)
print("attached", flush=True)
sys.stdin.readline()
total = sum(int(pack.array(t.name).view(np.uint8).sum(dtype=np.uint64)) for t in pack.manifest.tensors)
print("touched", total, flush=True)
sys.stdin.readline()
"""


def test_two_attached_processes_share_the_pack_pages(shm_config):
    pack, _ = build_pack(small_manifest(expert_bytes=EXPERT_BYTES), fill_pattern, shm_config)
    pack_kb = pack.segment.nbytes >> 10
    pack.close()
    procs = [child(ATTACH_AND_TOUCH, shm_config) for _ in range(2)]
    try:
        for p in procs:
            wait_line(p, "attached")
        before = [smaps_rollup(p.pid) for p in procs]
        for p in procs:
            p.stdin.write("\n")
            p.stdin.flush()
        sums = {wait_line(p, "touched") for p in procs}
        after = [smaps_rollup(p.pid) for p in procs]
        assert len(sums) == 1  # both read the same bytes
        for b, a in zip(before, after):
            private_kb = (a["Private_Clean"] + a["Private_Dirty"]) - (b["Private_Clean"] + b["Private_Dirty"])
            assert a["Rss"] - b["Rss"] >= 0.9 * pack_kb  # each one really mapped every page
            assert private_kb < pack_kb / 16, (private_kb, pack_kb)  # ... and owns none of them
            assert a["Pss"] - b["Pss"] < 0.6 * pack_kb  # each is charged about half
        assert sorted(list_packs(shm_config)[0].attached_pids) == sorted(p.pid for p in procs)
    finally:
        for p in procs:
            p.kill()
            p.wait(CHILD_TIMEOUT_S)


def test_writes_through_views_fail(ready_pack, shm_config):
    writer = child(
        """
        import ctypes
        pack = Pack.attach("p", config)
        view = pack.array("experts.1.w")
        try:
            view[0, 0] = 99
        except ValueError as exc:
            print("numpy refused:", exc, flush=True)
        ctypes.memset(view.ctypes.data, 99, 16)  # under numpy's guard: the page itself is read-only
        print("wrote", flush=True)
        """,
        shm_config,
    )
    out, err = writer.communicate(timeout=CHILD_TIMEOUT_S)
    assert "numpy refused: assignment destination is read-only" in out
    assert "wrote" not in out and writer.returncode == -signal.SIGSEGV
    np.testing.assert_array_equal(ready_pack.array("experts.1.w"), expected(ready_pack.entry("experts.1.w")))


def test_a_killed_worker_leaves_the_pack_attachable(ready_pack, shm_config):
    attach = (
        'pack = Pack.attach("p", config); print("attached", int(pack.array("experts.1.w").sum()), flush=True); '
        "sys.stdin.readline()"
    )
    first = child(attach, shm_config)
    wait_line(first, "attached")
    assert list_packs(shm_config)[0].attached_pids == (first.pid,)
    first.kill()  # a worker crash: no close(), no cleanup
    first.wait(CHILD_TIMEOUT_S)
    assert list_packs(shm_config)[0].attached_pids == ()
    second = child(attach, shm_config)
    try:
        assert int(wait_line(second, "attached").split()[1]) == int(ready_pack.array("experts.1.w").sum())
        assert list_packs(shm_config)[0].attached_pids == (second.pid,)
    finally:
        second.kill()
        second.wait(CHILD_TIMEOUT_S)


SLOW_LOADER = """
def fill(writer):
    arrays = [t.name for t in writer.manifest.tensors]
    for index, name in enumerate(arrays):
        writer.array(name)[...] = 1
        if index == len(arrays) // 2:
            print("halfway", flush=True)
            time.sleep(float(os.environ.get("HALFWAY_SLEEP_S", "60")))
    fill_pattern(writer)
pack, built = build_pack(small_manifest(), fill, config)
print("built" if built else "attached", int(pack.array("experts.2.w").sum()), flush=True)
"""


def test_sigkill_halfway_leaves_nothing_ready_and_next_load_rebuilds(shm_config):
    loader = child(SLOW_LOADER, shm_config)
    wait_line(loader, "halfway")
    loader.send_signal(signal.SIGKILL)
    loader.wait(CHILD_TIMEOUT_S)
    with pytest.raises(ShmError) as err:
        Pack.attach("p", shm_config)
    assert err.value.code == "pack_not_ready" and f"pid {loader.pid}" in str(err.value)
    assert [(i.state, i.loader_pid) for i in list_packs(shm_config)] == [("incomplete", loader.pid)]
    pack, built = build_pack(small_manifest(), fill_pattern, shm_config)
    with pack:
        assert built
        for entry in pack.manifest.tensors:
            np.testing.assert_array_equal(pack.array(entry.name), expected(entry))


def test_concurrent_loaders_one_loads_the_other_waits_and_attaches(shm_config):
    loaders = [child(SLOW_LOADER, shm_config, env=os.environ | {"HALFWAY_SLEEP_S": "0.5"}) for _ in range(2)]
    outs = [p.communicate(timeout=CHILD_TIMEOUT_S) for p in loaders]
    results = sorted(out.split()[-2] for out, _ in outs)
    assert results == ["attached", "built"], outs
    assert len({out.split()[-1] for out, _ in outs}) == 1  # same contents seen by both


def test_attach_waits_for_a_loader_in_progress(shm_config):
    loader = child(SLOW_LOADER, shm_config, env=os.environ | {"HALFWAY_SLEEP_S": "1"})
    try:
        wait_line(loader, "halfway")
        assert list_packs(shm_config)[0].state == "loading"
        with pytest.raises(ShmError, match="still being loaded"):
            Pack.attach("p", shm_config)
        with pytest.raises(ShmError) as err:
            remove_pack("p", shm_config)
        assert err.value.code == "pack_busy"
        start = time.monotonic()
        with Pack.attach("p", shm_config, wait_s=CHILD_TIMEOUT_S) as pack:
            assert time.monotonic() - start > 0.3
            np.testing.assert_array_equal(pack.array("experts.1.w"), expected(pack.entry("experts.1.w")))
    finally:
        loader.communicate(timeout=CHILD_TIMEOUT_S)


def test_gc_removes_incomplete_and_unattached_packs_only(shm_config):
    for name in ("unused", "used"):
        pack, _ = build_pack(small_manifest(name), fill_pattern, shm_config)
        pack.close()
    loader = child(SLOW_LOADER.replace("small_manifest()", 'small_manifest("dead")'), shm_config)
    wait_line(loader, "halfway")
    loader.kill()
    loader.wait(CHILD_TIMEOUT_S)
    user = child('pack = Pack.attach("used", config); print("attached", flush=True); sys.stdin.readline()', shm_config)
    try:
        wait_line(user, "attached")
        planned = collect_garbage(shm_config, dry_run=True)
        assert sorted((a.name, a.removed) for a in planned) == [("dead", False), ("unused", False)]
        assert sorted(shm_config.pack_names()) == ["dead", "unused", "used"]  # a dry run removes nothing
        done = collect_garbage(shm_config)
        assert sorted((a.name, a.removed) for a in done) == [("dead", True), ("unused", True)]
        assert shm_config.pack_names() == ["used"]
        with pytest.raises(ShmError) as err:
            remove_pack("used", shm_config)
        assert err.value.code == "pack_busy" and str(user.pid) in str(err.value)
        remove_pack("used", shm_config, force=True)
        user.stdin.write("\n")
        user.stdin.flush()
        assert user.wait(CHILD_TIMEOUT_S) == 0  # its mapping outlived the name
    finally:
        user.kill()
    assert shm_config.pack_names() == []
    assert collect_garbage(shm_config) == []  # lock files went with their packs


def test_a_pack_we_may_not_read_is_listed_not_fatal(ready_pack, shm_config, monkeypatch):
    import hmoe.shm.registry as registry

    def denied(name, config, pids=()):
        raise ShmError("shm_permission", f"{name}: permission denied")

    monkeypatch.setattr(registry, "inspect_pack", denied)
    [info] = list_packs(shm_config)
    assert info.state == "invalid" and "permission denied" in info.problem and info.nbytes == ready_pack.segment.nbytes


def test_attach_waits_for_a_loader_that_has_not_created_the_segment_yet(shm_config):
    from hmoe.shm.lock import PackLock

    planner = child(
        """
        import hmoe.shm.pack_writer as pack_writer
        create = pack_writer.PackWriter.create

        def slow_create(manifest, config):  # the lock is held, the segment not yet there
            print("locked", flush=True)
            time.sleep(0.5)
            return create(manifest, config)

        pack_writer.PackWriter.create = slow_create
        pack, built = build_pack(small_manifest(), fill_pattern, config)
        print("built", built, flush=True)
        sys.stdin.readline()
        """,
        shm_config,
    )
    try:
        wait_line(planner, "locked")
        with pytest.raises(ShmError) as err:
            Pack.attach("p", shm_config)  # no wait asked: not there
        assert err.value.code == "pack_not_found"
        with Pack.attach("p", shm_config, wait_s=CHILD_TIMEOUT_S) as pack:
            np.testing.assert_array_equal(pack.array("experts.1.w"), expected(pack.entry("experts.1.w")))
        assert wait_line(planner, "built") == "built True"
    finally:
        planner.kill()
        planner.wait(CHILD_TIMEOUT_S)
    assert not PackLock("q", shm_config).path.exists()
    with pytest.raises(ShmError):
        Pack.attach("q", shm_config, wait_s=1.0)  # no loader at all: fails at once, creates no lock file
    assert not PackLock("q", shm_config).path.exists()
