"""pack_loader: a Hugging Face checkpoint turned into a weight pack, in one pass over its bytes.

Shapes: E routed experts, H hidden, I expert intermediate.

Every tensor except the routed experts is copied as stored (FP8 stays E4M3 beside its
`_scale_inv`), straight from the safetensors file into the segment with sendfile (preadv into the
mapping on hugetlbfs, which takes no write()): one copy inside the kernel, no intermediate tensor.
Each MoE layer's routed experts — checkpoint tensors
`model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight` [I, H] / [H, I] — are converted once
into the arrays `kernels.formats.layer_arrays` prescribes, expert by expert, with `encode_expert`.
Experts are read with preadv. Work is spread over threads (sendfile, preadv and the encoders release
the GIL); progress shows bytes read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import sys
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from hmoe.kernels.formats import PROJS, ExpertFormat, encode_expert, layer_arrays, proj_shape
from hmoe.shm import Manifest, Pack, PackLayout, PackWriter, ShmConfig, build_pack, check_name, expert_array_name
from hmoe.shm.layout import HUGE_PAGE_BYTES, PAGE_BYTES
from hmoe.shm.manifest import DTYPES
from hmoe.shm.progress import Progress
from hmoe.shm.segment import uses_huge_pages
from hmoe.workers.weights.checkpoint import Checkpoint
from hmoe.workers.weights.errors import CheckpointError

log = logging.getLogger(__name__)

EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight(_scale_inv)?")
BLOB_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
MAX_BLOB_BYTES = 64 << 20
MAX_SAFETENSORS_HEADER = 100 << 20
CHUNK_BYTES = 64 << 20  # large non-expert tensors (embeddings) are copied in pieces spread over threads
READ_BYTES = 1 << 30  # one pread at most (Linux caps a read near 2 GiB)
EXPERTS = ("native", "bf16", "fp8", "int4")
# (format, stored dtype) whose layer layout is the checkpoint's bytes, unpadded: copied, not encoded.
IDENTITY = {("bf16", "BF16"), ("fp8", "F8_E4M3")}
# Source dtypes of routed experts, as numpy hands them to encode_expert.
EXPERT_SOURCE = {"BF16": np.uint16, "F32": np.float32, "F16": np.float16, "F8_E4M3": np.uint8}


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor's bytes lie in its safetensors file."""

    file: str
    dtype: str  # safetensors spelling, as the pack's
    shape: tuple[int, ...]
    start: int  # absolute file offset
    nbytes: int


def index_safetensors(path: Path) -> dict[str, StoredTensor]:
    """Name -> StoredTensor from one file's header (8-byte length, then JSON), bounds checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8).rjust(8, b"\0"))
        if not 0 < header_len <= min(MAX_SAFETENSORS_HEADER, size - 8):
            raise CheckpointError("checkpoint_corrupt", f"{path}: safetensors header length {header_len} is impossible")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError("checkpoint_corrupt", f"{path}: safetensors header is not JSON ({exc})") from None
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                "checkpoint_corrupt", f"{path}: tensor {name!r} has a bad header entry ({exc})"
            ) from None
        start = 8 + header_len + begin
        if end - begin != nbytes or begin < 0 or start + nbytes > size:
            raise CheckpointError(
                "checkpoint_corrupt", f"{path}: tensor {name!r} lies outside the file; re-download it"
            )
        tensors[name] = StoredTensor(path.name, dtype, shape, start, nbytes)
    return tensors


def resolve_format(experts: str, group_size: int, checkpoint: Checkpoint) -> ExpertFormat:
    """`native` keeps the checkpoint's format: fp8 stays fp8; bf16, fp16 and fp32 become bf16."""
    if experts not in EXPERTS:
        raise CheckpointError("config_field", f"--experts {experts!r}: choose one of {', '.join(EXPERTS)}")
    if experts == "native":
        return ExpertFormat("fp8" if checkpoint.config.fp8_block else "bf16")
    try:
        return ExpertFormat(experts, group_size) if experts == "int4" else ExpertFormat(experts)
    except ValueError as exc:
        raise CheckpointError("config_field", str(exc)) from None


def default_pack_name(model_dir: str | os.PathLike, fmt: ExpertFormat) -> str:
    """The model folder's name and the expert format, e.g. `DeepSeek-V3-fp8`."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model_dir).resolve().name).lstrip("._-") or "model"
    return check_name(f"{stem[: 63 - len(fmt.name)]}-{fmt.name}")


def experts_meta(fmt: ExpertFormat) -> dict:
    return {"kind": fmt.kind, "group_size": fmt.group_size, "name": fmt.name}


def plan_pack(
    checkpoint: Checkpoint, stored: dict[str, StoredTensor], fmt: ExpertFormat, name: str, expert_align: int
) -> Manifest:
    """Every non-expert tensor as stored, each MoE layer's expert arrays, the small files, in that order."""
    c = checkpoint.config
    _check_experts(checkpoint, stored)
    layout = PackLayout()
    for tensor_name in sorted(stored):
        if not EXPERT_RE.fullmatch(tensor_name):
            t = stored[tensor_name]
            layout.add_tensor(tensor_name, t.dtype, t.shape)
    for layer_id in c.moe_layer_ids:
        for array, (dtype, shape) in layer_arrays(fmt, c.num_experts, c.hidden_size, c.moe_intermediate_size).items():
            layout.add_tensor(
                expert_array_name(layer_id, array), _pack_dtype(fmt, array, dtype), shape, expert_align, layer_id
            )
    for blob in BLOB_FILES:
        path = checkpoint.path / blob
        if path.is_file() and path.stat().st_size <= MAX_BLOB_BYTES:
            layout.add_blob(blob, path.stat().st_size)
    return layout.manifest(name, checkpoint.identity(), c.to_dict(), experts_meta(fmt))


