"""The fixed header page: round trip, the state word's place, bounds."""

from __future__ import annotations

import pytest

from hmoe.shm import ShmError
from hmoe.shm.header import FORMAT_VERSION, HEADER_BYTES, READY, STATE_OFFSET, Header


def header(**changes) -> Header:
    fields = dict(
        format_version=FORMAT_VERSION,
        state=READY,
        total_bytes=1 << 20,
        manifest_offset=8192,
        manifest_bytes=100,
        manifest_sha256=b"s" * 32,
        loader_pid=42,
        created_ns=7,
    )
    return Header(**(fields | changes))


def test_round_trip_and_state_word_position():
    data = header().pack()
    assert Header.unpack(data, "t") == header()
    assert int.from_bytes(data[STATE_OFFSET : STATE_OFFSET + 4], "little") == READY


def test_all_zero_or_empty_page_reads_as_empty():
    assert Header.unpack(bytes(HEADER_BYTES), "t").state == 0
    assert Header.unpack(b"", "t").state == 0


def test_short_data_is_not_a_pack():
    with pytest.raises(ShmError) as err:
        Header.unpack(b"HMOEPACK", "t")
    assert err.value.code == "pack_not_hmoe"


@pytest.mark.parametrize(
    "changes",
    [
        dict(total_bytes=1 << 21),
        dict(manifest_offset=0),
        dict(manifest_bytes=0),
        dict(manifest_offset=(1 << 20) - 50),
        dict(manifest_bytes=1 << 40),
    ],
)
def test_bounds(changes):
    header().check_bounds(1 << 20, 1 << 26, "t")
    with pytest.raises(ShmError) as err:
        header(**changes).check_bounds(1 << 20, 1 << 26, "t")
    assert err.value.code == "pack_corrupt"
