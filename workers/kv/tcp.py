"""The tcp transport: layer frames over pooled connections, read into a reused staging buffer.

Per request: the sender takes a pooled connection (or connects) and sends
HELLO (the descriptor), then one LAYER frame per layer (header, K||V
straight from the tensors' memory, and an 8-byte checksum trailer), then
END. The checksum (workers.kv.checksum) trails the payload: the sender
sends the payload a checksum block (512 KiB) at a time and hashes each
block right after its ``sendmsg``, while the socket copy has left it in
cache; the trailer rides on the next frame's ``sendmsg`` (the byte stream
is the same), or goes alone when nothing else is queued (``flush``); the
last one goes with END, which the sending thread sends as soon as the last
layer is out (``end``), not the caller's thread once it wakes in ``finish``.
Hashing on a helper thread beside the send instead lost on two cores,
where the receiver needs the other one (``TcpWire._send_hashing``). With
the C kernel (workers.kv.native) the loop of sends and hashes runs in one
call that holds no GIL, over every layer queued when the sending thread
looks (``send_layers``; a layer's trailer rides in front of the next one's
header there too): 1-4% faster per transfer for one layer a call, a
further 5-11% at 16 MB when layers queue up (as the whole prompt's do
without layer-wise overlap), and no interpreter between blocks for a
prefill thread to contend with. New
connections get the congestion control ``SenderOptions.tcp_congestion``
names (workers.kv.congestion: reno between processes of one host, where
BBR's pacing cost a 16 MB transfer 1.4-1.6x its time).

The receiver reads each payload block by block into the connection's
staging buffer (the last block and the trailer with one ``recvmsg_into``)
and hashes each block right after its socket copy, while it is in cache.
Between reads it polls the socket for ``EndpointOptions.poll_us`` before
it sleeps (``recv_polling``): a sender whose bytes find the receiver asleep
pays for waking it. It compares the checksums and calls the engine's
callback on the connection thread, then reads the next layer: while the
callback runs, the kernel's socket buffer (``socket_buffer_nbytes``) keeps
taking the sender's bytes, so no second thread (and no per-layer hand-off
between two threads, which cost more than the callback on a loaded
two-core host) is needed. After END
the receiver answers ACK or ERROR. After a bad layer it keeps draining the
stream so the sender reads the verdict instead of a reset connection. A
connection that ended in ACK is kept by the sender for the next request to
the same receiver; any failure closes it on both sides.
"""

from __future__ import annotations

import socket
import threading
from typing import NoReturn

import torch

from workers.kv.checksum import (
    BLOCK_NBYTES,
    SEND_KERNEL,
    ChunkedChecksum,
    block_groups,
    block_views,
    checksum_parts,
    hash_block,
    request_tag,
)
from workers.kv.congestion import apply_congestion_control
from workers.kv.descriptor import TransferDescriptor, TransportKind
from workers.kv.errors import KVPeerError, KVTransferError
from workers.kv.framing import (
    HEADER_NBYTES,
    TRAILER,
    Frame,
    FrameKind,
    await_verdict,
    connect,
    connection_alive,
    hard_close,
    next_layer_frame,
    pack_header,
    private_fd,
    raise_if_error,
    recv_control_payload,
    recv_frame,
    recv_polling,
    send_error,
    send_failure,
    send_frame,
    send_vectored,
    set_stall_timeout,
    with_context,
)
from workers.kv.interface import EndpointOptions, SenderOptions
from workers.kv.pipeline import (
    HostStager,
    MemoryPiece,
    PendingTable,
    PendingTransfer,
    StagingPool,
    corrupted,
    kernel_layer_parts,
)
from workers.kv.receiving import ReceivingSide, SideEndpoint
from workers.kv.sending import PipelinedSender


def read_hello(sock: socket.socket, scratch: bytearray, table: PendingTable) -> PendingTransfer:
    """Receiver side: read the HELLO frame and claim the transfer it names."""
    hello = recv_frame(sock, scratch, "HELLO")
    if hello.kind != FrameKind.HELLO:
        raise KVPeerError(f"expected HELLO, got {hello.kind.name}")
    try:
        descriptor = TransferDescriptor.from_json(recv_control_payload(sock, hello))
    except ValueError as exc:
        raise KVPeerError(str(exc)) from None
    return table.claim(descriptor)


def send_hello(sock: socket.socket, descriptor: TransferDescriptor) -> None:
    """Sender side: name the transfer."""
    payload = descriptor.to_json().encode()
    send_frame(sock, Frame(FrameKind.HELLO, nbytes=len(payload)), [payload])


