"""Pack build and attach in one process: contents, read-only views, lifecycle, checks at the edges."""

from __future__ import annotations

import grp
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import posix_ipc
import pytest
from helpers.shm_pack import expected, fill_pattern, small_manifest

from hmoe.shm import Pack, PackLayout, ShmConfig, ShmError, build_pack, check_name
from hmoe.shm.header import HEADER_BYTES, LOADING, READY, STATE_OFFSET
from hmoe.shm.layout import HUGE_PAGE_BYTES
from hmoe.shm.pack_writer import PackWriter


def test_attached_pack_holds_what_was_written(ready_pack, shm_config):
    with Pack.attach("p", shm_config) as pack:
        for entry in pack.manifest.tensors:
            np.testing.assert_array_equal(pack.array(entry.name), expected(entry))
        assert set(pack.expert_arrays(1)) == {"w", "scale"}
        assert pack.blob("config.json") == b'{"a": "conf"}'
        assert pack.blob("tokenizer.json") is None
        assert pack.array("model.embed_tokens.weight").dtype == np.uint16  # bf16 words


def test_every_array_is_aligned_expert_arrays_to_pages(ready_pack):
    for entry in ready_pack.manifest.tensors:
        assert entry.offset % 64 == 0
        if entry.name.endswith(".w"):
            assert entry.offset % 4096 == 0
        assert ready_pack.array(entry.name).ctypes.data % 64 == 0


def test_views_are_read_only(ready_pack):
    view = ready_pack.array("model.norm.weight")
    assert not view.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        view[0] = 1.0
    with pytest.raises(ValueError):
        view.setflags(write=True)


def test_second_build_attaches_instead_of_loading(ready_pack, shm_config):
    def fill_must_not_run(writer):
        raise AssertionError("rebuilt a ready pack")

    pack, built = build_pack(small_manifest(), fill_must_not_run, shm_config)
    with pack:
        assert not built
        np.testing.assert_array_equal(pack.array("experts.2.w"), expected(pack.entry("experts.2.w")))


def test_pack_from_another_checkpoint_is_refused(ready_pack, shm_config):
    other = small_manifest(source={"path": "/models/x", "config_sha256": "cd"})
    with pytest.raises(ShmError) as err:
        build_pack(other, fill_pattern, shm_config)
    assert err.value.code == "pack_mismatch" and "config_sha256" in str(err.value)
    with pytest.raises(ShmError, match="expert format") as err:
        ready_pack.check_matches(experts={"kind": "int4", "group": 128})
    assert err.value.code == "pack_mismatch"
    ready_pack.check_matches(source={"path": "/models/x", "config_sha256": "ab"}, experts={"kind": "fp8"})


def test_failed_fill_leaves_no_segment(shm_config):
    def fill(writer):
        raise RuntimeError("checkpoint went away")

    with pytest.raises(RuntimeError):
        build_pack(small_manifest(), fill, shm_config)
    assert shm_config.pack_names() == []


def test_missing_pack_and_array(ready_pack, shm_config):
    with pytest.raises(ShmError) as err:
        Pack.attach("nope", shm_config)
    assert err.value.code == "pack_not_found" and "hmoe shm load" in str(err.value)
    with pytest.raises(ShmError) as err:
        ready_pack.array("model.layers.0.nothing")
    assert err.value.code == "pack_tensor_missing"
    with pytest.raises(ShmError):
        ready_pack.expert_arrays(7)


def test_unpublished_pack_does_not_attach(shm_config):
    writer = PackWriter.create(small_manifest(), shm_config)  # as if its loader died before publish
    fill_pattern(writer)
    writer.segment.close()
    with pytest.raises(ShmError) as err:
        Pack.attach("p", shm_config, wait_s=0.5)
    assert err.value.code == "pack_not_ready" and "stopped halfway" in str(err.value)
    pack, built = build_pack(small_manifest(), fill_pattern, shm_config)  # the next loader rebuilds
    with pack:
        assert built and pack.blob("config.json") == b'{"a": "conf"}'


