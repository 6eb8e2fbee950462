"""Length-prefixed frames over a stream socket, shared by the tcp, shm and torch_dist transports.

Every frame starts with a fixed 40-byte header: magic, kind, layer index,
slot, payload length, checksum, and a 64-bit tag of the request id. Layer
payloads are read straight into a reused staging buffer with ``recv_into``
(``recv_vectored``/``send_vectored`` move several buffers in one call).
Sockets carry a timeout, so a silent peer raises KVTransferTimeout and a
vanished one KVTransferError; nothing blocks forever. Bulk paths use
``set_stall_timeout``: a blocking socket whose timeout the kernel enforces
(SO_RCVTIMEO / SO_SNDTIMEO), so each read or write is one system call
instead of a poll plus a call per piece that happens to be ready.
"""

from __future__ import annotations

import contextlib
import enum
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from workers.kv.errors import (
    KVChecksumError,
    KVPeerError,
    KVPeerTimeout,
    KVRejected,
    KVTransferError,
    KVTransferTimeout,
)

# The wire's version is the magic's last byte: a header from another pdserve release names its version
# in the error instead of reading as garbage. Bump it whenever a frame or payload changes meaning.
WIRE_VERSION = 2
_MAGIC_PREFIX = b"PDK"
_UNVERSIONED_MAGIC = b"PDKV"  # releases before the version byte; they count as version 1
MAGIC = _MAGIC_PREFIX + bytes([WIRE_VERSION])
_HEADER = struct.Struct("<4sB3xIIQQQ")
HEADER_NBYTES = _HEADER.size
HEADER_CHECKSUM_OFFSET = struct.calcsize("<4sB3xIIQ")  # where the checksum field starts in a packed header
MAX_CONTROL_PAYLOAD_NBYTES = 1 << 20
TRAILER = struct.Struct("<Q")  # a layer's checksum, sent after its payload so the sender hashes while sending
RUN_ENTRY = struct.Struct("<IQ")  # (layer index, checksum) of each layer of a LAYERS frame, in payload order


class FrameKind(enum.IntEnum):
    """What a frame means."""

    HELLO = 1  # sender -> receiver: payload is the descriptor as JSON
    LAYER = 2  # sender -> receiver: one layer (payload K||V, or a shm slot index)
    END = 3  # sender -> receiver: every layer was sent
    ACK = 4  # receiver -> sender: every layer verified
    ERROR = 5  # receiver -> sender: layer_idx = ErrorCode, payload = message
    RING = 6  # receiver -> sender (shm): payload is the ring's JSON description
    FREE = 7  # receiver -> sender (shm): slot may be reused
    PAIR = 8  # sender -> receiver (torch_dist): payload is the pair id; reply carries the store port
    # sender -> receiver (torch_dist): a run of layers moved as one message; layer_idx = how many,
    # nbytes = their K||V bytes, payload = one RUN_ENTRY per layer
    LAYERS = 9


_LAYER = int(FrameKind.LAYER)


class ErrorCode(enum.IntEnum):
    """Why a receiver rejected a transfer."""

    TRANSFER = 1  # the receiver refused it or failed itself (no reservation, a failed callback, closing)
    CHECKSUM = 2
    SENDER = 3  # the receiver gave up on the sender: silent past its stall timeout, late, or off-protocol


def verdict_code(error: BaseException) -> ErrorCode:
    """What a receiver's ``error`` tells its sender about whose fault it was."""
    if isinstance(error, KVChecksumError):
        return ErrorCode.CHECKSUM
    if isinstance(error, KVPeerError | KVTransferTimeout):  # raised about the sender, or waiting for it
        return ErrorCode.SENDER
    return ErrorCode.TRANSFER


