"""The C kernel's sending loops: tcp's (send_layers_xxh3_64) and shm's (copy_layers_xxh3_64).

Every byte in order, the layer checksums, signals and failures.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from workers.kv import checksum
from workers.kv.framing import (
    HEADER_CHECKSUM_OFFSET,
    HEADER_NBYTES,
    Frame,
    FrameKind,
    hard_close,
    pack_header,
    private_fd,
    recv_frame,
)

if sys.platform != "linux":
    pytest.skip("the kernel's send loop is built on Linux only", allow_module_level=True)
if checksum.KERNEL is None and shutil.which("cc") is None and shutil.which("gcc") is None:
    pytest.skip("no C compiler here: the KV checksum kernel cannot be built", allow_module_level=True)

BLOCK = checksum.BLOCK_NBYTES


@pytest.fixture
def send():  # type: ignore[no-untyped-def]
    """The kernel's send loop; the set-up command builds the kernel wherever a compiler exists."""
    assert checksum.SEND_KERNEL is not None, f"KV checksum kernel not loaded: {checksum.KERNEL_STATE}"
    return checksum.SEND_KERNEL


@pytest.fixture
def copy_layers():  # type: ignore[no-untyped-def]
    """The kernel's shm loop."""
    assert checksum.COPY_KERNEL is not None, f"KV checksum kernel not loaded: {checksum.KERNEL_STATE}"
    return checksum.COPY_KERNEL


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback TCP connection (sender, receiver); the sender blocking, failing after 3 s without progress."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 3, 0))
    yield sender, receiver
    sender.close()
    receiver.close()


def _read_all(sock: socket.socket, nbytes: int, into: bytearray) -> None:
    while len(into) < nbytes:
        chunk = sock.recv(min(1 << 20, nbytes - len(into)))
        if not chunk:
            return
        into.extend(chunk)


def _layer(nbytes: int, cut: int) -> tuple[np.ndarray, tuple[memoryview, memoryview]]:
    data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    view = memoryview(data)
    return data, (view[:cut], view[cut:])


def _one(send, fd: int, head: tuple[bytes, ...], parts: tuple[memoryview, ...]) -> int:  # type: ignore[no-untyped-def]
    """Send one layer; its checksum."""
    digests = send(fd, [(head, parts)], BLOCK)
    assert len(digests) == 1
    return int(digests[0])


