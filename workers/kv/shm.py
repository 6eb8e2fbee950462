"""The shm transport (same node): a reused ring of shared-memory slots plus a small control socket.

The ring is an anonymous memory file (``memfd_create``) of the receiving
process: it has no name in /dev/shm, the sender maps it through
``/proc/<receiver pid>/fd/<fd>``, and the kernel frees it when the last
process holding it exits -- a killed process leaves nothing behind.

Per request: the sender takes a pooled control connection (or connects) and
sends HELLO; on a new connection (or when the layers outgrow its slots) the
receiver leases a ring and answers RING, and the connection keeps that ring
for its later requests, which start without a RING round trip (rings are
reused across connections too; the sender caches its mapping). A ring's
slots are the layer size rounded up to a power of two, as many as fit in
``shm_ring_nbytes`` (at least ``shm_num_slots``). For each layer the sender
takes a free slot, copies K||V into it block by block (workers.kv.checksum:
with the C kernel each block is hashed as it is copied and streamed past the
cache; without it, hashed right after its copy while it is in cache), and
sends LAYER(slot, checksum) -- with the kernel, up to four queued layers a
call, without the interpreter between them (``COPY_KERNEL``). The receiver
verifies the slot in place and hands views of it to the callback, while the
sender fills the next slot.
Between layers the receiver polls the control socket for a while
(``poll_us``) before it sleeps in ``recv``: waking a sleeping receiver
cost the sender ~10 us a frame and the receiver ~25 us of latency here.
Only when a request has more layers than the ring has slots does the
receiver answer each layer with FREE(slot), and the sender waits for one
when it runs out. END -> ACK or ERROR as in tcp; a connection that ended in
ACK carries the sender's next request to the same receiver, with every slot
free again.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import threading
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

from workers.kv.checksum import BLOCK_NBYTES, COPY_KERNEL, copy_and_checksum
from workers.kv.descriptor import TransferDescriptor, TransportKind
from workers.kv.errors import KVPeerError, KVTransferError
from workers.kv.framing import (
    HEADER_CHECKSUM_OFFSET,
    HEADER_NBYTES,
    Frame,
    FrameKind,
    connect,
    hard_close,
    pack_header,
    private_fd,
    raise_if_error,
    recv_control_payload,
    recv_frame,
    send_error,
    send_failure,
    send_frame,
    set_stall_timeout,
    with_context,
)
from workers.kv.host import local_host_id
from workers.kv.hugepages import advise_huge_pages
from workers.kv.interface import EndpointOptions, SenderOptions
from workers.kv.pipeline import MemoryPiece, PendingTransfer, ViewCache, kernel_layer_parts
from workers.kv.receiving import MAX_RING_SLOTS, ReceivingSide, SideEndpoint, receive_slot_layers, ring_slots
from workers.kv.sending import PipelinedSender
from workers.kv.tcp import ConnectionPool, PooledWire, read_hello, send_hello, wait_for_next_request

_PAGE = mmap.PAGESIZE
# layers a call into the kernel's sending loop takes: against one layer a call in Python, 4 ran 1.04-1.07x
# as fast at 64 MB and the same at 16 MB; all 32 queued layers at once 0.93-0.94x at 16 MB, since the
# receiver waits while the sender prepares the whole batch before the first copy
_LAYERS_PER_CALL = 4


@dataclass
class _Ring:
    """A mapped memory file of ``num_slots`` slots of ``slot_nbytes`` each."""

    ring_id: str  # unique per ring: a /proc path is reused once its fd number is
    path: str  # /proc/<owner pid>/fd/<fd>, how another process of the same user opens it
    num_slots: int
    slot_nbytes: int
    mm: mmap.mmap
    array: np.ndarray
    fd: int | None = None  # held by the owning (receiving) process only
    # the receiver's tensors of its slots and K/V views of them, made once per ring instead of per layer
    # (~13 us a layer on a receiver whose caches the last slot's hashing flushed); dropped at close
    payloads: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    views: ViewCache = field(default_factory=dict)

    def slot(self, index: int, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of slot ``index``."""
        start = index * self.slot_nbytes
        return self.array[start : start + nbytes]

    def payload(self, index: int, nbytes: int) -> torch.Tensor:
        """The first ``nbytes`` of slot ``index`` as a uint8 tensor (cached)."""
        tensor = self.payloads.get((index, nbytes))
        if tensor is None:
            if len(self.payloads) >= 4 * MAX_RING_SLOTS:  # layer sizes keep changing: start over
                self.payloads.clear()
            tensor = self.payloads[(index, nbytes)] = torch.from_numpy(self.slot(index, nbytes))
        return tensor

    def info(self) -> bytes:
        """What the sender needs to map this ring (JSON)."""
        fields = {"id": self.ring_id, "path": self.path, "num_slots": self.num_slots, "slot_nbytes": self.slot_nbytes}
        return json.dumps(fields).encode()

    def close(self) -> None:
        """Unmap (views must be gone) and, in the owner, close the memory file."""
        self.payloads.clear()
        self.views.clear()
        del self.array
        try:
            self.mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with it
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def create_ring(num_slots: int, slot_nbytes: int) -> _Ring:
    """A new ring in an anonymous memory file of this process, every page touched once."""
    if not hasattr(os, "memfd_create"):
        raise KVTransferError("the shm transport needs Linux (memfd_create); use tcp")
    nbytes = num_slots * slot_nbytes
    fd = os.memfd_create("pdserve-kv-ring", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes)
    except BaseException:
        os.close(fd)
        raise
    advise_huge_pages(mm)
    array = np.frombuffer(mm, dtype=np.uint8)
    array.fill(0)  # touch every page here, not during a transfer (and with huge pages where granted)
    path = f"/proc/{os.getpid()}/fd/{fd}"
    return _Ring(uuid.uuid4().hex, path, num_slots, slot_nbytes, mm, array, fd)