def wait_for_next_request(sock: socket.socket) -> bool:
    """Block until the sender starts another request on a reused connection; False once it closed it."""
    set_stall_timeout(sock, None)  # an idle pooled connection may wait indefinitely; closing the endpoint wakes it
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
        staging = ConnectionStaging(self._staging)
        try:
            while wait_for_next_request(sock) and self._serve_request(sock, scratch, staging):
                pass
        finally:
            staging.close()

    def _serve_request(self, sock: socket.socket, scratch: bytearray, staging: ConnectionStaging) -> bool:
        """Serve one request; True if it ended with ACK and the connection may carry another."""
        set_stall_timeout(sock, self._options.stall_timeout_s)
        pending: PendingTransfer | None = None
        try:
            pending = read_hello(sock, scratch, self._side.table)
            error = self._receive_layers(sock, scratch, pending, staging)
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

    def _receive_layers(
        self, sock: socket.socket, scratch: bytearray, pending: PendingTransfer, staging: ConnectionStaging
    ) -> KVTransferError | None:
        """Read frames until END; return the first delivery error (the stream is drained regardless)."""
        desc = pending.descriptor
        tag = request_tag(desc.request_id)
        trailer = bytearray(TRAILER.size)
        trailer_view = memoryview(trailer)
        error: KVTransferError | None = None
        poll_s = self._options.poll_us * 1e-6
        while True:
            frame = next_layer_frame(sock, scratch, tag, desc.layer_nbytes, poll_s=poll_s)
            if frame is None:
                return error
            what = f"layer {frame.layer_idx}"
            payload, blocks = staging.blocks(frame.nbytes)
            checksum = ChunkedChecksum()
            for block in blocks[:-1]:
                recv_polling(sock, (block,), what, poll_s)
                checksum.update(block)  # hashed while still in cache
            recv_polling(sock, (*blocks[-1:], trailer_view), what, poll_s)  # the last block and the checksum: one call
            for block in blocks[-1:]:
                checksum.update(block)
            if error is None:
                try:
                    expected = TRAILER.unpack(trailer)[0]
                    pending.deliver(frame.layer_idx, payload, expected, checksum.digest())
                except KVTransferError as exc:
                    error = exc