@pytest.mark.parametrize("name", ["", "a/b", "../etc", ".hidden", "-x", "a b", "x" * 65, "n\0", "é", 7, None])
def test_invalid_names_are_refused(name):
    with pytest.raises(ShmError) as err:
        check_name(name)
    assert err.value.code == "pack_name_invalid"


def test_valid_names():
    for name in ("deepseek-v3", "Qwen3_30B.fp8", "x" * 64, "0"):
        assert check_name(name) == name


def test_segment_is_private_by_default(ready_pack, shm_config):
    mode = os.stat(shm_config.segment_path("p")).st_mode
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(shm_config.lock_path("p")).st_mode) == 0o600


def test_group_mode_gives_the_group_read_access(tmp_path):
    group = grp.getgrgid(os.getgid()).gr_name
    config = ShmConfig(group=group, prefix="hmoe.test-grp.", lock_dir=str(tmp_path))
    pack, _ = build_pack(small_manifest(), fill_pattern, config)
    try:
        st = os.stat(config.segment_path("p"))
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == os.getgid()
    finally:
        pack.close()
        posix_ipc.unlink_shared_memory(config.segment_name("p"))


def test_unknown_group_is_a_clear_error(tmp_path):
    config = ShmConfig(group="no-such-group-hmoe", prefix="hmoe.test-nogrp.", lock_dir=str(tmp_path))
    with pytest.raises(ShmError) as err:
        build_pack(small_manifest(), fill_pattern, config)
    assert err.value.code == "shm_group_unknown"


def test_pack_larger_than_free_shm_is_refused_before_creation(shm_config):
    layout = PackLayout()
    layout.add_tensor("huge", "U8", (1 << 50,))
    with pytest.raises(ShmError) as err:
        build_pack(layout.manifest("big", {}, {}, {}), fill_pattern, shm_config)
    assert err.value.code == "shm_no_space" and "GiB" in str(err.value)
    assert shm_config.pack_names() == []


def _tamper(config: ShmConfig, offset: int, data: bytes) -> None:
    shm = posix_ipc.SharedMemory(config.segment_name("p"))
    try:
        os.pwrite(shm.fd, data, offset)
    finally:
        shm.close_fd()


@pytest.mark.parametrize(
    "where, data, code",
    [
        (0, b"NOTAPACK", "pack_not_hmoe"),
        (8, (99).to_bytes(4, "little"), "pack_version"),
        (STATE_OFFSET, LOADING.to_bytes(4, "little"), "pack_not_ready"),
        ("manifest", b"\xff", "pack_corrupt"),
        (16, (123).to_bytes(8, "little"), "pack_corrupt"),  # total_bytes
    ],
)
def test_tampered_header_or_manifest_never_attaches(ready_pack, shm_config, where, data, code):
    offset = ready_pack.header.manifest_offset + 5 if where == "manifest" else where
    _tamper(shm_config, offset, data)
    with pytest.raises(ShmError) as err:
        Pack.attach("p", shm_config)
    assert err.value.code == code


def test_ready_state_is_written_last(shm_config):
    writer = PackWriter.create(small_manifest(), shm_config)
    state = lambda: int.from_bytes(writer.segment.buffer(STATE_OFFSET, 4), "little")  # noqa: E731
    assert state() == LOADING
    fill_pattern(writer)
    assert state() == LOADING
    manifest_view = writer.segment.buffer(HEADER_BYTES)  # the manifest is in place before publish
    del manifest_view
    writer.publish()
    with Pack.attach("p", shm_config) as pack:
        assert pack.header.state == READY
        data = bytes(pack.segment.buffer(pack.header.manifest_offset, pack.header.manifest_bytes))
        assert hashlib.sha256(data).digest() == pack.header.manifest_sha256


def test_close_with_live_views_keeps_them_valid(shm_config):
    pack, _ = build_pack(small_manifest(), fill_pattern, shm_config)
    view = pack.array("experts.1.w")
    pack.close()
    pack.close()  # idempotent
    np.testing.assert_array_equal(view, expected(pack.entry("experts.1.w")))