def map_ring(ring_id: str, path: str, num_slots: int, slot_nbytes: int) -> _Ring:
    """Map another process's ring; KVTransferError if it is gone or not accessible."""
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise KVTransferError(
            f"cannot open shared-memory ring {path}: {exc} (shm needs both processes on one node, "
            "in one PID namespace, as the same user; use the tcp transport otherwise)"
        ) from None
    try:
        if os.fstat(fd).st_size < num_slots * slot_nbytes:
            raise KVTransferError(f"shared-memory ring {path} is smaller than announced")
        mm = mmap.mmap(fd, num_slots * slot_nbytes)
    finally:
        os.close(fd)
    advise_huge_pages(mm)  # this process's page tables may then map the owner's huge pages whole
    return _Ring(ring_id, path, num_slots, slot_nbytes, mm, np.frombuffer(mm, dtype=np.uint8))


@dataclass
class _HeldRing:
    """The ring a receiving connection leased: kept across its requests, so the sender needs no RING again."""

    ring: _Ring | None = None


class ShmEndpoint(SideEndpoint):
    """Receiving endpoint: control listener plus a pool of rings reused across requests."""

    kind = TransportKind.SHM

    def __init__(self, options: EndpointOptions | None = None) -> None:
        self._options = options or EndpointOptions()
        self._lock = threading.Lock()
        self._free: list[_Ring] = []
        self._all: list[_Ring] = []
        self._side = ReceivingSide(self.kind, self._options, self._serve, 1 << 16)
        self.address = self._side.address

    def close(self) -> None:
        """Stop accepting, fail pending transfers, release the rings."""
        self._side.close()
        with self._lock:
            rings, self._all, self._free = self._all, [], []
        for ring in rings:
            ring.close()

    def _discard(self, ring: _Ring) -> None:
        with self._lock:
            if ring in self._all:
                self._all.remove(ring)
        ring.close()

    def _lease(self, layer_nbytes: int) -> _Ring:
        """A free ring whose slots hold ``layer_nbytes`` (the smallest such), else a new one."""
        # power-of-two slot sizes: prompts of any length share a few ring sizes, so rings are reused
        slot_nbytes = max(_PAGE, 1 << (layer_nbytes - 1).bit_length())
        with self._lock:
            fitting = [ring for ring in self._free if ring.slot_nbytes >= layer_nbytes]
            if fitting:
                best = min(fitting, key=lambda ring: ring.slot_nbytes)
                self._free.remove(best)
                return best
        ring = create_ring(ring_slots(self._options, slot_nbytes), slot_nbytes)
        with self._lock:
            self._all.append(ring)
        return ring

    def _release(self, ring: _Ring) -> None:
        with self._lock:
            self._free.append(ring)

    def _serve(self, sock: socket.socket) -> None:
        scratch = bytearray(HEADER_NBYTES)
        held = _HeldRing()
        clean = False  # every request ended in ACK and the sender closed between requests
        try:
            while True:
                if not wait_for_next_request(sock):
                    clean = True
                    break
                if not self._serve_request(sock, scratch, held):
                    break
        finally:
            if held.ring is not None:
                # A request that failed (refused at HELLO, a stalled sender, a bad checksum, ...) leaves a
                # sender that knows the ring and may still be copying layers into it: no other connection
                # may lease it.
                (self._release if clean else self._discard)(held.ring)

    def _ring_for(self, sock: socket.socket, held: _HeldRing, layer_nbytes: int) -> _Ring:
        """The connection's ring if its slots are large enough (the sender has it mapped), else a new lease, sent as RING."""
        if held.ring is not None and held.ring.slot_nbytes >= layer_nbytes:
            return held.ring
        if held.ring is not None:
            self._release(held.ring)
        held.ring = ring = self._lease(layer_nbytes)
        info = ring.info()
        send_frame(sock, Frame(FrameKind.RING, nbytes=len(info)), [info])
        return ring

    def _serve_request(self, sock: socket.socket, scratch: bytearray, held: _HeldRing) -> bool:
        """Serve one request; True if it ended with ACK and the connection may carry another."""
        set_stall_timeout(sock, self._options.stall_timeout_s)  # a blocking socket: polling reads return at once
        pending: PendingTransfer | None = None
        try:
            pending = read_hello(sock, scratch, self._side.table)
            ring = self._ring_for(sock, held, pending.descriptor.layer_nbytes)
            error = receive_slot_layers(
                sock, scratch, pending, ring.num_slots, ring.payload, self._options.poll_us * 1e-6, ring.views
            )
            if error is None:
                pending.complete()
                send_frame(sock, Frame(FrameKind.ACK))
                return True
            send_error(sock, error)
        except (KVTransferError, OSError) as exc:
            if pending is not None:
                rid = pending.descriptor.request_id
                exc = pending.fail(with_context(exc, rid, f"after {pending.layers_received()} layers"))
            send_error(sock, exc)
        return False



