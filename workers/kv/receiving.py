"""The receiving side every socket-controlled endpoint shares, and the verifier thread of a connection.

``ReceivingSide`` is what tcp, shm, torch_dist and nixl endpoints hold: a
listening socket, the address advertised in descriptors, the table of
expected transfers, and the acceptor that serves each sender connection on
its own thread; closing it stops accepting and fails every pending transfer.

``LayerVerifier`` lets a connection thread read layer i+1 from the wire while
layer i is verified and handed to the engine: the connection thread fills a
staging buffer taken from the verifier and submits it; the verifier thread
checks the checksum, calls ``PendingTransfer.deliver`` (which runs the
engine's callback) and returns the buffer. At END the connection thread
calls ``drain`` and answers ACK or ERROR from its result, so the sender is
acknowledged only after every layer was verified and written.
"""

from __future__ import annotations

import queue
import socket
import threading
from collections.abc import Callable

import torch

from workers.kv.checksum import request_tag
from workers.kv.descriptor import TransportKind
from workers.kv.errors import KVTransferError
from workers.kv.framing import Acceptor, Frame, FrameKind, listen, next_layer_frame, send_frame
from workers.kv.interface import EndpointOptions, KVSpec, LayerCallback
from workers.kv.pipeline import PendingTable, PendingTransfer, StagingPool, ViewCache


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
        """Stop accepting, end open connections, and fail every pending transfer."""
        self._acceptor.close()
        self.table.fail_all("endpoint closed")


class SideEndpoint:
    """Base of the network endpoints: ``expect`` registers with the endpoint's ``ReceivingSide``."""

    _side: ReceivingSide

    def expect(
        self, request_id: str, num_tokens: int, spec: KVSpec, on_layer: LayerCallback, keep: bool = False
    ) -> PendingTransfer:
        """Register an incoming transfer and return its receiver."""
        return self._side.expect(request_id, num_tokens, spec, on_layer, keep)


_Job = tuple[PendingTransfer, int, torch.Tensor, torch.Tensor, int, "int | None"]
_STOP = None


class LayerVerifier:
    """Verifies and delivers one connection's layers on its own thread, over a few reused staging buffers."""

    def __init__(self, staging: StagingPool, name: str, num_buffers: int = 2) -> None:
        self._staging = staging
        self._num_buffers = max(1, num_buffers)
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._allocated = 0
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._idle = threading.Condition()
        self._outstanding = 0
        self._error: KVTransferError | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def take(self, nbytes: int, timeout_s: float) -> torch.Tensor:
        """A staging buffer of at least ``nbytes`` (waits while every buffer is being verified)."""
        if self._allocated < self._num_buffers and self._free.empty():
            self._allocated += 1
            return self._staging.acquire(nbytes)
        try:
            buffer = self._free.get(timeout=timeout_s)
        except queue.Empty:
            raise KVTransferError(f"layer verification stalled for {timeout_s}s (engine callback blocked?)") from None
        if buffer.numel() < nbytes:  # a larger request than this connection served before
            self._staging.release(buffer)
            buffer = self._staging.acquire(nbytes)
        return buffer

    def give_back(self, buffer: torch.Tensor) -> None:
        """Return a buffer that was taken but not submitted (the read failed)."""
        self._free.put(buffer)

    def submit(
        self, pending: PendingTransfer, layer_idx: int, buffer: torch.Tensor, nbytes: int, checksum: int,
        actual: int | None = None,
    ) -> None:
        """Verify ``buffer[:nbytes]`` against ``checksum`` and deliver it, on the verifier thread."""
        with self._idle:
            self._outstanding += 1
        self._jobs.put((pending, layer_idx, buffer, buffer[:nbytes], checksum, actual))

    def drain(self) -> KVTransferError | None:
        """Wait until every submitted layer was handled; return (and clear) the first delivery error."""
        with self._idle:
            self._idle.wait_for(lambda: self._outstanding == 0)
            error, self._error = self._error, None
        return error

    def close(self) -> None:
        """Finish queued layers, stop the thread and return the buffers to the pool."""
        self._jobs.put(_STOP)
        self._thread.join()
        while not self._free.empty():
            self._staging.release(self._free.get_nowait())

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            self._handle(job)

    def _handle(self, job: _Job) -> None:
        pending, layer_idx, buffer, payload, checksum, actual = job
        try:
            pending.deliver(layer_idx, payload, checksum, actual)  # raises the recorded error once failed
        except KVTransferError as exc:
            with self._idle:
                self._error = self._error or exc
        except BaseException as exc:  # never let the thread die with layers outstanding
            with self._idle:
                self._error = self._error or KVTransferError(f"layer {layer_idx}: {exc!r}")
        finally:
            self._free.put(buffer)
            with self._idle:
                self._outstanding -= 1
                self._idle.notify_all()


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
