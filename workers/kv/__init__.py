"""KV-cache transports: move a request's per-layer K/V from a prefill engine to a decode engine.

Decode side: ``open_endpoint(kind).expect(...)`` -> a receiver and its
``TransferDescriptor``; prefill side: ``KVClient().open(descriptor)`` -> a
sender fed layer by layer. See ``workers.kv.interface`` for the lifecycle.
Importing this package loads no backend (and not torch).
"""

from workers.kv.descriptor import TransferDescriptor, TransferStats, TransportKind
from workers.kv.errors import KVBackendUnavailable, KVChecksumError, KVTransferError, KVTransferTimeout
from workers.kv.interface import (
    EndpointOptions,
    FaultInjection,
    KVEndpoint,
    KVReceiver,
    KVSender,
    KVSpec,
    SenderOptions,
)
from workers.kv.registry import KVClient, open_connector, open_endpoint, parse_kind

__all__ = [
    "EndpointOptions",
    "FaultInjection",
    "KVBackendUnavailable",
    "KVChecksumError",
    "KVClient",
    "KVEndpoint",
    "KVReceiver",
    "KVSender",
    "KVSpec",
    "KVTransferError",
    "KVTransferTimeout",
    "SenderOptions",
    "TransferDescriptor",
    "TransferStats",
    "TransportKind",
    "open_connector",
    "open_endpoint",
    "parse_kind",
]