def verdict_error(code: int, request_id: str, layer_idx: int, message: str) -> KVTransferError:
    """The error a sender raises for a receiver's verdict: a refusal is the receiver's (a peer error)."""
    if code == ErrorCode.CHECKSUM:
        return KVChecksumError(request_id, layer_idx, f"reported by receiver: {message}")
    if code == ErrorCode.SENDER:  # not a peer error: the receiver is fine, it is this side it gave up on
        return KVTransferError(f"receiver gave up on request {request_id!r}: {message}")
    return KVRejected(f"receiver rejected request {request_id!r}: {message}")


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded header."""

    kind: FrameKind
    layer_idx: int = 0
    slot: int = 0
    nbytes: int = 0
    checksum: int = 0
    tag: int = 0


def pack_header(frame: Frame) -> bytes:
    """Encode a header."""
    return _HEADER.pack(MAGIC, frame.kind, frame.layer_idx, frame.slot, frame.nbytes, frame.checksum, frame.tag)


def connection_alive(sock: socket.socket) -> bool:
    """Whether an idle connection's peer is still there: no end of stream or error waiting on it (never blocks)."""
    timeout = sock.gettimeout()
    sock.setblocking(False)  # with a timeout set, recv would first wait for data
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read: the peer is there, waiting
    except OSError:
        return False
    finally:
        sock.settimeout(timeout)


def tune_socket(sock: socket.socket, buffer_nbytes: int) -> None:
    """No Nagle delay, large kernel buffers."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_nbytes)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_nbytes)


def listen(host: str, port: int, buffer_nbytes: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one); buffers set before accept so they are inherited."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_nbytes)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def split_address(address: str) -> tuple[str, int]:
    """"host:port" -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise KVTransferError(f"bad transport address {address!r}; expected host:port")
    return host, int(port)


def connect(address: str, timeout_s: float, buffer_nbytes: int) -> socket.socket:
    """Connect with a deadline; the socket keeps ``timeout_s`` as its per-operation timeout."""
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout_s)
    except TimeoutError:
        raise KVPeerTimeout(f"connect to {address} timed out after {timeout_s}s") from None
    except OSError as exc:
        raise KVPeerError(f"cannot connect to {address}: {exc}") from None
    tune_socket(sock, buffer_nbytes)
    sock.settimeout(timeout_s)
    return sock


_TIMEVAL = struct.Struct("@ll")


def set_stall_timeout(sock: socket.socket, timeout_s: float | None) -> None:
    """Blocking mode, each send or receive failing after ``timeout_s`` without progress (None: never)."""
    sock.settimeout(None)
    seconds = timeout_s or 0.0  # a zero timeval means no timeout
    timeval = _TIMEVAL.pack(int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _stall_timeout(sock: socket.socket) -> float:
    """The socket's timeout, whichever way it was set (for messages)."""
    if sock.gettimeout() is not None:
        return float(sock.gettimeout() or 0.0)
    seconds, micros = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size))
    return seconds + micros / 1e6


def send_frame(sock: socket.socket, frame: Frame, parts: Sequence[memoryview | bytes] = ()) -> None:
    """Send a header and its payload parts."""
    send_all(sock, pack_header(frame), *parts)


def send_all(sock: socket.socket, *parts: memoryview | bytes) -> None:
    """Send buffers in order; KVTransferTimeout on a stall, KVTransferError on a lost connection."""
    send_vectored(sock, parts)


def send_vectored(sock: socket.socket, parts: Sequence[memoryview | bytes]) -> None:
    """Send ``parts`` in order, usually with one system call (``sendmsg``), as ``send_all``.

    Never with MSG_MORE: on loopback a 512 KiB frame sent with it and its 8-byte trailer sent after
    took 1.6x the sender's CPU of the same two calls without it (4.4 vs 2.75 ms per 16 MB).
    """
    try:
        sent = sock.sendmsg(parts)
        for part in parts:  # a short write (the peer's window filled): finish piece by piece
            size = len(part)
            if sent >= size:
                sent -= size
                continue
            sock.sendall(memoryview(part)[sent:])
            sent = 0
    except OSError as exc:
        raise send_failure(sock, exc) from None


def send_failure(sock: socket.socket, exc: OSError) -> KVTransferError:
    """The transfer error a failed send on ``sock`` means: a stalled peer (timeout) or a lost connection."""
    if isinstance(exc, (TimeoutError, BlockingIOError)):  # BlockingIOError: SO_SNDTIMEO expired
        return KVPeerTimeout(f"peer stopped reading (send stalled for {_stall_timeout(sock)}s)")
    return KVPeerError(f"connection lost while sending: {exc}")


