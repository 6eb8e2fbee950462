"""The transport interface: a receiver on the decode side, a sender on the prefill side.

Lifecycle of one request's transfer:
1. decode side: ``endpoint.expect(request_id, num_tokens, spec, on_layer)`` ->
   a ``KVReceiver`` whose ``descriptor`` goes to the prefill side;
2. prefill side: ``client.open(descriptor)`` -> a ``KVSender``;
   ``send_layer(i, k, v)`` as each layer is computed (returns at once, a
   background thread puts the layer on the wire), then ``finish()``;
3. decode side: the endpoint verifies each layer's checksum and calls
   ``on_layer(i, k, v)`` with views of a reused staging buffer (valid only
   during the call: copy them out), or, when ``expect`` was given
   ``keep=True``, with private copies the callback may keep (where the
   endpoint verifies a shared-memory slot or staging buffer after it was
   filled, the copy is made in the pass that verifies it); ``receiver.wait(timeout_s)``
   returns the stats once every layer landed, or raises a ``KVTransferError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from workers.kv.congestion import AUTO, validate_choice
from workers.kv.descriptor import TransferDescriptor, TransferStats, TransportKind

if TYPE_CHECKING:
    import torch

# on_layer(layer_idx, k, v): k, v are [num_tokens, num_kv_heads, head_dim] views, valid during the call. They
# are read-only: a transport may hand the same view objects to later calls, so never modify them in place
# (data or shape); expect(keep=True) hands out private copies instead.
LayerCallback = Callable[[int, "torch.Tensor", "torch.Tensor"], None]


@dataclass(frozen=True, slots=True)
class KVSpec:
    """Shape of one request's KV per layer (the engine's KVLayout carries the same numbers)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "float32"


@dataclass(frozen=True, slots=True)
class FaultInjection:
    """Test hook: damage the bytes of one layer after its checksum was computed."""

    corrupt_layer_idx: int


@dataclass(frozen=True, slots=True)
class EndpointOptions:
    """Knobs of the receiving side."""

    host: str = "127.0.0.1"  # interface to listen on (sockets) and to advertise in descriptors
    port: int = 0  # 0 picks a free port
    stall_timeout_s: float = 10.0  # a connected sender silent this long fails the transfer
    staging_nbytes: int = 8 << 20  # initial size of each reused staging buffer (grown when a layer is larger)
    socket_buffer_nbytes: int = 4 << 20  # SO_RCVBUF / SO_SNDBUF
    shm_num_slots: int = 4  # fewest slots per shm or nixl ring (layers in flight)
    # a shm ring has as many slots (up to 128) as fit in this many bytes, each the layer size rounded up to
    # a power of two; a request whose layers all fit needs no FREE messages and never waits for a slot.
    # A nixl ring holds as many slots of the layer size itself (its rings are pooled by total size, not slot size)
    shm_ring_nbytes: int = 32 << 20
    # between reads the shm and tcp receivers poll their socket this long (restarted whenever bytes arrive)
    # before sleeping in recv, yielding the CPU to any other runnable thread meanwhile; bytes that find the
    # receiver polling cost the sender no wake-up: shm 6-10% less time per 16 or 64 MB transfer in most runs
    # (benchmarks/shm_poll.py), tcp 16 MB 1.3-1.8x the GB/s in 3 runs against --poll-us 0 (kv_transfer.py); 0 sleeps at once
    poll_us: float = 100.0
    device: str = "cpu"  # "cuda" or "cuda:N": torch_dist stages on that GPU, for NCCL pairs (the others ignore it)

    def __post_init__(self) -> None:
        if not 0 <= self.poll_us < float("inf"):  # also refuses NaN
            raise ValueError(f"poll_us must be a finite number of microseconds >= 0, got {self.poll_us}")


@dataclass(frozen=True, slots=True)
class SenderOptions:
    """Knobs of the sending side."""

    timeout_s: float = 10.0  # connect, back-pressure wait, socket stall and final ack each fail after this
    # queue depth between send_layer() and the sending thread: queued layers are references to the caller's
    # tensors, not copies; a shallow queue made the two threads hand off every layer (~0.1 ms each)
    max_inflight_layers: int = 32
    socket_buffer_nbytes: int = 4 << 20
    # TCP congestion control of tcp data connections opened with these options (workers.kv.congestion):
    # "auto" = reno between two processes of one host (pacing such as BBR's only slows loopback), the host's
    # default otherwise; "system" = always the host's default; or an algorithm name, e.g. "cubic"
    tcp_congestion: str = AUTO
    # where the layers come from: "cpu", "cuda" (the current GPU) or "cuda:N"; torch_dist offers that GPU
    # to a receiver staging on CUDA, which pairs over NCCL when it is another GPU than its own
    device: str = "cpu"
    fault: FaultInjection | None = None

    def __post_init__(self) -> None:
        validate_choice(self.tcp_congestion)


class KVReceiver(Protocol):
    """Decode side of one request's transfer."""

    @property
    def descriptor(self) -> TransferDescriptor:
        """What the sender needs to reach this receiver."""
        ...

    def wait(self, timeout_s: float) -> TransferStats:
        """Block until every layer landed; raise KVTransferError/KVTransferTimeout otherwise."""
        ...

    def cancel(self) -> None:
        """Give up on this transfer; later layers are dropped."""
        ...


class KVSender(Protocol):
    """Prefill side of one request's transfer."""

    def send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queue one layer's K/V (must not be modified afterwards); returns before it is on the wire."""
        ...

    def finish(self) -> TransferStats:
        """Wait until the receiver verified every layer; raise KVTransferError otherwise."""
        ...

    def abort(self) -> None:
        """Stop sending; the receiver sees a transfer error."""
        ...


class KVEndpoint(Protocol):
    """A long-lived receiving endpoint of one transport on the decode side."""

    kind: TransportKind

    def expect(
        self, request_id: str, num_tokens: int, spec: KVSpec, on_layer: LayerCallback, keep: bool = False
    ) -> KVReceiver:
        """Register an incoming transfer and return its receiver (``keep``: hand ``on_layer`` private copies)."""
        ...

    def close(self) -> None:
        """Stop listening and free staging memory; pending receivers fail."""
        ...


class KVConnector(Protocol):
    """The sending side of one transport in a process (caches connections, mappings, groups)."""

    def open(self, descriptor: TransferDescriptor, options: SenderOptions) -> KVSender:
        """Open a sender towards the receiver described by ``descriptor``."""
        ...

    def close(self) -> None:
        """Release cached connections."""
        ...
