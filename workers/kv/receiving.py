"""The receiving side every socket-controlled endpoint shares, and the slot transports' receive loop.

``ReceivingSide`` is what tcp, shm, torch_dist and nixl endpoints hold: a
listening socket, the address advertised in descriptors, the table of
expected transfers, and the acceptor that serves each sender connection on
its own thread; closing it stops accepting and fails every pending transfer.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import torch

from workers.kv.checksum import request_tag
from workers.kv.descriptor import TransportKind
from workers.kv.errors import KVTransferError
from workers.kv.framing import Acceptor, Frame, FrameKind, listen, next_layer_frame, send_frame
from workers.kv.interface import EndpointOptions, KVSpec, LayerCallback
from workers.kv.pipeline import PendingTable, PendingTransfer, ViewCache


class ReceivingSide:
    """Listener, advertised address, pending-transfer table and acceptor of one endpoint."""

    def __init__(
        self,
        kind: TransportKind,
        options: EndpointOptions,
        serve: Callable[[socket.socket], None],
        buffer_nbytes: int,
        device: str = "cpu",
    ) -> None:
        listener = listen(options.host, options.port, buffer_nbytes)
        self.address = f"{options.host}:{listener.getsockname()[1]}"
        self.table = PendingTable(kind, self.address, device=device)
        self._acceptor = Acceptor(listener, serve, name=f"kv-{kind.value}-accept-{self.address}")

    def expect(
        self, request_id: str, num_tokens: int, spec: KVSpec, on_layer: LayerCallback, keep: bool = False
    ) -> PendingTransfer:
        """Register an incoming transfer and return its receiver."""
        return self.table.register(request_id, num_tokens, spec, on_layer, keep)

    def close(self) -> None:
        """Fail every pending transfer, stop accepting, and end open connections."""
        # failed first: a connection thread inside a gloo receive does not wake when its control socket
        # is shut, and its waiter should not sit out the acceptor's join
        self.table.fail_all("endpoint closed")
        self._acceptor.close()


class SideEndpoint:
    """Base of the network endpoints: ``expect`` registers with the endpoint's ``ReceivingSide``."""

    _side: ReceivingSide

    def expect(
        self, request_id: str, num_tokens: int, spec: KVSpec, on_layer: LayerCallback, keep: bool = False
    ) -> PendingTransfer:
        """Register an incoming transfer and return its receiver."""
        return self._side.expect(request_id, num_tokens, spec, on_layer, keep)


MAX_RING_SLOTS = 128  # more than a model has layers: beyond this, slots only cost memory


def ring_slots(options: EndpointOptions, slot_nbytes: int) -> int:
    """Slots of a new shm or nixl ring with slots of ``slot_nbytes``: as many as ``shm_ring_nbytes`` holds, within bounds."""
    return min(MAX_RING_SLOTS, max(2, options.shm_num_slots, options.shm_ring_nbytes // slot_nbytes))


def receive_slot_layers(
    sock: socket.socket,
    scratch: bytearray,
    pending: PendingTransfer,
    num_slots: int,
    slot_payload: Callable[[int, int], torch.Tensor],
    poll_s: float = 0.0,
    views: ViewCache | None = None,
) -> KVTransferError | None:
    """Slot transports (shm, nixl): deliver each announced slot, free it, stop at END; the first error.

    ``slot_payload(slot, nbytes)`` is a view of the slot's bytes; ``views`` caches K/V views of the
    slots for as long as they stay mapped (``PendingTransfer.deliver``). After a failed delivery the
    stream is still drained (every slot freed), so the sender reaches END and reads the verdict.
    When every layer has a slot of its own the sender never runs out, so no FREE is sent (the
    sender starts each request with all slots free: the previous one ended with ACK).
    """
    desc = pending.descriptor
    tag = request_tag(desc.request_id)
    send_free = desc.num_layers > num_slots
    error: KVTransferError | None = None
    while True:
        frame = next_layer_frame(sock, scratch, tag, desc.layer_nbytes, num_slots, poll_s)
        if frame is None:
            return error
        if error is None:
            try:
                pending.deliver(frame.layer_idx, slot_payload(frame.slot, frame.nbytes), frame.checksum, views=views)
            except KVTransferError as exc:
                error = exc
        if send_free:
            send_frame(sock, Frame(FrameKind.FREE, slot=frame.slot, tag=tag))