def recv_vectored(sock: socket.socket, views: Sequence[memoryview], what: str) -> None:
    """Fill ``views`` in order, usually with one system call (``recvmsg_into``), as ``recv_into``."""
    try:
        got = sock.recvmsg_into(views, 0, socket.MSG_WAITALL)[0]
    except (TimeoutError, BlockingIOError):
        raise KVPeerTimeout(f"peer silent for {_stall_timeout(sock)}s while reading {what}") from None
    except OSError as exc:
        raise KVPeerError(f"connection lost while reading {what}: {exc}") from None
    if got == 0 and any(len(v) for v in views):
        raise KVPeerError(f"peer closed the connection while reading {what}")
    for view in views:  # a short read (a signal, a timeout after partial progress): fill the rest
        size = len(view)
        if got >= size:
            got -= size
            continue
        recv_into(sock, view[got:], what)
        got = 0


def recv_into(sock: socket.socket, view: memoryview, what: str) -> None:
    """Fill ``view`` exactly; KVTransferTimeout on a stall, KVTransferError on a closed connection."""
    got, total = 0, len(view)
    while got < total:
        try:
            n = sock.recv_into(view[got:], total - got, socket.MSG_WAITALL)  # one call, on a blocking socket
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO expired
            raise KVPeerTimeout(f"peer silent for {_stall_timeout(sock)}s while reading {what}") from None
        except OSError as exc:
            raise KVPeerError(f"connection lost while reading {what}: {exc}") from None
        if n == 0:
            raise KVPeerError(f"peer closed the connection while reading {what} ({got}/{total} bytes)")
        got += n


def recv_polling(sock: socket.socket, views: Sequence[memoryview], what: str, poll_s: float) -> None:
    """Fill ``views`` in order as ``recv_vectored``, first polling without sleeping until ``poll_s`` passes idle.

    A receiver asleep in ``recv`` costs a wake-up per frame: on a two-core VM, 40-byte frames cost
    the sender ~13 us each and a round trip ~65 us, against ~3 us and ~19 us with the receiver
    polling; a tcp sender's time with interrupts off (waking the receiver, mostly) fell from 1.3
    to 0.6 ms of a 16 MB transfer with the receiver polling. The poll restarts whenever bytes arrive, so a payload that keeps
    streaming in is read without sleeping. Each empty poll yields the CPU (``sched_yield``):
    without it, a poller sharing a core with the sender's threads slowed shm transfers by up to
    a third. ``poll_s`` <= 0 reads blocking at once, as does a socket with a Python timeout (on
    which CPython waits for data before each ``MSG_DONTWAIT`` read): polling needs
    ``set_stall_timeout``.
    """
    pending = [view for view in views if len(view)]
    if (poll_s <= 0 or sock.gettimeout() is not None) and pending:
        recv_vectored(sock, pending, what)
        return
    deadline = time.perf_counter() + poll_s
    while pending:
        try:
            if len(pending) == 1:
                n = sock.recv_into(pending[0], len(pending[0]), socket.MSG_DONTWAIT)
            else:
                n = sock.recvmsg_into(pending, 0, socket.MSG_DONTWAIT)[0]
        except BlockingIOError:
            if time.perf_counter() >= deadline:
                recv_vectored(sock, pending, what)
                return
            os.sched_yield()  # a thread of the sender waiting for this CPU gets it
            continue
        except OSError as exc:
            raise KVPeerError(f"connection lost while reading {what}: {exc}") from None
        if n == 0:
            raise KVPeerError(f"peer closed the connection while reading {what}")
        pending = _after(pending, n)
        deadline = time.perf_counter() + poll_s


def _after(views: list[memoryview], nbytes: int) -> list[memoryview]:
    """What is left of ``views`` once their first ``nbytes`` are filled."""
    for i, view in enumerate(views):
        if nbytes < len(view):
            return [view[nbytes:], *views[i + 1 :]]
        nbytes -= len(view)
    return []


def recv_frame(sock: socket.socket, scratch: bytearray, what: str = "a frame header") -> Frame:
    """Read one header into ``scratch`` (HEADER_NBYTES bytes, reused)."""
    recv_into(sock, memoryview(scratch), what)
    return _decode(scratch)


def _magic_problem(magic: bytes) -> str:
    """Why a header with ``magic`` cannot be read: another wire version, or not a pdserve KV stream."""
    if not magic.startswith(_MAGIC_PREFIX):
        return f"bad frame magic {magic!r} (not a pdserve KV stream)"
    version = 1 if magic == _UNVERSIONED_MAGIC else magic[-1]
    return (
        f"the peer speaks KV wire version {version}, this process {WIRE_VERSION}: prefill and decode "
        "workers must run the same pdserve release"
    )