@pytest.mark.parametrize(("nbytes", "cut"), [(BLOCK, BLOCK // 2), (3 * BLOCK + 4096, BLOCK + 77), (1000, 300)])
def test_head_then_every_block_arrives_in_order_with_the_layer_checksum(send, pair, nbytes: int, cut: int) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    data, parts = _layer(nbytes, cut)
    head = (b"", b"HEADER--", b"x" * 5)
    got = bytearray()
    reader = threading.Thread(target=_read_all, args=(receiver, 13 + nbytes, got))
    reader.start()
    digest = _one(send, sender.fileno(), head, parts)
    reader.join(5)
    assert bytes(got) == b"HEADER--xxxxx" + data.tobytes()
    assert digest == checksum.checksum_parts(parts)


def test_each_layer_of_a_batch_is_trailed_by_its_checksum_but_the_last(send, pair) -> None:  # type: ignore[no-untyped-def]
    """Layer i's 8-byte checksum rides in front of layer i+1's head; the caller holds the last one back."""
    sender, receiver = pair
    layers = [_layer(nbytes, nbytes // 3) for nbytes in (BLOCK + 4096, 5000, 2 * BLOCK)]
    frames = [((f"H{i}".encode(),), parts) for i, (_, parts) in enumerate(layers)]
    frames[0] = ((b"owed0000", b"H0"), frames[0][1])
    want = [checksum.checksum_parts(parts) for _, parts in layers]
    expected = b"owed0000H0" + layers[0][0].tobytes()
    expected += struct.pack("<Q", want[0]) + b"H1" + layers[1][0].tobytes()
    expected += struct.pack("<Q", want[1]) + b"H2" + layers[2][0].tobytes()
    got = bytearray()
    reader = threading.Thread(target=_read_all, args=(receiver, len(expected), got))
    reader.start()
    assert send(sender.fileno(), frames, BLOCK) == want
    reader.join(5)
    assert bytes(got) == expected
    assert send(sender.fileno(), [], BLOCK) == []


@contextlib.contextmanager
def _signalled_after(delay_s: float, handler: Callable[[int, object], None]) -> Iterator[None]:
    """SIGUSR1 to the main thread (where the send blocks) after ``delay_s``, handled by ``handler``."""
    previous = signal.signal(signal.SIGUSR1, handler)
    main = threading.main_thread().ident
    assert main is not None
    poke = threading.Timer(delay_s, signal.pthread_kill, (main, signal.SIGUSR1))
    poke.start()
    try:
        yield
    finally:
        poke.cancel()
        signal.signal(signal.SIGUSR1, previous)


def test_a_signal_mid_send_runs_its_handler_and_the_send_resumes_without_losing_bytes(send, pair) -> None:  # type: ignore[no-untyped-def]
    """The handler (which starts the reader) must run while the send is blocked, not after the stall timeout."""
    sender, receiver = pair
    nbytes = 16 << 20  # far more than the socket buffers hold: the send blocks until the reader starts
    data, parts = _layer(nbytes, nbytes // 2)
    got = bytearray()
    reader = threading.Thread(target=_read_all, args=(receiver, nbytes, got))
    calls: list[float] = []

    def handler(signum: int, frame: object) -> None:
        calls.append(time.monotonic())
        reader.start()

    t0 = time.monotonic()
    with _signalled_after(0.3, handler):
        digest = _one(send, sender.fileno(), (), parts)
        elapsed = time.monotonic() - t0
    reader.join(5)
    assert len(calls) == 1 and calls[0] - t0 < 2.0  # well before the 3 s stall timeout
    assert elapsed < 2.5
    assert bytes(got) == data.tobytes() and digest == checksum.checksum_parts(parts)


def test_an_exception_from_a_signal_handler_ends_the_send(send, pair) -> None:  # type: ignore[no-untyped-def]
    sender, _ = pair
    _, parts = _layer(16 << 20, 8 << 20)

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    t0 = time.monotonic()
    with _signalled_after(0.3, handler), pytest.raises(KeyboardInterrupt):
        _one(send, sender.fileno(), (), parts)
    assert time.monotonic() - t0 < 2.0


def test_a_peer_that_stops_reading_fails_the_send_after_the_socket_timeout(send, pair) -> None:  # type: ignore[no-untyped-def]
    sender, _ = pair
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 300_000))
    _, parts = _layer(16 << 20, 8 << 20)
    t0 = time.monotonic()
    with pytest.raises(BlockingIOError):
        _one(send, sender.fileno(), (), parts)
    assert time.monotonic() - t0 < 2.0


def test_a_peer_that_is_gone_fails_the_send(send, pair) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    receiver.close()  # a reset, as from a killed process
    _, parts = _layer(4 << 20, 1 << 20)
    time.sleep(0.05)
    with pytest.raises(OSError) as caught:
        _one(send, sender.fileno(), (), parts)
    assert caught.value.errno in (errno.ECONNRESET, errno.EPIPE)


@pytest.mark.parametrize(("nbytes", "block"), [(240, BLOCK), (BLOCK + 100, BLOCK), (4096, 200)])
def test_blocks_the_kernel_cannot_hash_are_refused_before_anything_is_sent(send, pair, nbytes: int, block: int) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    good = ((b"H",), (bytes(4096),))
    with pytest.raises(ValueError, match="more than 240"):
        send(sender.fileno(), [good, ((), (bytes(nbytes),))], block)
    receiver.setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver.recv(1)  # the good layer before the bad one was not sent either


def test_malformed_layers_are_refused(send, pair) -> None:  # type: ignore[no-untyped-def]
    sender, _ = pair
    with pytest.raises(TypeError, match=r"\(head, src\) pairs"):
        send(sender.fileno(), [(b"H", bytes(4096), b"extra")], BLOCK)
    with pytest.raises(TypeError):
        send(sender.fileno(), [((), (bytes(4096), 7))], BLOCK)  # not a buffer


def test_the_layer_sizes_the_tcp_sender_gives_the_kernel() -> None:
    assert checksum.kernel_hashes_every_block(BLOCK) and checksum.kernel_hashes_every_block(2 * BLOCK + 241)
    assert not any(checksum.kernel_hashes_every_block(n) for n in (240, BLOCK + 1, BLOCK + 240))


def test_layer_parts_name_the_tensors_memory_for_host_contiguous_layers_only() -> None:
    """kernel_layer_parts hands the kernel each K and V by address; a layer it cannot read in place gives None."""
    import torch

    from workers.kv.pipeline import kernel_layer_parts

    k, v = torch.randn(64, 8, 128).half(), torch.randn(64, 8, 128).half()
    taken = kernel_layer_parts([(0, k, v), (1, v, k)])
    assert taken is not None
    parts, nbytes = taken
    assert nbytes == k.nbytes + v.nbytes
    assert parts == [((k.data_ptr(), k.nbytes), (v.data_ptr(), v.nbytes)), ((v.data_ptr(), v.nbytes), (k.data_ptr(), k.nbytes))]
    sent = np.concatenate([k.view(torch.uint8).numpy().reshape(-1), v.view(torch.uint8).numpy().reshape(-1)])
    assert checksum.KERNEL.xxh3_64(parts[0]) == checksum.KERNEL.xxh3_64(sent)
    strided = torch.randn(8, 64, 128).half().transpose(0, 1)  # the right shape, not contiguous
    assert kernel_layer_parts([(0, k, v), (1, strided, v)]) is None
    assert kernel_layer_parts([(0, k, torch.randn(64, 8, 128, device="meta").half())]) is None  # no host memory


def _header(layer_idx: int) -> bytearray:
    return bytearray(pack_header(Frame(FrameKind.LAYER, layer_idx, layer_idx, 0, 0, 77)))


def test_shm_loop_copies_each_layer_into_its_slot_and_sends_its_header_with_the_checksum(copy_layers, pair) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    layers = [_layer(nbytes, nbytes // 3) for nbytes in (BLOCK + 4096, 5000, 2 * BLOCK)]
    slots = [np.zeros(len(data), np.uint8) for data, _ in layers]
    headers = [_header(i) for i in range(len(layers))]
    frames = [(slot, parts, header) for slot, (_, parts), header in zip(slots, layers, headers, strict=True)]
    digests = copy_layers(sender.fileno(), frames, BLOCK, HEADER_CHECKSUM_OFFSET)
    assert digests == [checksum.checksum_parts(parts) for _, parts in layers]
    assert all(np.array_equal(slot, data) for slot, (data, _) in zip(slots, layers, strict=True))
    got = bytearray()
    _read_all(receiver, len(layers) * HEADER_NBYTES, got)
    for i, digest in enumerate(digests):
        frame = recv_frame_from(bytes(got[i * HEADER_NBYTES : (i + 1) * HEADER_NBYTES]))
        assert (frame.layer_idx, frame.checksum, frame.tag) == (i, digest, 77)


def recv_frame_from(raw: bytes) -> Frame:
    """Decode one packed header."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        return recv_frame(b, bytearray(HEADER_NBYTES))


@pytest.mark.parametrize(
    ("slot", "header", "offset", "error", "match"),
    [
        (np.zeros(4095, np.uint8), _header(0), HEADER_CHECKSUM_OFFSET, ValueError, "dst has 4095 bytes and src 4096"),
        (np.zeros(4096, np.uint8), bytearray(20), HEADER_CHECKSUM_OFFSET, ValueError, "no 8 bytes at checksum_offset"),
        (np.zeros(4096, np.uint8), _header(0), -1, ValueError, "no 8 bytes at checksum_offset"),
        (np.zeros(4096, np.uint8), _header(0), (1 << 63) - 4, ValueError, "no 8 bytes at checksum_offset"),  # + 8 wraps
        (np.zeros(4096, np.uint8), bytes(HEADER_NBYTES), HEADER_CHECKSUM_OFFSET, BufferError, "not writable"),
        (bytes(4096), _header(0), HEADER_CHECKSUM_OFFSET, BufferError, "not writable"),
    ],
)
def test_shm_loop_checks_every_layer_before_it_copies_or_sends_anything(  # type: ignore[no-untyped-def]
    copy_layers, pair, slot: object, header: bytes, offset: int, error: type[Exception], match: str
) -> None:
    sender, receiver = pair
    first = np.zeros(4096, np.uint8)
    good = (first, (bytes(range(256)) * 16,), _header(0))
    with pytest.raises(error, match=match):
        copy_layers(sender.fileno(), [good, (slot, (bytes(4096),), header)], BLOCK, offset)
    assert not first.any()  # the good layer before the bad one was not copied
    receiver.setblocking(False)
    with pytest.raises(BlockingIOError):
        receiver.recv(1)  # nor announced


def test_shm_loop_reports_a_peer_that_is_gone(copy_layers, pair) -> None:  # type: ignore[no-untyped-def]
    sender, receiver = pair
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    receiver.close()
    time.sleep(0.05)
    _, parts = _layer(4096, 1000)
    with pytest.raises(OSError) as caught:
        copy_layers(sender.fileno(), [(np.zeros(4096, np.uint8), parts, _header(0))], BLOCK, HEADER_CHECKSUM_OFFSET)
    assert caught.value.errno in (errno.ECONNRESET, errno.EPIPE)


def test_a_socket_closed_mid_send_ends_the_loop_and_its_number_stays_unused(send, pair) -> None:  # type: ignore[no-untyped-def]
    """Through ``private_fd``: another thread's hard_close wakes the loop, whose descriptor stays its own.

    The handler runs inside the loop (between short writes). It closes the socket the way an
    aborting sender does and opens a new one, which takes the freed number: the loop must not
    write into it.
    """
    sender, _ = pair
    _, parts = _layer(16 << 20, 8 << 20)
    number = sender.fileno()
    opened: list[tuple[socket.socket, socket.socket]] = []

    def handler(signum: int, frame: object) -> None:
        hard_close(sender)
        opened.append(socket.socketpair())
        for sock in opened[0]:
            sock.setblocking(False)  # a loop that wrote into it would fail fast, not hang

    try:
        with _signalled_after(0.3, handler), pytest.raises(OSError) as caught, private_fd(sender) as fd:
            _one(send, fd, (), parts)
        assert caught.value.errno in (errno.EPIPE, errno.ECONNRESET)
        (new, peer), = opened
        assert number in (new.fileno(), peer.fileno())  # the number was free, and reused
        for sock in (new, peer):
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # nothing of the layer went into the new socket
    finally:
        for sock in (s for both in opened for s in both):
            sock.close()
