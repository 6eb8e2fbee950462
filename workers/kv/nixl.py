"""The NIXL transport (optional; ``pip install nixl-cu12`` and ``pip install --no-deps nixl``).

Like shm, but the bytes move by a NIXL (UCX) one-sided WRITE instead of a
shared mapping, so the receiver may be on another host. The receiver
registers a ring of slots with its NIXL agent and answers HELLO with RING
(its agent metadata and the ring's address); per layer the sender copies
K||V into its own registered staging buffer (hashing each block as it
copies), WRITEs it into a free slot, waits for completion, and sends
LAYER(slot, checksum) on the control socket; the receiver verifies the slot
in place and answers FREE. END -> ACK or ERROR as in tcp.

Rings and staging live on huge pages (``huge_page_buffer``), and the staging
is written with plain stores, so the WRITE reads it from cache: between
processes on one host UCX moves a WRITE by CMA (``process_vm_writev``),
which pins every page it copies.

Neither agent runs UCX's progress thread, which spins (sched_yield) on a
core for as long as the agent exists: CMA needs nothing of the target,
whose worker must progress only to answer connection set-up. The receiving
endpoint does that from a thread that sleeps between polls
(``PROGRESS_INTERVAL_S``); the sender progresses its own worker as it
polls its transfers. The receiver pulling each slot by READ instead, which
moves the copy to the decode side, ran as fast and took more CPU in all
(both processes' CPU per 64 MB transfer: 41 ms against 31).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from workers.kv.checksum import copy_and_checksum, request_tag
from workers.kv.descriptor import TransferDescriptor, TransportKind
from workers.kv.errors import (
    NIXL_INSTALL,
    KVBackendUnavailable,
    KVPeerError,
    KVPeerTimeout,
    KVTransferError,
)
from workers.kv.framing import (
    HEADER_NBYTES,
    Frame,
    FrameKind,
    await_verdict,
    connect,
    explained,
    hard_close,
    raise_if_error,
    recv_control_payload,
    recv_frame,
    send_error,
    send_frame,
    with_context,
)
from workers.kv.hugepages import huge_page_buffer
from workers.kv.interface import EndpointOptions, SenderOptions
from workers.kv.pipeline import HostStager, PendingTransfer
from workers.kv.receiving import ReceivingSide, SideEndpoint, receive_slot_layers, ring_slots
from workers.kv.sending import PipelinedSender
from workers.kv.tcp import read_hello, send_hello

# UCX's memory hooks (malloc/mmap interception) crashed torch's CPU tensors in this process; transfers use
# buffers registered once, so the registration cache those hooks keep coherent is not needed.
os.environ.setdefault("UCX_MEM_EVENTS", "no")
os.environ.setdefault("UCX_MEM_MALLOC_HOOKS", "no")

try:
    from nixl import _bindings as nixl_bindings
    from nixl._api import nixl_agent, nixl_agent_config
except ImportError as exc:  # optional dependency
    raise KVBackendUnavailable(f"KV transport 'nixl' needs NIXL: {NIXL_INSTALL}") from exc

# NIXL's error for "the other agent went away" (a receiver that closed): a peer error, as on a socket
_PEER_GONE: tuple[type[BaseException], ...] = tuple(
    cls for cls in (getattr(nixl_bindings, "nixlRemoteDisconnectError", None),) if isinstance(cls, type)
)

# How often the receiving agent's worker is progressed. A sender's first WRITE waits for connection set-up,
# a few round trips each answered within this; a poll costs microseconds, so the thread stays below a
# percent of a core, where UCX's own progress thread took the whole core.
PROGRESS_INTERVAL_S = 0.002


@contextlib.contextmanager
def _as_transfer_error(what: str) -> Iterator[None]:
    """Raise NIXL's own exceptions (plain ``Exception`` subclasses) as KVTransferError naming ``what``."""
    try:
        yield
    except KVTransferError:
        raise
    except Exception as exc:
        if not type(exc).__module__.startswith("nixl"):
            raise
        cls = KVPeerError if isinstance(exc, _PEER_GONE) else KVTransferError
        raise cls(f"NIXL {what}: {exc!r}") from exc


