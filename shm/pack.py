"""Pack: a weight pack attached read-only; numpy views of its arrays with no copy.

Attaching maps the segment, then reads only the header page and the manifest: it never touches
the data, so it takes milliseconds whatever the pack's size. Every view is read-only (the
mapping is PROT_READ); a write raises in numpy and faults in anything that bypasses numpy.
"""

from __future__ import annotations

import hashlib
import logging
import time

import numpy as np

from hmoe.shm.config import ShmConfig
from hmoe.shm.errors import ShmError
from hmoe.shm.header import HEADER_BYTES, READY, Header
from hmoe.shm.lock import PackLock
from hmoe.shm.manifest import MAX_MANIFEST_BYTES, Manifest, TensorEntry
from hmoe.shm.segment import Segment, huge_page_policy

log = logging.getLogger(__name__)


def expert_array_name(layer_id: int, array: str) -> str:
    """The pack name of one routed-expert array of a MoE layer (all its experts, stacked)."""
    return f"experts.{layer_id}.{array}"


def loader_alive(name: str, config: ShmConfig) -> bool:
    """True while some process holds the pack's loader lock."""
    if not config.lock_path(name).exists():  # never loaded here (and do not create the file to find out)
        return False
    lock = PackLock(name, config)
    if lock.acquire(exclusive=False, timeout_s=0):
        lock.release()
        return False
    return True


class Pack:
    """A ready pack mapped read-only (attach ↔ close)."""

    def __init__(self, segment: Segment, header: Header, manifest: Manifest):
        self.segment = segment
        self.header = header
        self.manifest = manifest
        self.name = manifest.name
        self._tensors = {t.name: t for t in manifest.tensors}
        self._blobs = {b.name: b for b in manifest.blobs}

    @classmethod
    def attach(cls, name: str, config: ShmConfig = ShmConfig(), wait_s: float = 0.0) -> Pack:
        """Attach a ready pack; wait up to wait_s for a loader that is still writing it."""
        start = time.perf_counter()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                pack, loader_pid = cls._try_attach(name, config)
            except ShmError as exc:  # a loader that holds the lock but has not created the segment yet: wait
                if exc.code != "pack_not_found" or time.monotonic() >= deadline or not loader_alive(name, config):
                    raise
                pack, loader_pid = None, 0
            if pack is not None:
                break
            remaining_s = deadline - time.monotonic()
            if not loader_alive(name, config):
                pack, loader_pid = cls._try_attach(name, config)  # it may have finished just now
                if pack is not None:
                    break
                raise _not_ready(name, loader_pid, loader_alive=False)
            if remaining_s <= 0:
                raise _not_ready(name, loader_pid, loader_alive=True)
            log.info("pack %s is being loaded by pid %d; waiting up to %.0f s", name, loader_pid, remaining_s)
            lock = PackLock(name, config)
            if lock.acquire(exclusive=False, timeout_s=remaining_s):  # the loader let go: look again
                lock.release()
        log.info(
            "attached pack %s: %.2f GiB, %d arrays, in %.1f ms; %s",
            name,
            pack.segment.nbytes / 2**30,
            len(pack.manifest.tensors),
            (time.perf_counter() - start) * 1e3,
            huge_page_policy(config),
        )
        return pack

    @classmethod
    def _try_attach(cls, name: str, config: ShmConfig) -> tuple[Pack | None, int]:
        """(the pack, 0) when ready, else (None, pid of the loader that is or was writing it)."""
        try:
            segment = Segment.attach(name, config)
        except ShmError as exc:
            if exc.code != "pack_not_ready":  # created but not yet sized
                raise
            return None, 0
        try:
            header = Header.unpack(bytes(segment.buffer(0, HEADER_BYTES)), f"pack {name!r}")
            if header.state != READY:
                segment.close()
                return None, header.loader_pid
            return cls(segment, header, _read_manifest(segment, header, name)), 0
        except BaseException:
            segment.close()
            raise

    def entry(self, name: str) -> TensorEntry:
        try:
            return self._tensors[name]
        except KeyError:
            raise ShmError(
                "pack_tensor_missing", f"pack {self.name!r} holds no array {name!r}; was it built from this model?"
            ) from None

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def array(self, name: str) -> np.ndarray:
        """Read-only zero-copy view; bf16 and fp8 appear as uint16 and uint8 words."""
        entry = self.entry(name)
        buffer = self.segment.buffer(entry.offset, entry.nbytes)
        return np.frombuffer(buffer, entry.numpy_dtype).reshape(entry.shape)

    def expert_arrays(self, layer_id: int) -> dict[str, np.ndarray]:
        """One MoE layer's routed-expert arrays, keyed by the format's array names."""
        prefix = expert_array_name(layer_id, "")
        arrays = {
            t.name[len(prefix) :]: self.array(t.name)
            for t in self.manifest.tensors
            if t.layer == layer_id and t.name.startswith(prefix)
        }
        if not arrays:
            raise ShmError("pack_tensor_missing", f"pack {self.name!r} holds no routed experts for layer {layer_id}")
        return arrays

    def blob(self, name: str) -> bytes | None:
        """A small file kept in the pack (config.json, tokenizer.json ...), or None."""
        entry = self._blobs.get(name)
        return None if entry is None else bytes(self.segment.buffer(entry.offset, entry.nbytes))

    def check_matches(self, source: dict | None = None, experts: dict | None = None) -> None:
        """Raise pack_mismatch unless the pack was built from `source` with expert format `experts`."""
        for what, want, have in (
            ("checkpoint", source, self.manifest.source),
            ("expert format", experts, self.manifest.experts),
        ):
            if want is not None and _plain(want) != _plain(have):
                diff = sorted(k for k in set(want) | set(have) if _plain(want.get(k)) != _plain(have.get(k)))
                raise ShmError(
                    "pack_mismatch",
                    f"pack {self.name!r} was built from another {what} (differs in {', '.join(diff)}: "
                    f"pack has {_brief([have.get(k) for k in diff])}, wanted {_brief([want.get(k) for k in diff])}); "
                    f"remove it (hmoe shm rm {self.name}) or load under another --name",
                )

    def close(self) -> None:
        self.segment.close()

    def __enter__(self) -> Pack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _brief(value, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(value):
    """msgpack turns tuples into lists: compare in that shape."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _read_manifest(segment: Segment, header: Header, name: str) -> Manifest:
    where = f"pack {name!r}"
    header.check_bounds(segment.nbytes, MAX_MANIFEST_BYTES, where)
    data = bytes(segment.buffer(header.manifest_offset, header.manifest_bytes))
    if hashlib.sha256(data).digest() != header.manifest_sha256:
        raise ShmError("pack_corrupt", f"{where}: manifest checksum mismatch; remove the pack and load it again")
    manifest = Manifest.decode(data, header.manifest_offset, where)
    if manifest.name != name:
        raise ShmError("pack_corrupt", f"{where}: manifest names it {manifest.name!r}; remove it and load it again")
    return manifest


def _not_ready(name: str, loader_pid: int, loader_alive: bool) -> ShmError:
    loader = f"pid {loader_pid}" if loader_pid else "a loader"  # 0: it stopped before writing the header
    if loader_alive:
        return ShmError(
            "pack_not_ready", f"pack {name!r} is still being loaded by {loader}; wait for it (attach with a wait)"
        )
    return ShmError(
        "pack_not_ready",
        f"pack {name!r} is incomplete: {f'its loader, pid {loader_pid},' if loader_pid else 'its loader'} stopped "
        "halfway; load it again (hmoe shm load) or remove it (hmoe shm gc)",
    )
