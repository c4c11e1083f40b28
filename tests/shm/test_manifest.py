"""The manifest parser: exact round trip, and every corruption (hand-made or fuzzed) is a pack_corrupt error."""

from __future__ import annotations

import msgpack
import pytest
from helpers.shm_pack import small_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hmoe.shm import Manifest, ShmError
from hmoe.shm.header import HEADER_BYTES
from hmoe.shm.manifest import DTYPES

DATA_END = 1 << 20


def raw_manifest() -> dict:
    return msgpack.unpackb(small_manifest().encode())


def decode(raw) -> Manifest:
    return Manifest.decode(msgpack.packb(raw), DATA_END, "test")


def test_round_trip():
    manifest = small_manifest()
    decoded = Manifest.decode(manifest.encode(), manifest.data_end, "test")
    assert decoded.tensors == manifest.tensors and decoded.blobs == manifest.blobs
    assert decoded.source == manifest.source and decoded.experts == manifest.experts


def _set(raw: dict, path: tuple, value) -> dict:
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    "path, value",
    [
        (("tensors", 0, "offset"), DATA_END),  # past the end
        (("tensors", 0, "offset"), 0),  # over the header
        (("tensors", 0, "offset"), HEADER_BYTES + 4),  # misaligned
        (("tensors", 0, "nbytes"), -4),
        (("tensors", 0, "nbytes"), 7),  # does not match dtype x shape
        (("tensors", 0, "shape"), [-1, 16]),
        (("tensors", 0, "shape"), [1] * 9),
        (("tensors", 0, "shape"), "16"),
        (("tensors", 0, "shape"), [True]),
        (("tensors", 0, "dtype"), "F128"),
        (("tensors", 0, "offset"), "4096"),
        (("tensors", 0, "offset"), 4096.0),
        (("tensors", 0, "layer"), True),
        (("tensors", 0, "layer"), -2),
        (("tensors", 0, "name"), ""),
        (("tensors", 0, "name"), 12),
        (("tensors", 1, "name"), "model.norm.weight"),  # duplicate
        (("tensors", 1, "offset"), HEADER_BYTES),  # overlaps tensor 0
        (("tensors", 0), [1, 2, 3]),
        (("blobs", 0, "offset"), DATA_END - 4),
        (("blobs", 0, "name"), None),
        (("name",), "../etc/passwd"),
        (("source",), []),
        (("tensors",), {}),
        (("format_version",), "1"),
    ],
)
def test_corrupted_field_is_refused(path, value):
    with pytest.raises(ShmError) as err:
        decode(_set(raw_manifest(), path, value))
    assert err.value.code == "pack_corrupt"


def test_missing_and_extra_fields_are_refused():
    raw = raw_manifest()
    del raw["tensors"][0]["dtype"]
    with pytest.raises(ShmError, match="fields"):
        decode(raw)
    raw = raw_manifest() | {"surprise": 1}
    with pytest.raises(ShmError, match="fields"):
        decode(raw)


def test_other_format_version_is_its_own_error():
    with pytest.raises(ShmError) as err:
        decode(raw_manifest() | {"format_version": 2})
    assert err.value.code == "pack_version"


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\x92\x01", b"\xdd\xff\xff\xff\xff", msgpack.packb([1, 2]) + b"x", b"\x81\x01\x02"]
)
def test_garbage_bytes_are_refused(data):
    with pytest.raises(ShmError) as err:
        Manifest.decode(data, DATA_END, "test")
    assert err.value.code == "pack_corrupt"


def _check_safe(manifest: Manifest) -> None:
    """What decode guarantees to every caller that makes views."""
    for entry in (*manifest.tensors, *manifest.blobs):
        assert HEADER_BYTES <= entry.offset and entry.nbytes >= 0 and entry.offset + entry.nbytes <= DATA_END
    for t in manifest.tensors:
        assert t.dtype in DTYPES and all(isinstance(d, int) and d >= 0 for d in t.shape)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data):
    try:
        _check_safe(Manifest.decode(data, DATA_END, "fuzz"))
    except ShmError as exc:
        assert exc.code in ("pack_corrupt", "pack_version")


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


PATHS = [p for p in _paths(raw_manifest()) if p]
INTERESTING_INTS = st.sampled_from([0, -1, 1, 63, 64, HEADER_BYTES, DATA_END, DATA_END + 1, 2**48, 2**63 - 1, -(2**63)])


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(PATHS), msgpack_values | INTERESTING_INTS), min_size=1, max_size=4))
def test_fuzz_mutated_fields(mutations):
    raw = raw_manifest()
    for path, value in mutations:
        try:
            _set(raw, path, value)
        except (KeyError, IndexError, TypeError):  # an earlier mutation replaced the parent
            continue
    try:
        _check_safe(decode(raw))
    except ShmError as exc:
        assert exc.code in ("pack_corrupt", "pack_version")


@FUZZ
@given(st.binary(min_size=1, max_size=64), st.integers(0, 400))
def test_fuzz_spliced_bytes(patch, at):
    data = bytearray(small_manifest().encode())
    data[at : at + len(patch)] = patch
    try:
        _check_safe(Manifest.decode(bytes(data), DATA_END, "fuzz"))
    except ShmError as exc:
        assert exc.code in ("pack_corrupt", "pack_version")
