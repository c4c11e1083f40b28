"""Weight packs: model weights loaded once into POSIX shared memory and attached read-only by every worker.

Build with `build_pack` (under the pack's loader lock), attach with `Pack.attach`, list and remove
with `list_packs` / `remove_pack` / `collect_garbage`. Imports only the stdlib, numpy, posix_ipc, msgpack.
"""

from hmoe.shm.config import ShmConfig, check_name
from hmoe.shm.errors import ShmError
from hmoe.shm.layout import PackLayout
from hmoe.shm.manifest import Manifest, TensorEntry
from hmoe.shm.pack import Pack, expert_array_name
from hmoe.shm.pack_writer import PackWriter, build_pack
from hmoe.shm.registry import PackInfo, collect_garbage, list_packs, remove_pack

__all__ = [
    "Manifest", "Pack", "PackInfo", "PackLayout", "PackWriter", "ShmConfig", "ShmError", "TensorEntry",
    "build_pack", "check_name", "collect_garbage", "expert_array_name", "list_packs", "remove_pack",
]  # fmt: skip