class NixlAgent:
    """A NIXL agent, progressed by a sleeping thread where ``progress``; calls on it are serialized (not thread-safe)."""

    def __init__(self, role: str, progress: bool) -> None:
        config = nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        self.name = f"pdserve-kv-{role}-{uuid.uuid4().hex[:12]}"
        self._agent = nixl_agent(self.name, config)
        self._lock = threading.Lock()
        self._version = 0  # bumped with every (de)registration, so peers never load older metadata
        self._remotes: dict[str, int] = {}  # peer agent name -> version of the metadata loaded for it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if progress:
            self._thread = threading.Thread(target=self._progress, name=f"kv-nixl-progress-{role}", daemon=True)
            self._thread.start()

    def _progress(self) -> None:
        while not self._stop.wait(PROGRESS_INTERVAL_S):
            # a failed poll is retried at the next interval; transfers report their own failures
            with self._lock, contextlib.suppress(KVTransferError), _as_transfer_error("progress"):
                self._agent.get_new_notifs()  # progresses the UCX worker; pdserve sends no notifications

    def register(self, buffer: torch.Tensor) -> None:
        """Register ``buffer`` for transfers."""
        with self._lock, _as_transfer_error("memory registration"):
            self._agent.register_memory(buffer)
            self._version += 1

    def deregister(self, buffer: torch.Tensor) -> None:
        """Deregister ``buffer``."""
        with self._lock, _as_transfer_error("memory deregistration"):
            self._agent.deregister_memory(self._agent.get_reg_descs(buffer))
            self._version += 1

    def metadata(self) -> dict[str, Any]:
        """This agent's name, metadata and its version, for a peer's ``load_peer`` (after the registrations it needs)."""
        with self._lock, _as_transfer_error("metadata"):
            meta = base64.b64encode(self._agent.get_agent_metadata()).decode()
            return {"name": self.name, "meta": meta, "version": self._version}

    def load_peer(self, info: dict[str, Any]) -> str:
        """Load a peer's metadata (again when a newer version comes), connect, and return its name."""
        try:
            name, version, meta = str(info["name"]), int(info["version"]), base64.b64decode(info["meta"])
        except (KeyError, TypeError, ValueError) as exc:
            raise KVTransferError(f"malformed NIXL peer description: {exc!r}") from None
        with self._lock, _as_transfer_error(f"loading peer {name!r}"):
            known = self._remotes.get(name)
            if known is None or known < version:
                if known is not None:
                    self._agent.remove_remote_agent(name)
                self._agent.add_remote_agent(meta)
                self._agent.make_connection(name)  # wire up now, not during the first layer
                self._remotes[name] = version
        return name

    def write(self, local_addr: int, nbytes: int, peer: str, peer_addr: int, timeout_s: float) -> None:
        """WRITE ``nbytes`` at ``local_addr`` to ``peer_addr`` of agent ``peer`` and wait for completion."""
        with self._lock, _as_transfer_error(f"WRITE to {peer!r}"):  # one transfer at a time per agent
            local = self._agent.get_xfer_descs([(local_addr, nbytes, 0)], "DRAM")
            remote = self._agent.get_xfer_descs([(peer_addr, nbytes, 0)], "DRAM")
            handle = self._agent.initialize_xfer("WRITE", local, remote, peer)
            try:
                state = self._agent.transfer(handle)
                deadline = time.monotonic() + timeout_s
                while state != "DONE":
                    if state == "ERR":  # what a WRITE to an agent that went away mid-transfer ends in
                        raise KVPeerError("NIXL WRITE failed")
                    if time.monotonic() > deadline:  # a one-sided WRITE stalls on the receiving agent's side
                        raise KVPeerTimeout(f"NIXL WRITE not done after {timeout_s}s")
                    state = self._agent.check_xfer_state(handle)
            finally:
                self._agent.release_xfer_handle(handle)

    def close(self) -> None:
        """Stop the progress thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _Buffers:
    """Registered buffers of huge-page memory (rings, staging), reused across transfers."""

    def __init__(self, agent: NixlAgent) -> None:
        self._agent = agent
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A registered buffer of at least ``nbytes``."""
        with self._lock:
            for i, buffer in enumerate(self._free):
                if buffer.numel() >= nbytes:
                    return self._free.pop(i)
        buffer = huge_page_buffer(nbytes)
        self._agent.register(buffer)
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        """Return a buffer for reuse."""
        with self._lock:
            self._free.append(buffer)

    def discard(self, buffer: torch.Tensor) -> None:
        """Deregister a buffer that must not be reused."""
        self._agent.deregister(buffer)

    def close(self) -> None:
        """Deregister every free buffer."""
        with self._lock:
            buffers, self._free = self._free, []
        for buffer in buffers:
            self._agent.deregister(buffer)


