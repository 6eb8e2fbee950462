"""The tcp transport: layer frames over pooled connections, read into reused staging buffers.

Per request: the sender takes a pooled connection (or connects) and sends
HELLO (the descriptor), then one LAYER frame per layer (header, K||V
straight from the tensors' memory, and an 8-byte xxh3 trailer), then END.
The checksum trails the payload so both sides hash each 256 KiB chunk
right beside its socket copy, while it is in cache: the hash adds one pass
over L2, not one over memory. The receiver reads each payload with
``recv_into`` into a staging buffer and hands it, with its checksum, to the
connection's ``LayerVerifier``, which compares and calls the engine's
callback while the next layer is being read; after END it answers ACK or
ERROR. After
a bad layer the receiver keeps draining the stream so the sender reads the
verdict instead of a reset connection. A connection that ended in ACK is
kept by the sender for the next request to the same receiver; any failure
closes it on both sides.
"""

from __future__ import annotations

import socket
import threading

import torch
import xxhash

from workers.kv.checksum import request_tag
from workers.kv.descriptor import TransferDescriptor, TransportKind
from workers.kv.errors import KVTransferError
from workers.kv.framing import (
    HEADER_NBYTES,
    TRAILER,
    Frame,
    FrameKind,
    await_verdict,
    connect,
    hard_close,
    next_layer_frame,
    pack_header,
    raise_if_error,
    recv_control_payload,
    recv_frame,
    recv_into,
    send_all,
    send_error,
    send_frame,
    with_context,
)
from workers.kv.interface import EndpointOptions, SenderOptions
from workers.kv.pipeline import (
    HostStager,
    PendingTable,
    PendingTransfer,
    PipelinedSender,
    StagingPool,
    corrupted,
)
from workers.kv.receiving import LayerVerifier, ReceivingSide, SideEndpoint


def read_hello(sock: socket.socket, scratch: bytearray, table: PendingTable) -> PendingTransfer:
    """Receiver side: read the HELLO frame and claim the transfer it names."""
    hello = recv_frame(sock, scratch, "HELLO")
    if hello.kind != FrameKind.HELLO:
        raise KVTransferError(f"expected HELLO, got {hello.kind.name}")
    try:
        descriptor = TransferDescriptor.from_json(recv_control_payload(sock, hello))
    except ValueError as exc:
        raise KVTransferError(str(exc)) from None
    return table.claim(descriptor)


def send_hello(sock: socket.socket, descriptor: TransferDescriptor) -> None:
    """Sender side: name the transfer."""
    payload = descriptor.to_json().encode()
    send_frame(sock, Frame(FrameKind.HELLO, nbytes=len(payload)), [payload])


CHUNK_NBYTES = 256 << 10  # hash granularity: fits in L2 beside the socket copy of the same bytes


def wait_for_next_request(sock: socket.socket) -> bool:
    """Block until the sender starts another request on a reused connection; False once it closed it."""
    sock.settimeout(None)  # an idle pooled connection may wait indefinitely; closing the endpoint wakes it
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except OSError:
        return False


class TcpEndpoint(SideEndpoint):
    """Receiving endpoint: a listening socket; each sender connection is served by its own thread."""

    kind = TransportKind.TCP

    def __init__(self, options: EndpointOptions | None = None) -> None:
        self._options = options or EndpointOptions()
        self._staging = StagingPool(self._options.staging_nbytes)
        self._staging.release(self._staging.acquire(self._options.staging_nbytes))  # touch one buffer up front
        self._side = ReceivingSide(self.kind, self._options, self._serve, self._options.socket_buffer_nbytes)
        self.address = self._side.address

    def close(self) -> None:
        """Stop accepting; pending transfers fail."""
        self._side.close()
        self._staging.clear()

    def _serve(self, sock: socket.socket) -> None:
        scratch = bytearray(HEADER_NBYTES)
        verifier = LayerVerifier(self._staging, name=f"kv-tcp-verify-{self.address}")
        try:
            while wait_for_next_request(sock) and self._serve_request(sock, scratch, verifier):
                pass
        finally:
            verifier.drain()
            verifier.close()

    def _serve_request(self, sock: socket.socket, scratch: bytearray, verifier: LayerVerifier) -> bool:
        """Serve one request; True if it ended with ACK and the connection may carry another."""
        sock.settimeout(self._options.stall_timeout_s)
        pending: PendingTransfer | None = None
        try:
            pending = read_hello(sock, scratch, self._side.table)
            error = self._receive_layers(sock, scratch, pending, verifier)
            if error is None:
                pending.complete()
                send_frame(sock, Frame(FrameKind.ACK))
                return True
            send_error(sock, error)
        except (KVTransferError, OSError) as exc:
            if pending is not None:
                verifier.drain()  # layers already read are settled before the transfer is failed
                rid = pending.descriptor.request_id
                exc = pending.fail(with_context(exc, rid, f"after {pending.layers_received()} layers"))
            send_error(sock, exc)
        return False

    def _receive_layers(
        self, sock: socket.socket, scratch: bytearray, pending: PendingTransfer, verifier: LayerVerifier
    ) -> KVTransferError | None:
        """Read frames until END; return the first delivery error (the stream is drained regardless)."""
        desc = pending.descriptor
        tag = request_tag(desc.request_id)
        trailer = bytearray(TRAILER.size)
        trailer_view = memoryview(trailer)
        while True:
            frame = next_layer_frame(sock, scratch, tag, desc.layer_nbytes)
            if frame is None:
                return verifier.drain()
            what = f"layer {frame.layer_idx}"
            buffer = verifier.take(frame.nbytes, self._options.stall_timeout_s)
            view = buffer.numpy().data
            state = xxhash.xxh3_64()
            try:
                for start in range(0, frame.nbytes, CHUNK_NBYTES):
                    chunk = view[start : min(frame.nbytes, start + CHUNK_NBYTES)]
                    recv_into(sock, chunk, what)
                    state.update(chunk)  # hashed while still in cache
                recv_into(sock, trailer_view, f"the checksum of {what}")
            except BaseException:
                verifier.give_back(buffer)
                raise
            expected = TRAILER.unpack(trailer)[0]
            verifier.submit(pending, frame.layer_idx, buffer, frame.nbytes, expected, int(state.intdigest()))


