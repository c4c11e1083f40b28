"""Weight packs: model weights loaded once into POSIX shared memory and attached read-only by every worker.

Build with `build_pack` (under the pack's loader lock), attach with `Pack.attach`, list and remove
with `list_packs` / `remove_pack` / `collect_garbage`. Imports only the stdlib, numpy, posix_ipc, msgpack.
"""

from hmoe.shm.config import ShmConfig, check_name
from hmoe.shm.errors import HmoeError, ShmError

# The rest (numpy and friends) loads on first use, so `hmoe.runtime` (the client SDK) can import
# the errors and the config without paying for numpy.
_LAZY = {
    "PackLayout": "layout",
    "Manifest": "manifest",
    "TensorEntry": "manifest",
    "Pack": "pack",
    "expert_array_name": "pack",
    "PackWriter": "pack_writer",
    "build_pack": "pack_writer",
    "PackInfo": "registry",
    "collect_garbage": "registry",
    "list_packs": "registry",
    "remove_pack": "registry",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'hmoe.shm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"hmoe.shm.{_LAZY[name]}"), name)


__all__ = ["HmoeError", "ShmConfig", "ShmError", "check_name", *_LAZY]