class NixlEndpoint(SideEndpoint):
    """Receiving endpoint: control listener, a NIXL agent, registered rings reused across requests."""

    kind = TransportKind.NIXL

    def __init__(self, options: EndpointOptions | None = None) -> None:
        self._options = options or EndpointOptions()
        self._agent = NixlAgent("recv", progress=True)
        self._rings = _Buffers(self._agent)
        self._side = ReceivingSide(self.kind, self._options, self._serve, 1 << 16)
        self.address = self._side.address

    def close(self) -> None:
        """Stop accepting, fail pending transfers, deregister the rings."""
        self._side.close()
        self._rings.close()
        self._agent.close()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(self._options.stall_timeout_s)
        scratch = bytearray(HEADER_NBYTES)
        pending: PendingTransfer | None = None
        try:
            pending = read_hello(sock, scratch, self._side.table)
            slot_nbytes = pending.descriptor.layer_nbytes
            num_slots = ring_slots(self._options, slot_nbytes)
            ring = self._rings.acquire(num_slots * slot_nbytes)
            try:
                # the metadata is taken after the ring's registration, which it must include
                info = json.dumps({
                    **self._agent.metadata(), "addr": ring.data_ptr(), "num_slots": num_slots, "slot_nbytes": slot_nbytes,
                }).encode()
                send_frame(sock, Frame(FrameKind.RING, nbytes=len(info)), [info])
                error = receive_slot_layers(
                    sock, scratch, pending, num_slots,
                    lambda slot, nbytes: ring[slot * slot_nbytes : slot * slot_nbytes + nbytes],
                    self._options.poll_us * 1e-6,
                )
            except BaseException:
                self._rings.discard(ring)  # a late WRITE must not land in a reused ring
                raise
            self._rings.release(ring)
            if error is None:
                pending.complete()
                send_frame(sock, Frame(FrameKind.ACK))
            else:
                send_error(sock, error)
        except (KVTransferError, OSError, RuntimeError) as exc:  # NIXL's own arrive as KVTransferError
            if not isinstance(exc, KVTransferError | OSError):
                exc = KVTransferError(f"nixl receiver: {exc!r}")  # e.g. a torch error: the sender hears of it at once
            if pending is None:
                send_error(sock, exc)
                return
            rid = pending.descriptor.request_id
            send_error(sock, pending.fail(with_context(exc, rid, f"after {pending.layers_received()} layers")))


class NixlWire:
    """Sending half: stage each layer, WRITE it into a free slot of the receiver's ring, announce it."""

    def __init__(self, descriptor: TransferDescriptor, options: SenderOptions, connector: NixlConnector) -> None:
        self._desc = descriptor
        self._options = options
        self._connector = connector
        self._tag = request_tag(descriptor.request_id)
        self._scratch = bytearray(HEADER_NBYTES)
        self._stager = HostStager()
        self._staging: torch.Tensor | None = None
        self._closed = False
        self._sock = connect(descriptor.address, options.timeout_s, 1 << 16)
        try:
            send_hello(self._sock, descriptor)
            frame = recv_frame(self._sock, self._scratch, "the RING reply")
            raise_if_error(self._sock, frame, descriptor.request_id)
            if frame.kind != FrameKind.RING:
                raise KVTransferError(f"expected RING, got {frame.kind.name}")
            info = json.loads(recv_control_payload(self._sock, frame))
            self._peer = connector.agent.load_peer(info)
            self._ring_addr, self._slot_nbytes = int(info["addr"]), int(info["slot_nbytes"])
            self._free_slots: deque[int] = deque(range(int(info["num_slots"])))
            self._staging = connector.staging.acquire(descriptor.layer_nbytes)
        except (KeyError, TypeError, ValueError) as exc:  # json's errors are ValueErrors
            self.close()
            raise KVTransferError(f"request {descriptor.request_id!r}: malformed RING: {exc!r}") from None
        except BaseException:
            self.close()
            raise

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
        assert self._staging is not None
        # plain stores: the WRITE reads the staging right back, from cache
        checksum = copy_and_checksum(self._staging.numpy(), (k_bytes, v_bytes), corrupt, nontemporal=False)
        try:
            self._connector.agent.write(
                self._staging.data_ptr(), nbytes, self._peer, self._ring_addr + slot * self._slot_nbytes,
                self._options.timeout_s,
            )
        except KVPeerError as exc:  # the receiver dropped its ring: it may have said why on the socket
            raise explained(self._sock, self._scratch, self._desc.request_id,
                            with_context(exc, self._desc.request_id, f"layer {layer_idx}")) from None
        except KVTransferError as exc:  # NIXL's message names the peer agent only
            raise with_context(exc, self._desc.request_id, f"layer {layer_idx}") from None
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
        if self._staging is not None:
            self._connector.staging.release(self._staging)


class NixlConnector:
    """Sending side: one NIXL agent per process and its registered staging buffers."""

    def __init__(self) -> None:
        self.agent = NixlAgent("send", progress=False)
        self.staging = _Buffers(self.agent)

    def open(self, descriptor: TransferDescriptor, options: SenderOptions) -> PipelinedSender:
        """Connect to the receiver and return a pipelined sender."""
        return PipelinedSender(descriptor, NixlWire(descriptor, options, self), options)

    def close(self) -> None:
        """Deregister the staging buffers."""
        self.staging.close()
        self.agent.close()