def _decode(scratch: bytearray) -> Frame:
    """Decode the header held in ``scratch``; KVTransferError if it is not one."""
    magic, kind, layer_idx, slot, nbytes, checksum, tag = _HEADER.unpack(scratch)
    if magic != MAGIC:
        raise KVPeerError(_magic_problem(magic))
    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise KVPeerError(f"unknown frame kind {kind}") from None
    return Frame(frame_kind, layer_idx, slot, nbytes, checksum, tag)


def recv_control_payload(sock: socket.socket, frame: Frame) -> bytes:
    """Read a small control payload (JSON, messages) of ``frame.nbytes``."""
    if frame.nbytes > MAX_CONTROL_PAYLOAD_NBYTES:
        raise KVPeerError(f"control payload of {frame.nbytes} bytes is too large")
    buffer = bytearray(frame.nbytes)
    recv_into(sock, memoryview(buffer), f"a {frame.kind.name} payload")
    return bytes(buffer)


def send_error(sock: socket.socket, error: BaseException) -> None:
    """Tell the sender why its transfer failed; best effort (the peer may be gone)."""
    code = verdict_code(error)
    layer = error.layer_idx if isinstance(error, KVChecksumError) else 0
    message = str(error).encode()
    try:
        send_frame(sock, Frame(FrameKind.ERROR, layer_idx=code, slot=layer, nbytes=len(message)), [message])
    except KVTransferError:
        pass


def next_layer_frame(
    sock: socket.socket, scratch: bytearray, tag: int, layer_nbytes: int, num_slots: int | None = None,
    poll_s: float = 0.0, max_run: int = 1,
) -> Frame | None:
    """Receiver side: the next LAYER frame of the request tagged ``tag``, or None at END.

    With ``max_run`` > 1 a LAYERS frame of 2 to ``max_run`` layers passes too (its entries are
    left on the socket). Anything else (another request's tag, a wrong size, a slot outside
    ``num_slots``) is a protocol error: the stream position is lost, so it raises
    KVTransferError. ``poll_s``: poll this long before sleeping (``recv_polling``).
    """
    recv_polling(sock, (memoryview(scratch),), "a frame header", poll_s)
    magic, kind, layer_idx, slot, nbytes, checksum, frame_tag = _HEADER.unpack(scratch)
    if (  # the common case, checked on the raw fields: building a Frame first costs ~3 us a layer
        kind == _LAYER and magic == MAGIC and frame_tag == tag and nbytes == layer_nbytes
        and (num_slots is None or slot < num_slots)
    ):
        return Frame(FrameKind.LAYER, layer_idx, slot, nbytes, checksum, frame_tag)
    frame = _decode(scratch)
    if frame.kind == FrameKind.END:
        return None
    if (
        frame.kind == FrameKind.LAYERS and frame.tag == tag and 2 <= frame.layer_idx <= max_run
        and frame.nbytes == frame.layer_idx * layer_nbytes
    ):
        return frame
    raise KVPeerError(f"unexpected frame {frame} (want LAYER of {layer_nbytes} bytes)")


VERDICT_GRACE_S = 0.2  # how long a sender whose data path broke looks for a verdict explaining it


def explained(sock: socket.socket, scratch: bytearray, request_id: str, exc: KVTransferError) -> KVTransferError:
    """Sender side: ``exc`` (its data path broke), or the receiver's verdict that broke it, if one came.

    A receiver that gives up on a sender (silent past the stall timeout) says so on the control
    socket and then drops what it held of the transfer (a torch_dist group, a nixl agent's ring):
    the sender's next send meets the broken data path before it reads that verdict.
    """
    try:
        if not select.select([sock], [], [], VERDICT_GRACE_S)[0]:
            return exc
        frame = recv_frame(sock, scratch, "the receiver's verdict")
    except (KVTransferError, OSError, ValueError):
        return exc
    try:
        raise_if_error(sock, frame, request_id)
    except KVTransferError as verdict:
        return verdict
    return exc


