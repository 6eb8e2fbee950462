"""The in-process transport (tests, simulator): the same interface, checksums and staging, no wire.

Endpoints register under an id (the descriptor's address) in a process-wide
table; the sender's background thread copies each layer into the endpoint's
reused staging buffer and delivers it, exactly as a network receiver would.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator

import torch

from workers.kv.checksum import checksum_parts
from workers.kv.descriptor import TransferDescriptor, TransportKind
from workers.kv.errors import KVPeerError, KVTransferError
from workers.kv.framing import ErrorCode, verdict_code, verdict_error
from workers.kv.interface import EndpointOptions, KVSpec, LayerCallback, SenderOptions
from workers.kv.pipeline import HostStager, PendingTable, PendingTransfer, StagingPool
from workers.kv.sending import PipelinedSender

_LOCK = threading.Lock()
_ENDPOINTS: dict[str, MemoryEndpoint] = {}


class MemoryEndpoint:
    """Receiving endpoint reachable from senders in the same process."""

    kind = TransportKind.MEMORY

    def __init__(self, options: EndpointOptions | None = None) -> None:
        options = options or EndpointOptions()
        self.address = f"memory-{uuid.uuid4().hex[:12]}"
        # no socket notices a silent sender here: the receiver's wait() does, after options.stall_timeout_s
        self.table = PendingTable(self.kind, self.address, stall_timeout_s=options.stall_timeout_s)
        self.staging = StagingPool(options.staging_nbytes)
        with _LOCK:
            _ENDPOINTS[self.address] = self

    def expect(
        self, request_id: str, num_tokens: int, spec: KVSpec, on_layer: LayerCallback, keep: bool = False
    ) -> PendingTransfer:
        """Register an incoming transfer and return its receiver."""
        return self.table.register(request_id, num_tokens, spec, on_layer, keep)

    def close(self) -> None:
        """Unregister; pending transfers fail."""
        with _LOCK:
            _ENDPOINTS.pop(self.address, None)
        self.table.fail_all("endpoint closed")
        self.staging.clear()


class MemoryWire:
    """Sending half: copy into the endpoint's staging buffer, then deliver."""

    def __init__(self, descriptor: TransferDescriptor) -> None:
        with _LOCK:
            endpoint = _ENDPOINTS.get(descriptor.address)
        if endpoint is None:
            raise KVPeerError(f"no in-process endpoint {descriptor.address!r} (closed, or another process)")
        self._endpoint = endpoint
        with _receiver_verdict(descriptor.request_id):
            self._pending = endpoint.table.claim(descriptor)
        self._buffer: torch.Tensor | None = endpoint.staging.acquire(descriptor.layer_nbytes)
        self._stager = HostStager()
        self._finished = False
        self._lock = threading.Lock()

    def send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        """Copy one layer into staging and deliver it (raises the receiver's error)."""
        with self._lock:  # close() must not hand the buffer back mid-copy
            self._send_layer(layer_idx, k, v, corrupt)

    def _send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        if self._buffer is None:
            raise KVTransferError(f"request {self._pending.descriptor.request_id!r}: sender closed")
        k_bytes, v_bytes = self._stager.parts(k, v)
        checksum = checksum_parts((k_bytes, v_bytes))
        half = len(k_bytes)
        staging = self._buffer.numpy()
        staging[:half] = k_bytes
        staging[half : 2 * half] = v_bytes
        if corrupt:
            staging[0] ^= 0xFF
        with _receiver_verdict(self._pending.descriptor.request_id):
            self._pending.deliver(layer_idx, self._buffer[: 2 * half], checksum)

    def finish(self) -> None:
        """Complete the transfer (raises if a layer is missing)."""
        with _receiver_verdict(self._pending.descriptor.request_id):
            self._pending.complete()
        self._finished = True

    def close(self) -> None:
        """Return the staging buffer; an unfinished transfer fails on the receiving side (idempotent)."""
        if not self._finished:
            rid = self._pending.descriptor.request_id
            self._pending.fail(KVTransferError(f"request {rid!r}: sender closed before the end"))
        with self._lock:
            if self._buffer is not None:
                self._endpoint.staging.release(self._buffer)
                self._buffer = None


class MemoryConnector:
    """Sending side of the in-process transport."""

    def open(self, descriptor: TransferDescriptor, options: SenderOptions) -> PipelinedSender:
        """Claim the in-process receiver and return a pipelined sender."""
        return PipelinedSender(descriptor, MemoryWire(descriptor), options)

    def close(self) -> None:
        """Nothing cached."""


@contextlib.contextmanager
def _receiver_verdict(request_id: str) -> Iterator[None]:
    """Raise a failure of the receiver's code as its sender hears it: what a network sender gets in an ERROR frame."""
    try:
        yield
    except KVTransferError as exc:
        code = verdict_code(exc)
        if code == ErrorCode.CHECKSUM:
            raise
        raise verdict_error(code, request_id, 0, str(exc)) from None
