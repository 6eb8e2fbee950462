"""The NIXL transport (optional; ``pip install nixl-cu12`` and ``pip install --no-deps nixl``).

Like shm, but the bytes move by a NIXL (UCX) one-sided WRITE instead of a
shared mapping, so the receiver may be on another host. The receiver
registers a ring of slots with its NIXL agent and answers HELLO with RING
(its agent metadata and the ring's address); per layer the sender copies
K||V into its own registered buffer (hashing each block while in cache),
WRITEs it into a free slot, waits for completion, and sends LAYER(slot,
checksum) on the control socket; the receiver verifies the slot in place and
answers FREE. END -> ACK or ERROR as in tcp.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any

import torch

from workers.kv.checksum import copy_and_checksum, request_tag
from workers.kv.descriptor import TransferDescriptor, TransportKind
from workers.kv.errors import KVBackendUnavailable, KVTransferError, KVTransferTimeout
from workers.kv.framing import (
    HEADER_NBYTES,
    Frame,
    FrameKind,
    await_verdict,
    connect,
    hard_close,
    raise_if_error,
    recv_control_payload,
    recv_frame,
    send_error,
    send_frame,
    with_context,
)
from workers.kv.interface import EndpointOptions, SenderOptions
from workers.kv.pipeline import HostStager, PendingTransfer
from workers.kv.receiving import ReceivingSide, SideEndpoint, receive_slot_layers
from workers.kv.sending import PipelinedSender

# UCX's memory hooks (malloc/mmap interception) crashed torch's CPU tensors in this process; transfers use
# buffers registered once, so the registration cache those hooks keep coherent is not needed.
os.environ.setdefault("UCX_MEM_EVENTS", "no")
os.environ.setdefault("UCX_MEM_MALLOC_HOOKS", "no")

try:
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError as exc:  # optional dependency
    raise KVBackendUnavailable(
        "KV transport 'nixl' needs NIXL: pip install nixl-cu12 && pip install --no-deps nixl"
    ) from exc


def _agent(role: str) -> Any:
    # The target of a WRITE needs UCX's progress thread (without it writes never completed), but it
    # spins (sched_yield) on a core: the sending side, which polls its transfers and so progresses
    # them, runs without one -- two spinning threads took both cores of a two-core host.
    config = nixl_agent_config(enable_prog_thread=role == "recv", backends=["UCX"])
    return nixl_agent(f"pdserve-kv-{role}-{uuid.uuid4().hex[:12]}", config)


class NixlEndpoint(SideEndpoint):
    """Receiving endpoint: control listener, a NIXL agent, registered rings reused across requests."""

    kind = TransportKind.NIXL

    def __init__(self, options: EndpointOptions | None = None) -> None:
        self._options = options or EndpointOptions()
        self._agent = _agent("recv")
        self._agent_lock = threading.Lock()  # NIXL agent calls are serialized: registration is not thread-safe
        self._meta_version = 0  # bumped with every (de)registration, so senders never load older metadata
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []
        self._side = ReceivingSide(self.kind, self._options, self._serve, 1 << 16)
        self.address = self._side.address

    def close(self) -> None:
        """Stop accepting, fail pending transfers, deregister the rings."""
        self._side.close()
        with self._lock:
            rings, self._free = self._free, []
        for ring in rings:
            self._deregister(ring)

    def _deregister(self, ring: torch.Tensor) -> None:
        with self._agent_lock:
            self._agent.deregister_memory(self._agent.get_reg_descs(ring))
            self._meta_version += 1

    def _lease(self, slot_nbytes: int) -> torch.Tensor:
        num_slots = max(2, self._options.shm_num_slots)
        with self._lock:
            for i, ring in enumerate(self._free):
                if ring.numel() >= num_slots * slot_nbytes:
                    return self._free.pop(i)
        ring = torch.zeros(num_slots * max(slot_nbytes, self._options.staging_nbytes), dtype=torch.uint8)
        with self._agent_lock:
            self._agent.register_memory(ring)
            self._meta_version += 1
        return ring

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(self._options.stall_timeout_s)
        scratch = bytearray(HEADER_NBYTES)
        pending: PendingTransfer | None = None
        try:
            from workers.kv.tcp import read_hello

            pending = read_hello(sock, scratch, self._side.table)
            slot_nbytes = pending.descriptor.layer_nbytes
            ring = self._lease(slot_nbytes)
            num_slots = ring.numel() // slot_nbytes
            # metadata taken after the ring's registration, which it must include
            with self._agent_lock:
                meta = base64.b64encode(self._agent.get_agent_metadata()).decode()
                version = self._meta_version
            info = json.dumps({
                "name": self._agent.name, "meta": meta, "version": version, "addr": ring.data_ptr(),
                "num_slots": num_slots, "slot_nbytes": slot_nbytes,
            })
            try:
                send_frame(sock, Frame(FrameKind.RING, nbytes=len(info)), [info.encode()])
                error = receive_slot_layers(
                    sock, scratch, pending, num_slots,
                    lambda slot, nbytes: ring[slot * slot_nbytes : slot * slot_nbytes + nbytes],
                )
            except BaseException:
                self._deregister(ring)  # a late WRITE must not land in a reused ring
                raise
            with self._lock:
                self._free.append(ring)
            if error is None:
                pending.complete()
                send_frame(sock, Frame(FrameKind.ACK))
            else:
                send_error(sock, error)
        except (KVTransferError, OSError, RuntimeError) as exc:  # NIXL reports its errors as RuntimeError
            if not isinstance(exc, KVTransferError | OSError):
                exc = KVTransferError(f"NIXL: {exc!r}")
            if pending is None:
                send_error(sock, exc)
                return
            rid = pending.descriptor.request_id
            send_error(sock, pending.fail(with_context(exc, rid, f"after {pending.layers_received()} layers")))



class NixlWire:
    """Sending half: stage, WRITE into a free remote slot, announce it."""

    def __init__(self, descriptor: TransferDescriptor, options: SenderOptions, connector: NixlConnector) -> None:
        from workers.kv.tcp import send_hello

        self._desc = descriptor
        self._options = options
        self._connector = connector
        self._tag = request_tag(descriptor.request_id)
        self._scratch = bytearray(HEADER_NBYTES)
        self._stager = HostStager()
        self._closed = False
        self._sock = connect(descriptor.address, options.timeout_s, 1 << 16)
        try:
            send_hello(self._sock, descriptor)
            frame = recv_frame(self._sock, self._scratch, "the RING reply")
            raise_if_error(self._sock, frame, descriptor.request_id)
            if frame.kind != FrameKind.RING:
                raise KVTransferError(f"expected RING, got {frame.kind.name}")
            info = json.loads(recv_control_payload(self._sock, frame))
            self._remote = connector.remote(str(info["name"]), base64.b64decode(info["meta"]), int(info["version"]))
            self._staging = connector.acquire(descriptor.layer_nbytes)
        except BaseException:
            self._sock.close()
            raise
        self._ring_addr, self._slot_nbytes = int(info["addr"]), int(info["slot_nbytes"])
        self._free_slots: deque[int] = deque(range(int(info["num_slots"])))

    def send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        """Stage one layer, WRITE it into a free slot, and announce it."""
        k_bytes, v_bytes = self._stager.parts(k, v)
        nbytes = len(k_bytes) + len(v_bytes)
        while not self._free_slots:
            frame = recv_frame(self._sock, self._scratch, "a free slot")
            raise_if_error(self._sock, frame, self._desc.request_id)
            if frame.kind != FrameKind.FREE:
                raise KVTransferError(f"expected FREE, got {frame.kind.name}")
            self._free_slots.append(frame.slot)
        slot = self._free_slots.popleft()
        checksum = copy_and_checksum(self._staging.numpy(), (k_bytes, v_bytes), corrupt)
        self._connector.write(self._staging, nbytes, self._remote, self._ring_addr + slot * self._slot_nbytes,
                              self._options.timeout_s)
        send_frame(self._sock, Frame(FrameKind.LAYER, layer_idx, slot, nbytes, checksum, self._tag))

    def finish(self) -> None:
        """Send END and wait for the receiver's verdict."""
        send_frame(self._sock, Frame(FrameKind.END, tag=self._tag))
        await_verdict(self._sock, self._desc.request_id, self._scratch)

    def close(self) -> None:
        """Close the control connection and return the staging buffer (idempotent)."""
        if self._closed:
            return
        self._closed = True
        hard_close(self._sock)
        self._connector.release(self._staging)


