"""Manifest: the msgpack table of contents of a weight pack, validated field by field on the way in.

It names every array (dtype, shape, offset, size), every small file kept beside them (config.json,
tokenizer.json ...), the checkpoint the pack was built from, the model config and the expert
format. A reader may be handed a hostile or torn manifest: `Manifest.decode` accepts only what it
fully checked (types, ranges, alignment, bounds, no overlaps) and raises `pack_corrupt` otherwise,
so no view is ever made past the data region.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import msgpack
import numpy as np

from hmoe.shm.config import check_name
from hmoe.shm.errors import ShmError
from hmoe.shm.header import FORMAT_VERSION, HEADER_BYTES

MAX_MANIFEST_BYTES = 64 << 20
MAX_ENTRIES = 1 << 20
MAX_NDIM = 8
MAX_DIM = 1 << 48
MAX_TENSOR_NAME_LEN = 512
MIN_ALIGN = 64  # every array and blob starts on a cache line

# Pack dtypes use safetensors' spelling; numpy holds bf16 and fp8 as same-width unsigned words.
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "F8_E4M3": np.dtype(np.uint8),
    "F8_E5M2": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "F32": np.dtype(np.float32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F64": np.dtype(np.float64),
}


@dataclass(frozen=True)
class TensorEntry:
    """One array: a checkpoint tensor as stored (layer -1) or one routed-expert array of a MoE layer."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    layer: int = -1

    @property
    def numpy_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class BlobEntry:
    """One small file of the model folder kept as bytes (config.json, tokenizer.json ...)."""

    name: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    name: str
    source: dict[str, Any]  # the checkpoint's identity: path, config sha256, files with size and mtime
    model: dict[str, Any]  # the resolved model config
    experts: dict[str, Any]  # the routed experts' format: kind, group, ...
    tensors: tuple[TensorEntry, ...]
    blobs: tuple[BlobEntry, ...]
    format_version: int = FORMAT_VERSION

    def encode(self) -> bytes:
        data = asdict(self)
        data["tensors"] = [asdict(t) | {"shape": list(t.shape)} for t in self.tensors]
        return msgpack.packb(data, use_bin_type=True)

    @property
    def data_end(self) -> int:
        """First byte after the last array or blob (where the manifest goes)."""
        entries: tuple[TensorEntry | BlobEntry, ...] = (*self.tensors, *self.blobs)
        return max([HEADER_BYTES] + [e.offset + e.nbytes for e in entries])

    @classmethod
    def decode(cls, data: bytes, data_end: int, where: str) -> Manifest:
        """Parse and validate; every array and blob must lie in [HEADER_BYTES, data_end)."""
        try:
            raw = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise _corrupt(where, f"not a msgpack manifest ({type(exc).__name__}: {exc})") from None
        return _validate(raw, data_end, where)


def _corrupt(where: str, what: str) -> ShmError:
    return ShmError("pack_corrupt", f"{where}: manifest {what}; remove the pack and load it again")