@pytest.mark.parametrize("hugetlbfs", [False, True])
def test_copy_from_file_lands_bytes_at_the_offset(tmp_path, hugetlbfs):
    source = tmp_path / "src.bin"
    payload = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    source.write_bytes(b"xx" + payload.tobytes())
    (tmp_path / "huge").mkdir()
    config = ShmConfig(
        hugetlbfs=str(tmp_path / "huge") if hugetlbfs else "", prefix="hmoe.test-copy.", lock_dir=str(tmp_path)
    )
    writer = PackWriter.create(small_manifest(expert_bytes=4 << 20), config)
    try:
        entry = writer.manifest_entry("experts.1.w")
        fd = os.open(source, os.O_RDONLY)
        writer.segment.copy_from_file(entry.offset + 100, fd, 2, payload.nbytes)
        np.testing.assert_array_equal(writer.array("experts.1.w").reshape(-1)[100 : 100 + payload.nbytes], payload)
        with pytest.raises(EOFError):
            writer.segment.copy_from_file(entry.offset, fd, 2, payload.nbytes + 1)
        os.close(fd)
    finally:
        writer.abort()
    assert config.pack_names() == []


def test_hugetlbfs_holds_packs_as_files_sized_in_huge_pages(tmp_path):
    # A plain directory stands in for the hugetlbfs mount: same code path, 2 MiB rounding.
    config = ShmConfig(hugetlbfs=str(tmp_path / "huge"), prefix="hmoe.test-huge.", lock_dir=str(tmp_path))
    (tmp_path / "huge").mkdir()
    pack, built = build_pack(small_manifest(), fill_pattern, config)
    with pack:
        assert built and config.pack_names() == ["p"]
        assert pack.segment.nbytes % HUGE_PAGE_BYTES == 0
        np.testing.assert_array_equal(pack.array("experts.1.w"), expected(pack.entry("experts.1.w")))


_HUGE_PACK = """
import numpy as np
from helpers.shm_pack import expected, fill_pattern, small_manifest
from hmoe.shm import Pack, ShmConfig, build_pack
from hmoe.shm.segment import uses_huge_pages

def pmd_mapped_kib(address):
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        start, _, end = line.split()[0].partition("-")
        if "-" in line.split()[0] and int(start, 16) <= address < int(end, 16):
            for field in lines[i + 1 :]:
                if field.startswith("ShmemPmdMapped:"):
                    return int(field.split()[1])
    raise LookupError(hex(address))

config = ShmConfig(prefix="hmoe.test-thp.", lock_dir="/dev/shm")
assert uses_huge_pages(config)
pack, _ = build_pack(small_manifest(expert_bytes=8 << 20), fill_pattern, config)
with pack, Pack.attach("p", config) as reader:
    entry = reader.entry("experts.1.w")
    np.testing.assert_array_equal(reader.array("experts.1.w"), expected(entry))  # faults the reader's view in
    print(pmd_mapped_kib(reader.segment.address))
"""


def test_packs_get_huge_pages_where_dev_shm_is_mounted_huge_advise(tmp_path):
    # The README's set-up: tmpfs gives huge pages only to faults through a mapping that asked for them,
    # so a segment whose pages fallocate or write() allocated stays in 4 KiB pages (the kernels stream
    # those at about half speed). Run as root in a private mount namespace with its own /dev/shm.
    script = tmp_path / "huge_pack.py"
    script.write_text(_HUGE_PACK)
    mount = "mount -t tmpfs -o size=256m,huge=advise tmpfs /dev/shm"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path])}
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{mount} && exec "$0" "$1"']
        + [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if done.returncode and ("unshare" in done.stderr or "mount" in done.stderr) and "Traceback" not in done.stderr:
        pytest.skip(f"needs root for a private /dev/shm: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 8 << 10, done.stdout  # the experts' 8 MiB at least, in 2 MiB mappings
