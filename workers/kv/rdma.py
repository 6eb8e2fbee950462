"""Slot for the Mooncake transfer engine (RDMA); not built into this release (NIXL is: ``workers.kv.nixl``).

Selecting it raises KVBackendUnavailable with what to install; an
implementation plugs in with the same endpoint/connector pair as
``workers.kv.nixl``, whose design (a registered ring on the receiver,
one-sided WRITEs, a small control socket) carries over.
"""

from __future__ import annotations

from typing import NoReturn

from workers.kv.errors import KVBackendUnavailable

_INSTALL = {
    "mooncake": "pip install mooncake-transfer-engine (needs apt libibverbs1); the pdserve adapter is not built yet",
}


def _unavailable(name: str) -> NoReturn:
    raise KVBackendUnavailable(f"KV transport {name!r} is not available: {_INSTALL[name]}. Use tcp, shm or torch_dist.")


class MooncakeEndpoint:
    """Placeholder: raises KVBackendUnavailable."""

    def __init__(self, *args: object) -> None:
        _unavailable("mooncake")


class MooncakeConnector:
    """Placeholder: raises KVBackendUnavailable."""

    def __init__(self, *args: object) -> None:
        _unavailable("mooncake")
