"""The shm transport (same node): a reused ring of shared-memory slots plus a small control socket.

Per request: the sender connects to the control socket and sends HELLO; the
receiver leases a ring (a file in /dev/shm, mapped by both sides, reused
across requests; the sender caches its mapping) and answers RING. For each
layer the sender waits for a free slot, copies K||V into it (hashing each
chunk while it is still in cache), and sends LAYER(slot, checksum); the
receiver verifies the slot in place, hands views of it to the callback and
answers FREE(slot). END -> ACK or ERROR as in tcp.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import tempfile
import threading
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from workers.kv.checksum import request_tag
from workers.kv.descriptor import TransferDescriptor, TransportKind
from workers.kv.errors import KVTransferError
from workers.kv.framing import (
    HEADER_NBYTES,
    Acceptor,
    Frame,
    FrameKind,
    await_verdict,
    connect,
    hard_close,
    listen,
    raise_if_error,
    recv_control_payload,
    recv_frame,
    send_error,
    send_frame,
    with_context,
)
from workers.kv.interface import EndpointOptions, KVSpec, LayerCallback, SenderOptions
from workers.kv.pipeline import HostStager, PendingTable, PendingTransfer, PipelinedSender
from workers.kv.tcp import read_hello, send_hello

_PAGE = mmap.PAGESIZE
_CHUNK_NBYTES = 1 << 20  # copy-then-hash granularity: the chunk is hashed while still in cache
_SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


@dataclass
class _Ring:
    """A mapped file of ``num_slots`` slots of ``slot_nbytes`` each."""

    path: str
    num_slots: int
    slot_nbytes: int
    mm: mmap.mmap
    array: np.ndarray

    def slot(self, index: int, nbytes: int) -> np.ndarray:
        """The first ``nbytes`` of slot ``index``."""
        start = index * self.slot_nbytes
        return self.array[start : start + nbytes]

    def close(self) -> None:
        """Unmap (views must be gone)."""
        del self.array
        try:
            self.mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with it


def _map(path: str, nbytes: int, create: bool) -> tuple[mmap.mmap, np.ndarray]:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        mm = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    return mm, np.frombuffer(mm, dtype=np.uint8)


class ShmEndpoint:
    """Receiving endpoint: control listener plus a pool of rings reused across requests."""

    kind = TransportKind.SHM

    def __init__(self, options: EndpointOptions | None = None) -> None:
        self._options = options or EndpointOptions()
        listener = listen(self._options.host, self._options.port, 1 << 16)
        self.address = f"{self._options.host}:{listener.getsockname()[1]}"
        self._table = PendingTable(self.kind, self.address)
        self._lock = threading.Lock()
        self._free: list[_Ring] = []
        self._all: list[_Ring] = []
        self._acceptor = Acceptor(listener, self._serve, name=f"kv-shm-accept-{self.address}")

    def expect(self, request_id: str, num_tokens: int, spec: KVSpec, on_layer: LayerCallback) -> PendingTransfer:
        """Register an incoming transfer and return its receiver."""
        return self._table.register(request_id, num_tokens, spec, on_layer)

    def close(self) -> None:
        """Stop accepting, fail pending transfers, unmap and delete the rings."""
        self._acceptor.close()
        self._table.fail_all("endpoint closed")
        with self._lock:
            rings, self._all, self._free = self._all, [], []
        for ring in rings:
            ring.close()
            try:
                os.unlink(ring.path)
            except FileNotFoundError:
                pass

    def _discard(self, ring: _Ring) -> None:
        with self._lock:
            self._all.remove(ring)
        ring.close()
        try:
            os.unlink(ring.path)
        except FileNotFoundError:
            pass

    def _lease(self, layer_nbytes: int) -> _Ring:
        with self._lock:
            for i, ring in enumerate(self._free):
                if ring.slot_nbytes >= layer_nbytes:
                    return self._free.pop(i)
        slot_nbytes = -(-max(layer_nbytes, self._options.staging_nbytes) // _PAGE) * _PAGE
        num_slots = max(2, self._options.shm_num_slots)
        path = os.path.join(_SHM_DIR, f"pdserve-kv-{os.getpid()}-{uuid.uuid4().hex[:12]}")
        mm, array = _map(path, num_slots * slot_nbytes, create=True)
        array.fill(0)  # touch every page once, here, not during a transfer
        ring = _Ring(path, num_slots, slot_nbytes, mm, array)
        with self._lock:
            self._all.append(ring)
        return ring

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(self._options.stall_timeout_s)
        scratch = bytearray(HEADER_NBYTES)
        pending: PendingTransfer | None = None
        try:
            pending = read_hello(sock, scratch, self._table)
            ring = self._lease(pending.descriptor.layer_nbytes)
            try:
                info = json.dumps({"path": ring.path, "num_slots": ring.num_slots, "slot_nbytes": ring.slot_nbytes})
                send_frame(sock, Frame(FrameKind.RING, nbytes=len(info)), [info.encode()])
                error = self._receive_layers(sock, scratch, pending, ring)
            except BaseException:
                self._discard(ring)  # a stalled sender might still write into it: never reuse
                raise
            with self._lock:
                self._free.append(ring)
            if error is None:
                pending.complete()
                send_frame(sock, Frame(FrameKind.ACK))
            else:
                send_error(sock, error)
        except (KVTransferError, OSError) as exc:
            if pending is None:
                send_error(sock, exc)
                return
            rid = pending.descriptor.request_id
            send_error(sock, pending.fail(with_context(exc, rid, f"after {pending.layers_received()} layers")))

    def _receive_layers(
        self, sock: socket.socket, scratch: bytearray, pending: PendingTransfer, ring: _Ring
    ) -> KVTransferError | None:
        desc = pending.descriptor
        tag = request_tag(desc.request_id)
        error: KVTransferError | None = None
        while True:
            frame = recv_frame(sock, scratch)
            if frame.kind == FrameKind.END:
                return error
            if (
                frame.kind != FrameKind.LAYER or frame.tag != tag
                or frame.nbytes != desc.layer_nbytes or frame.slot >= ring.num_slots
            ):
                raise KVTransferError(f"unexpected frame {frame} (want LAYER of {desc.layer_nbytes} bytes)")
            if error is None:
                try:
                    payload = torch.from_numpy(ring.slot(frame.slot, frame.nbytes))
                    pending.deliver(frame.layer_idx, payload, frame.checksum)
                except KVTransferError as exc:
                    error = exc
            send_frame(sock, Frame(FrameKind.FREE, slot=frame.slot, tag=tag))


class ShmWire:
    """Sending half: copy each layer into a free slot and announce it on the control socket."""

    def __init__(self, descriptor: TransferDescriptor, options: SenderOptions, connector: ShmConnector) -> None:
        self._desc = descriptor
        self._tag = request_tag(descriptor.request_id)
        self._scratch = bytearray(HEADER_NBYTES)
        self._stager = HostStager()
        self._sock = connect(descriptor.address, options.timeout_s, 1 << 16)
        try:
            send_hello(self._sock, descriptor)
            frame = recv_frame(self._sock, self._scratch, "the RING reply")
            raise_if_error(self._sock, frame, descriptor.request_id)
            if frame.kind != FrameKind.RING:
                raise KVTransferError(f"expected RING, got {frame.kind.name}")
            info = json.loads(recv_control_payload(self._sock, frame))
        except BaseException:
            self._sock.close()
            raise
        self._ring = connector.attach(info["path"], int(info["num_slots"]), int(info["slot_nbytes"]))
        self._free_slots: deque[int] = deque(range(self._ring.num_slots))

    def send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        """Copy one layer into a free slot and announce it."""
        k_bytes, v_bytes = self._stager.parts(k, v)
        nbytes = len(k_bytes) + len(v_bytes)
        while not self._free_slots:
            frame = recv_frame(self._sock, self._scratch, "a free slot")
            raise_if_error(self._sock, frame, self._desc.request_id)
            if frame.kind != FrameKind.FREE:
                raise KVTransferError(f"expected FREE, got {frame.kind.name}")
            self._free_slots.append(frame.slot)
        slot_index = self._free_slots.popleft()
        slot = self._ring.slot(slot_index, nbytes)
        state = xxhash.xxh3_64()
        offset = 0
        for part in (k_bytes, v_bytes):
            source = np.frombuffer(part, dtype=np.uint8)
            for start in range(0, len(source), _CHUNK_NBYTES):
                chunk = source[start : start + _CHUNK_NBYTES]
                target = slot[offset : offset + len(chunk)]
                target[:] = chunk
                state.update(target.data)
                offset += len(chunk)
        if corrupt:
            slot[0] ^= 0xFF
        frame = Frame(FrameKind.LAYER, layer_idx, slot_index, nbytes, int(state.intdigest()), self._tag)
        send_frame(self._sock, frame)

    def finish(self) -> None:
        """Send END and wait for the receiver's verdict."""
        send_frame(self._sock, Frame(FrameKind.END, tag=self._tag))
        await_verdict(self._sock, self._desc.request_id, self._scratch)

    def close(self) -> None:
        """Close the control connection (the ring mapping stays cached in the connector)."""
        hard_close(self._sock)


class ShmConnector:
    """Sending side of the shm transport; caches ring mappings so reused rings cost no page faults."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rings: dict[str, _Ring] = {}

    def attach(self, path: str, num_slots: int, slot_nbytes: int) -> _Ring:
        """Map a receiver's ring (once per process)."""
        with self._lock:
            ring = self._rings.get(path)
            if ring is None:
                try:
                    mm, array = _map(path, num_slots * slot_nbytes, create=False)
                except OSError as exc:
                    raise KVTransferError(f"cannot map shared-memory ring {path}: {exc}") from None
                ring = self._rings[path] = _Ring(path, num_slots, slot_nbytes, mm, array)
            return ring

    def open(self, descriptor: TransferDescriptor, options: SenderOptions) -> PipelinedSender:
        """Connect to the receiver, map its ring, and return a pipelined sender."""
        return PipelinedSender(descriptor, ShmWire(descriptor, options, self), options)

    def close(self) -> None:
        """Unmap every cached ring."""
        with self._lock:
            rings, self._rings = list(self._rings.values()), {}
        for ring in rings:
            ring.close()