def await_verdict(sock: socket.socket, request_id: str, scratch: bytearray) -> None:
    """Sender side: read the receiver's ACK, or raise the error it reported."""
    try:
        frame = recv_frame(sock, scratch, "the receiver's acknowledgement")
        while frame.kind == FrameKind.FREE:  # shm slot credits still in flight
            frame = recv_frame(sock, scratch, "the receiver's acknowledgement")
    except KVTransferError as exc:  # a silent or lost receiver: say which request waited
        raise with_context(exc, request_id, "awaiting the receiver's verdict") from None
    raise_if_error(sock, frame, request_id)
    if frame.kind != FrameKind.ACK:
        raise KVPeerError(f"request {request_id!r}: expected ACK, got {frame.kind.name}")


def raise_if_error(sock: socket.socket, frame: Frame, request_id: str) -> None:
    """If ``frame`` is an ERROR from the receiver, raise it as the matching exception."""
    if frame.kind != FrameKind.ERROR:
        return
    message = recv_control_payload(sock, frame).decode(errors="replace")
    raise verdict_error(frame.layer_idx, request_id, frame.slot, message)


LINGER_S = 2.0  # how long a rejecting receiver keeps reading so its ERROR frame is not reset away


def _drain_before_close(sock: socket.socket) -> None:
    """Half-close, then read and drop what the peer still sends, until it closes or LINGER_S passes.

    Closing a socket with unread data makes the kernel send a reset, which can destroy an ERROR
    frame the sender has not read yet (it is still writing layers of a rejected request); after
    a half-close the sender reads the ERROR and closes, and the close here is clean.
    """
    deadline = time.monotonic() + LINGER_S
    scratch = bytearray(1 << 16)
    try:
        sock.shutdown(socket.SHUT_WR)
        while (left_s := deadline - time.monotonic()) > 0:
            sock.settimeout(left_s)
            if sock.recv_into(scratch) == 0:
                return
    except OSError:  # reset, timeout or already shut: nothing more to save
        return


@contextlib.contextmanager
def private_fd(sock: socket.socket) -> Iterator[int]:
    """A duplicate of ``sock``'s descriptor, for a C loop that uses it without the GIL.

    Another thread's ``hard_close`` of ``sock`` meanwhile still wakes the loop with an error (the
    shutdown reaches the shared socket), but the number the loop writes to is not freed and
    cannot be handed to a file opened meanwhile.
    """
    fd = os.dup(sock.fileno())
    try:
        yield fd
    finally:
        os.close(fd)


def hard_close(sock: socket.socket) -> None:
    """Shut down and close; a thread blocked on the socket wakes with an error."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def with_context(exc: BaseException, request_id: str, detail: str) -> KVTransferError:
    """``exc`` as a KVTransferError (same subclass) whose message names the request."""
    if isinstance(exc, KVChecksumError):
        return exc
    cls: type[KVTransferError]
    if isinstance(exc, KVTransferError):
        cls = type(exc)  # a peer error stays one: it says which side failed
    else:
        cls = KVTransferTimeout if isinstance(exc, TimeoutError) else KVTransferError
    return cls(f"request {request_id!r} {detail}: {exc}")


class Acceptor:
    """Accepts connections on a listening socket and serves each in its own daemon thread."""

    def __init__(self, listener: socket.socket, serve: Callable[[socket.socket], None], name: str) -> None:
        self._listener = listener
        self._serve = serve
        self._closed = False
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            # replies are small frames (RING, FREE, ACK): without this, Nagle holds each one back until
            # the peer's delayed ACK (~40 ms) whenever an earlier one is still unacknowledged
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._serve_and_close, args=(sock,), daemon=True)
            with self._lock:
                self._connections[sock] = thread
            thread.start()

    def _serve_and_close(self, sock: socket.socket) -> None:
        try:
            self._serve(sock)
        finally:
            if not self._closed:
                _drain_before_close(sock)
            sock.close()
            with self._lock:
                self._connections.pop(sock, None)

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop accepting, end open connections, and wait up to ``timeout_s`` in all for their threads to return."""
        deadline = time.monotonic() + timeout_s
        self._closed = True
        for sock in (self._listener,):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._listener.close()
        self._thread.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            connections = list(self._connections.items())
        for sock, _ in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for _, thread in connections:  # daemon threads: one stuck in a native call is left behind, not waited for
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