def _get(raw: dict, key: str, kind: type | tuple, where: str) -> Any:
    if key not in raw:
        raise _corrupt(where, f"lacks field {key!r}")
    value = raw[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise _corrupt(where, f"field {key!r} is {type(value).__name__}, expected {kind}")
    return value


def _check_keys(raw: object, keys: set[str], what: str, where: str) -> dict:
    if not isinstance(raw, dict):
        raise _corrupt(where, f"{what} is {type(raw).__name__}, expected a map")
    if set(raw) != keys:
        raise _corrupt(where, f"{what} has fields {sorted(map(str, raw))}, expected {sorted(keys)}")
    return raw


def _offset_size(raw: dict, data_end: int, what: str, where: str) -> tuple[int, int]:
    offset = _get(raw, "offset", int, where)
    nbytes = _get(raw, "nbytes", int, where)
    if nbytes < 0 or offset < HEADER_BYTES or offset % MIN_ALIGN or offset + nbytes > data_end:
        raise _corrupt(
            where, f"{what}: {nbytes} bytes at offset {offset} is outside [{HEADER_BYTES}, {data_end}) or misaligned"
        )
    return offset, nbytes


def _tensor(raw: object, data_end: int, where: str) -> TensorEntry:
    raw = _check_keys(raw, {"name", "dtype", "shape", "offset", "nbytes", "layer"}, "a tensor entry", where)
    name = _get(raw, "name", str, where)
    if not 0 < len(name) <= MAX_TENSOR_NAME_LEN:
        raise _corrupt(where, f"tensor name of length {len(name)}")
    what = f"tensor {name!r}"
    dtype = _get(raw, "dtype", str, where)
    if dtype not in DTYPES:
        raise _corrupt(where, f"{what}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    shape = _get(raw, "shape", list, where)
    if len(shape) > MAX_NDIM or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DIM for d in shape
    ):
        raise _corrupt(where, f"{what}: shape {shape!r} is not a list of at most {MAX_NDIM} sizes")
    layer = _get(raw, "layer", int, where)
    if not -1 <= layer < MAX_DIM:
        raise _corrupt(where, f"{what}: layer {layer}")
    offset, nbytes = _offset_size(raw, data_end, what, where)
    itemsize = DTYPES[dtype].itemsize
    if nbytes != math.prod(shape) * itemsize or offset % itemsize:
        raise _corrupt(where, f"{what}: {nbytes} bytes at {offset} do not hold {dtype}{shape}")
    return TensorEntry(name, dtype, tuple(shape), offset, nbytes, layer)


def _blob(raw: object, data_end: int, where: str) -> BlobEntry:
    raw = _check_keys(raw, {"name", "offset", "nbytes"}, "a blob entry", where)
    name = _get(raw, "name", str, where)
    if not 0 < len(name) <= MAX_TENSOR_NAME_LEN:
        raise _corrupt(where, f"blob name of length {len(name)}")
    offset, nbytes = _offset_size(raw, data_end, f"blob {name!r}", where)
    return BlobEntry(name, offset, nbytes)


def _validate(raw: object, data_end: int, where: str) -> Manifest:
    fields = {"format_version", "name", "source", "model", "experts", "tensors", "blobs"}
    raw = _check_keys(raw, fields, "top level", where)
    version = _get(raw, "format_version", int, where)
    if version != FORMAT_VERSION:
        raise ShmError(
            "pack_version", f"{where}: manifest format {version}, this hmoe reads {FORMAT_VERSION}; rebuild it"
        )
    name = _get(raw, "name", str, where)
    try:
        check_name(name)
    except ShmError:
        raise _corrupt(where, f"names the pack {name[:80]!r}") from None
    source, model, experts = (_get(raw, k, dict, where) for k in ("source", "model", "experts"))
    tensor_list, blob_list = _get(raw, "tensors", list, where), _get(raw, "blobs", list, where)
    if len(tensor_list) + len(blob_list) > MAX_ENTRIES:
        raise _corrupt(where, f"holds {len(tensor_list) + len(blob_list)} entries (limit {MAX_ENTRIES})")
    tensors = tuple(_tensor(t, data_end, where) for t in tensor_list)
    blobs = tuple(_blob(b, data_end, where) for b in blob_list)
    for kind, names in (("tensor", [t.name for t in tensors]), ("blob", [b.name for b in blobs])):
        if len(set(names)) != len(names):
            raise _corrupt(where, f"repeats a {kind} name")
    entries: tuple[TensorEntry | BlobEntry, ...] = (*tensors, *blobs)
    spans = sorted((e.offset, e.offset + e.nbytes, e.name) for e in entries if e.nbytes)
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise _corrupt(where, f"lets {first!r} and {second!r} overlap")
    return Manifest(name, source, model, experts, tensors, blobs, version)