class NixlConnector:
    """Sending side: one NIXL agent per process, registered staging buffers, known remote agents."""

    def __init__(self) -> None:
        self._agent = _agent("send")
        self._lock = threading.Lock()
        self._agent_lock = threading.Lock()
        self._remotes: dict[str, int] = {}  # remote agent name -> version of the metadata loaded for it
        self._free: list[torch.Tensor] = []

    def remote(self, name: str, metadata: bytes, version: int) -> str:
        """Load a remote agent's metadata, again when a newer version comes (the receiver registered a ring)."""
        with self._lock, self._agent_lock:
            known = self._remotes.get(name)
            if known is None or known < version:
                if known is not None:
                    self._agent.remove_remote_agent(name)
                self._agent.add_remote_agent(metadata)
                if known is None:
                    self._agent.make_connection(name)  # wire up now, not during the first layer
                self._remotes[name] = version
            return name

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A registered staging buffer of at least ``nbytes``."""
        with self._lock:
            for i, buffer in enumerate(self._free):
                if buffer.numel() >= nbytes:
                    return self._free.pop(i)
        buffer = torch.zeros(nbytes, dtype=torch.uint8)
        with self._agent_lock:
            self._agent.register_memory(buffer)
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        """Return a staging buffer for reuse."""
        with self._lock:
            self._free.append(buffer)

    def write(self, local: torch.Tensor, nbytes: int, remote: str, remote_addr: int, timeout_s: float) -> None:
        """WRITE ``local[:nbytes]`` to ``remote_addr`` of agent ``remote`` and wait for completion."""
        with self._agent_lock:  # one transfer at a time per process: agent calls are not thread-safe
            self._write(local, nbytes, remote, remote_addr, timeout_s)

    def _write(self, local: torch.Tensor, nbytes: int, remote: str, remote_addr: int, timeout_s: float) -> None:
        src = self._agent.get_xfer_descs([(local.data_ptr(), nbytes, 0)], "DRAM")
        dst = self._agent.get_xfer_descs([(remote_addr, nbytes, 0)], "DRAM")
        handle = self._agent.initialize_xfer("WRITE", src, dst, remote)
        try:
            state = self._agent.transfer(handle)
            deadline = time.monotonic() + timeout_s
            while state != "DONE":
                if state == "ERR":
                    raise KVTransferError("NIXL WRITE failed")
                if time.monotonic() > deadline:
                    raise KVTransferTimeout(f"NIXL WRITE not done after {timeout_s}s")
                state = self._agent.check_xfer_state(handle)
        finally:
            self._agent.release_xfer_handle(handle)

    def open(self, descriptor: TransferDescriptor, options: SenderOptions) -> PipelinedSender:
        """Connect to the receiver and return a pipelined sender."""
        return PipelinedSender(descriptor, NixlWire(descriptor, options, self), options)

    def close(self) -> None:
        """Deregister the staging buffers."""
        with self._lock:
            buffers, self._free = self._free, []
        with self._agent_lock:
            for buffer in buffers:
                self._agent.deregister_memory(self._agent.get_reg_descs(buffer))
