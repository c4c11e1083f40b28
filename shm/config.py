"""ShmConfig: where weight packs live, who may read them, and which pages back them.

A pack named NAME is the POSIX shared-memory segment `/{prefix}NAME` (Linux: /dev/shm/{prefix}NAME),
or the file `{hugetlbfs}/{prefix}NAME` when a hugetlbfs mount is configured. Its loader lock is
`{lock_dir}/.{prefix}NAME.lock`: a dot-file, so it never looks like a pack. The KV hand-off segments
of prefill workers share the prefix and mode as `{prefix}kv-handoff.WORKER_ID`; they are no packs.
"""

from __future__ import annotations

import grp
import re
from dataclasses import dataclass
from pathlib import Path

from hmoe.shm.errors import HmoeError, ShmError

SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared-memory segments
NAME_MAX_LEN = 64
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
HUGEPAGES = ("auto", "off")
HANDOFF_PREFIX = "kv-handoff."  # segment names of KV hand-off pools (never listed as packs)


def check_name(name: object) -> str:
    """A pack name: letters, digits, `_.-`, at most 64 characters, no path separators."""
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX_LEN or not NAME_RE.fullmatch(name):
        raise ShmError(
            "pack_name_invalid",
            f"pack name {name!r} is invalid: use 1-{NAME_MAX_LEN} letters, digits, '_', '.', '-', "
            "starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class ShmConfig:
    """The [shm] settings; plain str fields so the runtime's TOML/env/flag loader can build it as is."""

    group: str = ""  # segments are 0600, or 0640 with this group (the service user's) so it may attach
    hugetlbfs: str = ""  # a hugetlbfs mount for packs; "" = /dev/shm, with transparent huge pages where offered
    hugepages: str = "auto"  # auto: MADV_HUGEPAGE on every mapping where the mount allows it | off
    lock_dir: str = SHM_DIR  # where loader lock files live (shared by every process that loads packs)
    prefix: str = "hmoe."  # segment names start with it; tests use their own so ls/gc see only theirs

    _choices = {"hugepages": HUGEPAGES}  # checked by the runtime's config loader, like its own sections

    def __post_init__(self):
        # An error, not an assert: the prefix comes from the config file or environment and becomes a path.
        if not isinstance(self.prefix, str) or not PREFIX_RE.fullmatch(self.prefix):
            raise HmoeError(
                "config_invalid",
                f"[shm] prefix {self.prefix!r} is invalid: use 1-32 letters, digits, '_', '.', '-', "
                "starting with a letter or digit",
            )

    @property
    def mode(self) -> int:
        return 0o640 if self.group else 0o600

    def group_id(self) -> int | None:
        """The configured group's id (None when packs are private to their owner)."""
        if not self.group:
            return None
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise ShmError(
                "shm_group_unknown", f"group {self.group!r} does not exist: create it or fix the shm group setting"
            ) from None

    @property
    def pack_dir(self) -> Path:
        return Path(self.hugetlbfs or SHM_DIR)

    def segment_name(self, name: str) -> str:
        """The posix_ipc name (leading slash) of pack `name`."""
        return "/" + self.prefix + check_name(name)

    def segment_path(self, name: str) -> Path:
        return self.pack_dir / (self.prefix + check_name(name))

    def lock_path(self, name: str) -> Path:
        return Path(self.lock_dir) / f".{self.prefix}{check_name(name)}.lock"

    def pack_names(self) -> list[str]:
        """Names of every pack segment under this prefix, sorted (ready or not)."""
        return [n for n in self._segment_names() if not n.startswith(HANDOFF_PREFIX)]

    def handoff_names(self) -> list[str]:
        """Names of every KV hand-off segment under this prefix, sorted."""
        return [n for n in self._segment_names() if n.startswith(HANDOFF_PREFIX)]

    def _segment_names(self) -> list[str]:
        try:
            entries = sorted(p.name for p in self.pack_dir.iterdir())
        except FileNotFoundError:
            return []
        names = [e[len(self.prefix) :] for e in entries if e.startswith(self.prefix)]
        return [n for n in names if len(n) <= NAME_MAX_LEN and NAME_RE.fullmatch(n)]