class ShmWire(PooledWire):
    """Sending half: copy each layer into a free slot and announce it on the control socket."""

    def __init__(self, descriptor: TransferDescriptor, options: SenderOptions, connector: ShmConnector) -> None:
        sock = connector.pool.take(descriptor.address) or connect(descriptor.address, options.timeout_s, 1 << 16)
        set_stall_timeout(sock, options.timeout_s)  # blocking, as the kernel's loop needs (copy_layers)
        super().__init__(descriptor, sock, connector.pool)
        try:
            send_hello(self._sock, descriptor)
            # the receiver keeps a connection's ring while its slots are large enough, and then sends no RING
            known = connector.rings_by_connection.get(self._sock)
            if known is not None and known.slot_nbytes >= descriptor.layer_nbytes:
                self._ring = known
            else:
                self._ring = self._read_ring(connector)
                connector.rings_by_connection[self._sock] = self._ring
        except BaseException:
            hard_close(self._sock)
            raise
        self._free_slots: deque[int] = deque(range(self._ring.num_slots))

    def _read_ring(self, connector: ShmConnector) -> _Ring:
        """Read the RING reply and map the ring it describes."""
        frame = recv_frame(self._sock, self._scratch, "the RING reply")
        raise_if_error(self._sock, frame, self._desc.request_id)
        if frame.kind != FrameKind.RING:
            raise KVPeerError(f"expected RING, got {frame.kind.name}")
        info = json.loads(recv_control_payload(self._sock, frame))
        return connector.attach(str(info["id"]), str(info["path"]), int(info["num_slots"]), int(info["slot_nbytes"]))

    def _through_python(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        """Copy one layer into a free slot and announce it, without the kernel's loop.

        For CUDA layers (staged), fault injection, and builds without the kernel.
        """
        k_bytes, v_bytes = self._stager.parts(k, v)
        nbytes = len(k_bytes) + len(v_bytes)
        self._await_free_slot()
        slot_index = self._free_slots.popleft()
        # a call of its own, so no view of the ring outlives the copy (the ring unmaps once all are gone)
        checksum = copy_and_checksum(self._ring.slot(slot_index, nbytes), (k_bytes, v_bytes), corrupt)
        send_frame(self._sock, Frame(FrameKind.LAYER, layer_idx, slot_index, nbytes, checksum, self._tag))

    def _through_kernel(self, layers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> bool:
        """Copy host-memory layers into free slots and announce them through the C kernel's loop.

        One call takes up to ``_LAYERS_PER_CALL`` layers with free slots. False (nothing done) where
        the kernel cannot: not built, a CUDA layer, or blocks it cannot hash.
        """
        if COPY_KERNEL is None:
            return False
        taken = kernel_layer_parts(layers)
        if taken is None:
            return False
        parts, nbytes = taken
        done = 0
        while done < len(layers):
            self._await_free_slot()
            batch: list[tuple[np.ndarray, tuple[MemoryPiece, MemoryPiece], bytearray]] = []
            while self._free_slots and done + len(batch) < len(layers) and len(batch) < _LAYERS_PER_CALL:
                slot_index = self._free_slots.popleft()
                layer_idx = layers[done + len(batch)][0]
                header = pack_header(Frame(FrameKind.LAYER, layer_idx, slot_index, nbytes, 0, self._tag))
                batch.append((self._ring.slot(slot_index, nbytes), parts[done + len(batch)], bytearray(header)))
            try:
                with private_fd(self._sock) as fd:
                    COPY_KERNEL(fd, batch, BLOCK_NBYTES, HEADER_CHECKSUM_OFFSET)
            except OSError as exc:
                raise with_context(send_failure(self._sock, exc), self._desc.request_id, "a layer frame") from None
            finally:
                done += len(batch)
                batch.clear()  # no view of the ring may outlive the call, not even in a traceback's frame
        return True

    def _await_free_slot(self) -> None:
        """Read FREE frames until a slot is free (only when a request has more layers than the ring has slots)."""
        while not self._free_slots:
            frame = recv_frame(self._sock, self._scratch, "a free slot")
            raise_if_error(self._sock, frame, self._desc.request_id)
            if frame.kind != FrameKind.FREE:
                raise KVPeerError(f"expected FREE, got {frame.kind.name}")
            self._free_slots.append(frame.slot)


class ShmConnector:
    """Sending side of the shm transport; caches ring mappings (no page faults on reuse) and connections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rings: dict[str, _Ring] = {}  # by /proc path; replaced when the path names a new ring
        self.pool = ConnectionPool()
        # the ring each live control connection last announced (entries go with their sockets)
        self.rings_by_connection: weakref.WeakKeyDictionary[socket.socket, _Ring] = weakref.WeakKeyDictionary()

    def attach(self, ring_id: str, path: str, num_slots: int, slot_nbytes: int) -> _Ring:
        """Map a receiver's ring (once per process and ring)."""
        with self._lock:
            ring = self._rings.get(path)
            if ring is not None and ring.ring_id == ring_id and ring.num_slots * ring.slot_nbytes >= num_slots * slot_nbytes:
                return ring
            stale, ring = ring, map_ring(ring_id, path, num_slots, slot_nbytes)
            self._rings[path] = ring
        if stale is not None:
            stale.close()  # the receiver replaced it; no sender of this process uses it any more
        return ring

    def open(self, descriptor: TransferDescriptor, options: SenderOptions) -> PipelinedSender:
        """Connect to the receiver, map its ring, and return a pipelined sender."""
        if descriptor.host_id and descriptor.host_id != local_host_id():
            raise KVTransferError(
                f"request {descriptor.request_id!r}: shm needs the receiver on this host, and its descriptor names "
                f"host {descriptor.host_id} (this one is {local_host_id() or 'unknown'}); use tcp or torch_dist"
            )
        return PipelinedSender(descriptor, ShmWire(descriptor, options, self), options)

    def close(self) -> None:
        """Close idle connections and unmap every cached ring."""
        self.pool.close()
        with self._lock:
            rings, self._rings = list(self._rings.values()), {}
        for ring in rings:
            ring.close()