def load_pack(
    model_dir: str | os.PathLike,
    name: str | None = None,
    experts: str = "native",
    group_size: int = 128,
    config: ShmConfig = ShmConfig(),
    threads: int | None = None,
    wait_s: float | None = None,
    stream: TextIO | None = None,
) -> tuple[Pack, bool]:
    """Build the pack of `model_dir` (or attach the ready one); (pack, True when this call built it)."""
    with Checkpoint.open(model_dir) as checkpoint:
        fmt = resolve_format(experts, group_size, checkpoint)
        name = check_name(name) if name else default_pack_name(model_dir, fmt)
        stored = {}
        for file_name in sorted(set(checkpoint.weight_map.values())):
            stored.update(index_safetensors(checkpoint.path / file_name))
        align = HUGE_PAGE_BYTES if uses_huge_pages(config) else PAGE_BYTES
        manifest = plan_pack(checkpoint, stored, fmt, name, align)
        threads = threads or min(len(os.sched_getaffinity(0)), 16)
        fill = _Filler(checkpoint, stored, fmt, threads, stream)
        return build_pack(manifest, fill, config, wait_s)


class _Filler:
    """fill(writer): every tensor copied or encoded, over `threads` threads."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        stored: dict[str, StoredTensor],
        fmt: ExpertFormat,
        threads: int,
        stream: TextIO | None,
    ):
        self.path = checkpoint.path
        self.config = checkpoint.config
        self.stored = stored
        self.fmt = fmt
        self.threads = threads
        self.stream = stream if stream is not None else sys.stderr
        self._local = threading.local()
        self._fds: dict[str, int] = {}  # shard file -> fd, open during a fill
        self.progress: Progress | None = None

    def __call__(self, writer: PackWriter) -> None:
        c = self.config
        tasks = []
        for entry in writer.manifest.tensors:
            if entry.layer < 0:
                for offset in range(0, max(entry.nbytes, 1), CHUNK_BYTES):
                    tasks.append((self._copy, writer, entry, offset))
        layers = {
            L: {
                a: writer.array(expert_array_name(L, a))
                for a in layer_arrays(self.fmt, c.num_experts, c.hidden_size, c.moe_intermediate_size)
            }
            for L in c.moe_layer_ids
        }
        tasks += [(self._expert, writer, layers[L], L, e) for L in c.moe_layer_ids for e in range(c.num_experts)]
        total = sum(t.nbytes for t in self.stored.values())
        self.progress = Progress(f"loading {writer.manifest.name}", total, self.stream)
        self._fds = {
            f: os.open(self.path / f, os.O_RDONLY | os.O_CLOEXEC) for f in {t.file for t in self.stored.values()}
        }
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="pack-load")
        try:
            done, _ = wait([pool.submit(*task) for task in tasks], return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()  # re-raise the first failure
            for blob in writer.manifest.blobs:
                writer.write_blob(blob.name, (self.path / blob.name).read_bytes())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on a failure or Ctrl-C, start nothing more
            for fd in self._fds.values():
                os.close(fd)
            self.progress.finish()

    def _read_into(self, tensor: StoredTensor, view: memoryview, offset: int = 0) -> None:
        fd, position = self._fds[tensor.file], tensor.start + offset
        while view:
            n = os.preadv(fd, [view[:READ_BYTES]], position)
            if n == 0:
                raise CheckpointError(
                    "checkpoint_corrupt", f"{self.path / tensor.file}: truncated while reading; re-download it"
                )
            view, position = view[n:], position + n

    def _copy(self, writer: PackWriter, entry, offset: int) -> None:
        nbytes = min(CHUNK_BYTES, entry.nbytes - offset)
        self._copy_bytes(writer, entry.offset + offset, self.stored[entry.name], offset, nbytes)

    def _copy_bytes(self, writer: PackWriter, pack_offset: int, tensor: StoredTensor, offset: int, nbytes: int) -> None:
        """Stored bytes, unchanged, into the pack (inside the kernel where it can)."""
        try:
            writer.segment.copy_from_file(pack_offset, self._fds[tensor.file], tensor.start + offset, nbytes)
        except EOFError:
            raise CheckpointError(
                "checkpoint_corrupt", f"{self.path / tensor.file}: truncated while reading; re-download it"
            ) from None
        self.progress.advance(nbytes)

    def _source(self, name: str) -> np.ndarray:
        """One stored tensor read into this thread's scratch buffer, as the numpy dtype encode_expert takes."""
        tensor = self.stored[name]
        slot = "scale" if name.endswith("_scale_inv") else "weight"  # one reusable buffer of each per thread
        scratch = getattr(self._local, slot, None)
        if scratch is None or scratch.nbytes < tensor.nbytes:
            scratch = np.empty(tensor.nbytes, np.uint8)
            setattr(self._local, slot, scratch)
        view = scratch[: tensor.nbytes]
        self._read_into(tensor, memoryview(view))
        self.progress.advance(tensor.nbytes)
        if tensor.dtype == "BF16" and name.endswith("_scale_inv"):
            return (view.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(tensor.shape)
        array = view.view(EXPERT_SOURCE[tensor.dtype]).reshape(tensor.shape)
        return array.astype(np.float32) if tensor.dtype == "F16" else array

    def _expert(self, writer: PackWriter, arrays: dict[str, np.ndarray], layer_id: int, expert: int) -> None:
        for proj in PROJS:
            name = f"model.layers.{layer_id}.mlp.experts.{expert}.{proj}_proj.weight"
            tensor = self.stored[name]
            if (self.fmt.kind, tensor.dtype) in IDENTITY and arrays[proj].shape[1:] == tensor.shape:
                self._expert_as_stored(writer, arrays, layer_id, expert, proj, name)
                continue
            weight = self._source(name)
            scale_inv = self._source(name + "_scale_inv") if tensor.dtype == "F8_E4M3" else None
            try:
                encode_expert(self.fmt, arrays, expert, proj, weight, scale_inv)
            except ValueError as exc:
                raise CheckpointError("checkpoint_corrupt", f"{self.path}: {name}: {exc}") from None

    def _expert_as_stored(
        self, writer: PackWriter, arrays: dict[str, np.ndarray], layer_id: int, expert: int, proj: str, name: str
    ) -> None:
        """The layout is the checkpoint's own (bf16 or fp8 kept, no padding): copy the bytes in the
        kernel, then check for E4M3 NaN codes as encode_expert does, reading the copy once."""
        entry = writer.manifest_entry(expert_array_name(layer_id, proj))
        tensor = self.stored[name]
        self._copy_bytes(writer, entry.offset + expert * tensor.nbytes, tensor, 0, tensor.nbytes)
        if self.fmt.kind == "fp8":
            codes = arrays[proj][expert]
            if codes.max() == 0xFF or codes.view(np.int8).max() == 0x7F:  # the E4M3 NaNs; two max() scans are SIMD-fast
                raise CheckpointError(
                    "checkpoint_corrupt",
                    f"{self.path}: {name}: fp8 weight holds NaN codes (0x7F/0xFF): the checkpoint is damaged",
                )
            scale_inv = self._source(name + "_scale_inv")
            scale = arrays[f"{proj}_scale"][expert]
            scale[...] = 0.0
            scale[: scale_inv.shape[0], : scale_inv.shape[1]] = scale_inv


def _pack_dtype(fmt: ExpertFormat, array: str, dtype: np.dtype) -> str:
    """The pack's dtype name of one expert array: weights say what their words hold."""
    if array in PROJS:
        name = {"bf16": "BF16", "fp8": "F8_E4M3", "int4": "U8"}[fmt.kind]
    else:
        name = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[np.dtype(dtype)]
    assert DTYPES[name] == dtype, (array, name, dtype)
    return name


def _check_experts(checkpoint: Checkpoint, stored: dict[str, StoredTensor]) -> None:
    """Every routed expert of every MoE layer is present, with its shape, dtype and FP8 scales."""
    c = checkpoint.config
    for layer_id in c.moe_layer_ids:
        for expert in range(c.num_experts):
            for proj in PROJS:
                name = f"model.layers.{layer_id}.mlp.experts.{expert}.{proj}_proj.weight"
                want = proj_shape(proj, c.hidden_size, c.moe_intermediate_size)
                tensor = stored.get(name)
                if tensor is None:
                    raise CheckpointError(
                        "tensor_missing", f"{checkpoint.path}: tensor {name!r} is not in the checkpoint"
                    )
                if tensor.shape != want or tensor.dtype not in EXPERT_SOURCE:
                    raise CheckpointError(
                        "tensor_shape",
                        f"{checkpoint.path}: {name} is {tensor.dtype}{list(tensor.shape)}, expected one of "
                        f"{sorted(EXPERT_SOURCE)} with shape {list(want)}",
                    )
                scale = stored.get(name + "_scale_inv")
                blocks = (-(-want[0] // 128), -(-want[1] // 128))
                if tensor.dtype == "F8_E4M3" and (
                    scale is None or scale.shape != blocks or scale.dtype not in ("F32", "BF16")
                ):
                    raise CheckpointError(
                        "tensor_shape", f"{checkpoint.path}: {name} needs a float32 _scale_inv of shape {list(blocks)}"
                    )