class PooledWire:
    """A sending request's control connection: END, the receiver's verdict, then back to a pool.

    A connection that ended in ACK is at a clean frame boundary and carries the next request
    to the same receiver; any other is closed, since its stream position is unknown.
    """

    def __init__(self, descriptor: TransferDescriptor, sock: socket.socket, pool: ConnectionPool) -> None:
        self._desc = descriptor
        self._sock = sock
        self._pool = pool
        self._tag = request_tag(descriptor.request_id)
        self._stager = HostStager()
        self._scratch = bytearray(HEADER_NBYTES)
        self._done = False
        self._closed = False

    def finish(self) -> None:
        """Send END and wait for the receiver's verdict."""
        send_frame(self._sock, Frame(FrameKind.END, tag=self._tag))
        await_verdict(self._sock, self._desc.request_id, self._scratch)
        self._done = True

    def close(self) -> None:
        """Return a cleanly finished connection to the pool; close any other (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._done:
            self._pool.release(self._desc.address, self._sock)
        else:
            hard_close(self._sock)


class TcpWire(PooledWire):
    """Sending half: one connection, frames written with ``sendall`` straight from the tensors."""

    def __init__(self, descriptor: TransferDescriptor, sock: socket.socket, pool: ConnectionPool) -> None:
        super().__init__(descriptor, sock, pool)
        send_hello(self._sock, descriptor)

    def send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        """Send one LAYER frame: header, K and V from the tensors' memory, then the checksum."""
        k_bytes, v_bytes = self._stager.parts(k, v)
        header = pack_header(Frame(FrameKind.LAYER, layer_idx, 0, len(k_bytes) + len(v_bytes), 0, self._tag))
        state = xxhash.xxh3_64()
        try:
            send_all(self._sock, header, more=True)  # coalesced with the first chunk
            for part in (k_bytes, v_bytes):
                for start in range(0, len(part), CHUNK_NBYTES):
                    chunk = part[start : start + CHUNK_NBYTES]
                    state.update(chunk)  # brings the chunk into cache, so the socket copy reads it from there
                    if corrupt:
                        chunk, corrupt = corrupted(chunk), False
                    send_all(self._sock, chunk, more=True)
            send_all(self._sock, TRAILER.pack(state.intdigest()))
        except KVTransferError as exc:
            self._raise_receiver_error()
            raise with_context(exc, self._desc.request_id, f"layer {layer_idx}") from None


    def _raise_receiver_error(self) -> None:
        """After a failed send, surface the ERROR the receiver may have sent before closing."""
        try:
            self._sock.settimeout(1.0)
            frame = recv_frame(self._sock, self._scratch)
        except (KVTransferError, OSError):
            return
        raise_if_error(self._sock, frame, self._desc.request_id)


class ConnectionPool:
    """Connections that ended a request cleanly, kept per receiver address for the next request."""

    def __init__(self, max_idle_per_address: int = 4) -> None:
        self._max_idle = max_idle_per_address
        self._lock = threading.Lock()
        self._idle: dict[str, list[socket.socket]] = {}

    def take(self, address: str) -> socket.socket | None:
        """A live idle connection to ``address``, or None."""
        while True:
            with self._lock:
                idle = self._idle.get(address)
                if not idle:
                    return None
                sock = idle.pop()
            sock.setblocking(False)  # with a timeout set, recv would first wait for data
            try:
                alive = sock.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive = True  # nothing to read: the receiver is still there, waiting
            except OSError:
                alive = False
            if alive:
                return sock
            sock.close()

    def release(self, address: str, sock: socket.socket) -> None:
        """Keep a cleanly finished connection for the next request to the same receiver."""
        with self._lock:
            idle = self._idle.setdefault(address, [])
            if len(idle) < self._max_idle:
                idle.append(sock)
                return
        sock.close()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for socks in idle.values():
            for sock in socks:
                sock.close()


class TcpConnector:
    """Sending side of the tcp transport: keeps finished connections per receiver for reuse."""

    def __init__(self, max_idle_per_address: int = 4) -> None:
        self._pool = ConnectionPool(max_idle_per_address)

    def open(self, descriptor: TransferDescriptor, options: SenderOptions) -> PipelinedSender:
        """Reuse or open a connection to the receiver and return a pipelined sender."""
        sock = self._pool.take(descriptor.address)
        if sock is None:
            sock = connect(descriptor.address, options.timeout_s, options.socket_buffer_nbytes)
        sock.settimeout(options.timeout_s)
        try:
            wire = TcpWire(descriptor, sock, self._pool)
        except BaseException:
            sock.close()
            raise
        return PipelinedSender(descriptor, wire, options)

    def close(self) -> None:
        """Close every idle connection."""
        self._pool.close()