class ConnectionStaging:
    """The one staging buffer a receiving connection reads every layer into (grown for larger layers)."""

    def __init__(self, pool: StagingPool) -> None:
        self._pool = pool
        self._buffer: torch.Tensor | None = None
        self._layer: tuple[int, torch.Tensor | None, list[memoryview]] = (0, None, [])  # the last layer size's cut

    def blocks(self, nbytes: int) -> tuple[torch.Tensor, list[memoryview]]:
        """The first ``nbytes`` of the buffer, as a tensor and cut at the checksum's block grid."""
        if self._buffer is None or self._buffer.numel() < nbytes:
            if self._buffer is not None:
                self._pool.release(self._buffer)
            self._buffer = self._pool.acquire(nbytes)
            self._layer = (0, None, [])
        size, payload, blocks = self._layer
        if payload is None or size != nbytes:  # cut once per layer size, not per layer (~5 us of views)
            payload = self._buffer[:nbytes]
            blocks = list(block_views((self._buffer.numpy().data[:nbytes],)))
            self._layer = (nbytes, payload, blocks)
        return payload, blocks

    def close(self) -> None:
        """Return the buffer to the endpoint's pool."""
        if self._buffer is not None:
            self._pool.release(self._buffer)
            self._buffer = None
            self._layer = (0, None, [])


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
        self._ended = False
        self._done = False
        self._closed = False

    def send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        """Put one layer on the wire: through the kernel's loop where it can take it, else the Python path."""
        if corrupt or not self._through_kernel([(layer_idx, k, v)]):
            self._through_python(layer_idx, k, v, corrupt)

    def send_layers(self, layers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Put several queued layers on the wire, through the kernel's loop where it can take them."""
        if not self._through_kernel(layers):
            for layer_idx, k, v in layers:
                self._through_python(layer_idx, k, v, False)

    def _through_kernel(self, layers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> bool:
        """Move host-memory layers with the C kernel's loop; False (nothing moved) where it cannot."""
        raise NotImplementedError

    def _through_python(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        """Move one layer without the kernel's loop."""
        raise NotImplementedError

    def end(self) -> None:
        """Send END (every layer is on the wire)."""
        send_frame(self._sock, Frame(FrameKind.END, tag=self._tag))
        self._ended = True

    def finish(self) -> None:
        """Send END unless ``end`` did, and wait for the receiver's verdict."""
        if not self._ended:
            self.end()
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
    """Sending half: one connection, frames written with ``sendmsg`` straight from the tensors."""

    def __init__(self, descriptor: TransferDescriptor, sock: socket.socket, pool: ConnectionPool) -> None:
        super().__init__(descriptor, sock, pool)
        self._owed = b""  # the last layer's trailer, held back to ride on the next frame's sendmsg
        send_hello(self._sock, descriptor)

    def _through_python(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        """One LAYER frame without the kernel's loop (CUDA layers, staged; fault injection; no kernel).

        Header, K and V from the tensors' memory; the checksum trails it.
        """
        k_bytes, v_bytes = self._stager.parts(k, v)
        header = pack_header(Frame(FrameKind.LAYER, layer_idx, 0, len(k_bytes) + len(v_bytes), 0, self._tag))
        head, self._owed = (self._owed, header), b""
        what = f"layer {layer_idx}"
        if corrupt:  # fault injection: damaged bytes go out under the checksum of the true ones
            self._send((*head, corrupted(k_bytes), v_bytes), what)
            digest = checksum_parts((k_bytes, v_bytes))
        else:
            digest = self._send_hashing(head, (k_bytes, v_bytes), what)
        self._owed = TRAILER.pack(digest)

    def _through_kernel(self, layers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> bool:
        """Send host-memory layers through the C kernel's loop (``SEND_KERNEL``); False where it cannot.

        No interpreter runs between blocks or between the layers of one call: in Python that cost
        ~10 us a block and ~15 us a layer here. Each block is still hashed right after its send.
        """
        if SEND_KERNEL is None or self._sock.gettimeout() is not None:  # the loop needs a blocking fd
            return False
        taken = kernel_layer_parts(layers)
        if taken is None:
            return False
        parts, nbytes = taken
        frames: list[tuple[tuple[bytes, ...], tuple[MemoryPiece, MemoryPiece]]] = [
            ((pack_header(Frame(FrameKind.LAYER, layer_idx, 0, nbytes, 0, self._tag)),), layer_parts)
            for (layer_idx, _, _), layer_parts in zip(layers, parts, strict=True)
        ]
        frames[0] = ((self._owed, *frames[0][0]), frames[0][1])
        try:
            with private_fd(self._sock) as fd:
                digests = SEND_KERNEL(fd, frames, BLOCK_NBYTES)
        except OSError as exc:
            what = f"layer {layers[0][0]}" if len(layers) == 1 else f"layers {[i for i, _, _ in layers]}"
            self._fail_send(send_failure(self._sock, exc), what)
        self._owed = TRAILER.pack(digests[-1])
        return True

    def _send_hashing(self, head: tuple[bytes, ...], parts: tuple[memoryview, ...], what: str) -> int:
        """Send ``head`` then ``parts`` a checksum block at a time, hashing each block right after its send.

        The block is then still in this core's cache (the socket copy just read it): a 2 MiB layer
        sent whole and then hashed had left cache. Pinned, 64 MB took 1.21x as long sent whole
        (256 MB 1.11x), and 1.18-1.21x with a helper thread hashing each layer beside the send on
        two unpinned cores, where the receiver needs the other core. The C kernel's loop
        (``_through_kernel``) does the same without the interpreter.
        """
        value = 0
        for pieces in block_groups(parts):
            self._send((*head, *pieces), what)
            head = ()
            value = hash_block(pieces, value)
        return value

    def flush(self) -> None:
        """Send a trailer still held back (the sender has no next frame to carry it yet)."""
        if self._owed:
            owed, self._owed = self._owed, b""
            self._send((owed,), "a layer's checksum")

    def end(self) -> None:
        """Send the last trailer and END with one write (every layer is on the wire)."""
        owed, self._owed = self._owed, b""
        self._send((owed, pack_header(Frame(FrameKind.END, tag=self._tag))), "the end mark")
        self._ended = True

    def _send(self, parts: tuple[memoryview | bytes, ...], what: str) -> None:
        """``send_vectored``; on failure, the receiver's own ERROR if it sent one, else the send's error."""
        try:
            send_vectored(self._sock, parts)
        except KVTransferError as exc:
            self._fail_send(exc, what)

    def _fail_send(self, exc: KVTransferError, what: str) -> NoReturn:
        """Raise the receiver's own ERROR if it sent one before the send failed, else ``exc`` in context."""
        self._raise_receiver_error()
        raise with_context(exc, self._desc.request_id, what) from None

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
            if connection_alive(sock):
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


def _connect(descriptor: TransferDescriptor, options: SenderOptions) -> socket.socket:
    """A new data connection to the descriptor's receiver, with the congestion control ``options`` ask for."""
    sock = connect(descriptor.address, options.timeout_s, options.socket_buffer_nbytes)
    try:
        apply_congestion_control(sock, options.tcp_congestion, descriptor.host_id)
    except BaseException:
        sock.close()
        raise
    return sock


class TcpConnector:
    """Sending side of the tcp transport: keeps finished connections per receiver for reuse."""

    def __init__(self, max_idle_per_address: int = 4) -> None:
        self._pool = ConnectionPool(max_idle_per_address)

    def open(self, descriptor: TransferDescriptor, options: SenderOptions) -> PipelinedSender:
        """Reuse or open a connection to the receiver and return a pipelined sender."""
        sock = self._pool.take(descriptor.address) or _connect(descriptor, options)
        try:
            set_stall_timeout(sock, options.timeout_s)
            wire = TcpWire(descriptor, sock, self._pool)
        except BaseException:
            sock.close()
            raise
        return PipelinedSender(descriptor, wire, options)

    def close(self) -> None:
        """Close every idle connection."""
        self._pool.close()
