"""Registry: the packs on this machine, who has them mapped, and their removal (`hmoe shm ls|rm|gc`).

Attached processes are found the way the kernel reports them: a mapping of the segment's path in
/proc/PID/maps (processes of other users are invisible unless we may read their maps). Looking at
a pack here reads its header and manifest with pread, never maps it, so `ls` never lists itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from hmoe.shm.config import ShmConfig
from hmoe.shm.errors import ShmError
from hmoe.shm.header import HEADER_BYTES, READY, Header
from hmoe.shm.lock import PackLock
from hmoe.shm.manifest import MAX_MANIFEST_BYTES, Manifest
from hmoe.shm.pack import loader_alive
from hmoe.shm.segment import read_segment, segment_bytes, unlink_segment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackInfo:
    name: str
    state: str  # "ready" | "loading" | "incomplete" (its loader died) | "invalid" (see problem)
    nbytes: int
    attached_pids: tuple[int, ...] = ()
    model: str = ""  # the checkpoint's architecture
    experts: str = ""  # the routed experts' format, e.g. "fp8", "int4-g128"
    source: str = ""  # the checkpoint folder it was built from
    loader_pid: int = 0
    created_ns: int = 0
    problem: str = ""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class GcAction:
    name: str
    reason: str
    removed: bool  # False on a dry run
    freed_bytes: int = field(default=0)


def attached_pids(config: ShmConfig) -> dict[str, tuple[int, ...]]:
    """Pack name -> pids (other than ours) mapping its current segment, from /proc/*/maps."""
    prefix = str(config.pack_dir / config.prefix)
    found: dict[str, set[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            lines = (proc / "maps").read_text().splitlines()
        except OSError:  # gone, or not ours to read
            continue
        for line in lines:
            parts = line.split(maxsplit=5)  # address perms offset dev inode [path]
            path = parts[5] if len(parts) == 6 else ""
            if path.startswith(prefix) and not path.endswith(" (deleted)"):
                found.setdefault(path[len(prefix) :], set()).add(int(proc.name))
    return {name: tuple(sorted(pids)) for name, pids in found.items()}


def inspect_pack(name: str, config: ShmConfig, pids: tuple[int, ...] = ()) -> PackInfo:
    """What a pack is, from its header and manifest (read, not mapped)."""
    nbytes = segment_bytes(name, config)
    try:
        header = Header.unpack(read_segment(name, config, 0, HEADER_BYTES), f"pack {name!r}")
    except ShmError as exc:
        return PackInfo(name, "invalid", nbytes, pids, problem=str(exc))
    if header.state != READY:
        state = "loading" if loader_alive(name, config) else "incomplete"
        return PackInfo(name, state, nbytes, pids, loader_pid=header.loader_pid, created_ns=header.created_ns)
    try:
        where = f"pack {name!r}"
        header.check_bounds(nbytes, MAX_MANIFEST_BYTES, where)
        data = read_segment(name, config, header.manifest_offset, header.manifest_bytes)
        if hashlib.sha256(data).digest() != header.manifest_sha256:
            raise ShmError("pack_corrupt", f"{where}: manifest checksum mismatch")
        manifest = Manifest.decode(data, header.manifest_offset, where)
    except ShmError as exc:
        return PackInfo(name, "invalid", nbytes, pids, loader_pid=header.loader_pid, problem=str(exc))
    experts = manifest.experts
    return PackInfo(
        name,
        "ready",
        nbytes,
        pids,
        model=str(manifest.model.get("architecture", "")),
        experts=str(experts.get("name") or experts.get("kind", "")),
        source=str(manifest.source.get("path", "")),
        loader_pid=header.loader_pid,
        created_ns=header.created_ns,
    )


def list_packs(config: ShmConfig = ShmConfig()) -> list[PackInfo]:
    pids = attached_pids(config)
    infos = []
    for name in config.pack_names():
        try:
            infos.append(inspect_pack(name, config, pids.get(name, ())))
        except ShmError as exc:
            if exc.code == "pack_not_found":  # removed while we looked
                continue
            try:  # not ours to read (another user's, mode 0600): list it, say why
                nbytes = config.segment_path(name).stat().st_size
            except OSError:
                nbytes = 0
            infos.append(PackInfo(name, "invalid", nbytes, pids.get(name, ()), problem=str(exc)))
    return infos


def remove_pack(name: str, config: ShmConfig = ShmConfig(), force: bool = False) -> PackInfo:
    """Unlink a pack. Refused while a loader writes it, and (unless force) while processes map it:
    they would keep its memory until they exit, and nothing could attach it again."""
    lock = PackLock(name, config)
    if not lock.acquire(timeout_s=0):
        raise ShmError("pack_busy", f"pack {name!r} is being loaded right now; wait for the loader or stop it first")
    try:
        try:
            info = inspect_pack(name, config, attached_pids(config).get(name, ()))
        except ShmError as exc:
            if exc.code == "pack_not_found":
                lock.remove_file()  # we just created it
            raise
        if info.attached_pids and not force:
            raise ShmError(
                "pack_busy",
                f"pack {name!r} is attached by pids {list(info.attached_pids)}: stop them first, or force it "
                "(they keep their mapping and its memory until they exit)",
            )
        unlink_segment(name, config)
        lock.remove_file()
    finally:
        lock.release()
    log.debug("removed pack %s (%.2f GiB)", name, info.nbytes / 2**30)  # the caller says it (`hmoe shm rm`)
    return info


def collect_garbage(config: ShmConfig = ShmConfig(), dry_run: bool = False) -> list[GcAction]:
    """Remove packs nobody maps that are incomplete, invalid or simply unused, and stale lock files."""
    actions = []
    for info in list_packs(config):
        if info.state == "loading" or info.attached_pids:
            continue
        reason = {
            "ready": "ready but attached by no process",
            "incomplete": "incomplete ("
            + (f"its loader, pid {info.loader_pid}, died" if info.loader_pid else "its loader stopped before the end")
            + ")",
        }
        actions.append(GcAction(info.name, reason.get(info.state, f"invalid: {info.problem}"), False, info.nbytes))
    done = []
    for action in actions:
        if not dry_run:
            try:
                remove_pack(action.name, config)
            except ShmError as exc:  # a loader or an attacher came in meanwhile: leave it
                if exc.code not in ("pack_busy", "pack_not_found", "shm_permission"):
                    raise
                log.info("gc: kept %s (%s)", action.name, exc)
                continue
        done.append(GcAction(action.name, action.reason, not dry_run, action.freed_bytes))
    done.extend(_stale_locks(config, dry_run))
    return done


def _stale_locks(config: ShmConfig, dry_run: bool) -> list[GcAction]:
    packs = set(config.pack_names())
    stale = []
    for path in sorted(Path(config.lock_dir).glob(f".{config.prefix}*.lock")):
        name = path.name[len(config.prefix) + 1 : -len(".lock")]
        if name in packs:
            continue
        try:
            lock = PackLock(name, config)
        except ShmError:
            continue
        if not lock.acquire(timeout_s=0):
            continue
        try:
            if not dry_run:
                lock.remove_file()
        finally:
            lock.release()
        stale.append(GcAction(name, "lock file without a pack", not dry_run))
    return stale
