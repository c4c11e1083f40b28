"""hmoe.runtime: the router, the wire protocol, config and the client SDK (no torch, no numba).

    from hmoe.runtime import Client, AsyncClient

The SDK names are loaded on first access, so `import hmoe.runtime.protocol` (workers) stays light.
"""

from __future__ import annotations

_SDK = (
    "AsyncClient",
    "AsyncStream",
    "Chunk",
    "Client",
    "QueueFull",
    "RequestFailed",
    "RequestRefused",
    "Result",
    "RouterError",
    "RouterRestarted",
    "RouterUnreachable",
    "Stream",
    "Usage",
    "WorkerLost",
)

__all__ = list(_SDK)


def __getattr__(name: str):
    if name in _SDK:
        from hmoe.runtime import client

        return getattr(client, name)
    raise AttributeError(f"module 'hmoe.runtime' has no attribute {name!r}")
