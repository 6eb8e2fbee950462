"""Transports by kind, imported lazily: an unused backend (torch.distributed, RDMA) costs nothing."""

from __future__ import annotations

import importlib
import threading
from typing import Any, cast

from workers.kv.descriptor import TransferDescriptor, TransportKind
from workers.kv.errors import KVBackendUnavailable
from workers.kv.interface import EndpointOptions, KVConnector, KVEndpoint, KVSender, SenderOptions

# kind -> (module, endpoint class, connector class)
BACKENDS: dict[TransportKind, tuple[str, str, str]] = {
    TransportKind.MEMORY: ("workers.kv.memory", "MemoryEndpoint", "MemoryConnector"),
    TransportKind.TCP: ("workers.kv.tcp", "TcpEndpoint", "TcpConnector"),
    TransportKind.SHM: ("workers.kv.shm", "ShmEndpoint", "ShmConnector"),
    TransportKind.TORCH_DIST: ("workers.kv.torch_dist", "TorchDistEndpoint", "TorchDistConnector"),
    TransportKind.MOONCAKE: ("workers.kv.rdma", "MooncakeEndpoint", "MooncakeConnector"),
    TransportKind.NIXL: ("workers.kv.nixl", "NixlEndpoint", "NixlConnector"),
}

# transports that carry bytes between OS processes
CROSS_PROCESS_KINDS = (TransportKind.TCP, TransportKind.SHM, TransportKind.TORCH_DIST)


def parse_kind(name: str | TransportKind) -> TransportKind:
    """A transport name ("tcp", "shm", "torch_dist", ...) -> TransportKind, with a clear error."""
    try:
        return TransportKind(name)
    except ValueError:
        raise ValueError(f"unknown transport {name!r}; choose from {[k.value for k in TransportKind]}") from None


def _load(kind: TransportKind, index: int) -> Any:
    module_name, *class_names = BACKENDS[kind]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KVBackendUnavailable(f"transport {kind.value!r} cannot be imported: {exc}") from exc
    return getattr(module, class_names[index])


def open_endpoint(kind: TransportKind | str, options: EndpointOptions | None = None) -> KVEndpoint:
    """Start a receiving endpoint of ``kind`` (decode side)."""
    return cast(KVEndpoint, _load(parse_kind(kind), 0)(options or EndpointOptions()))


def open_connector(kind: TransportKind | str) -> KVConnector:
    """Create the sending side of ``kind`` (prefill side)."""
    return cast(KVConnector, _load(parse_kind(kind), 1)())


class KVClient:
    """Prefill side entry point: opens senders for any descriptor, one cached connector per kind."""

    def __init__(self, options: SenderOptions | None = None) -> None:
        self.options = options or SenderOptions()
        self._connectors: dict[TransportKind, KVConnector] = {}
        self._lock = threading.Lock()

    def open(self, descriptor: TransferDescriptor, options: SenderOptions | None = None) -> KVSender:
        """Open a sender towards ``descriptor``'s receiver."""
        with self._lock:  # one connector per kind even when threads open senders at once
            connector = self._connectors.get(descriptor.kind)
            if connector is None:
                connector = self._connectors[descriptor.kind] = open_connector(descriptor.kind)
        return connector.open(descriptor, options or self.options)

    def close(self) -> None:
        """Close every cached connector."""
        for connector in self._connectors.values():
            connector.close()
        self._connectors.clear()
