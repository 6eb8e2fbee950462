"""Vectored sends and receives (several buffers, one system call) and the tcp receiver's multi-block layers."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest
import torch

from workers.kv import framing
from workers.kv.checksum import BLOCK_NBYTES, checksum_buffer, request_tag
from workers.kv.errors import KVChecksumError, KVTransferError, KVTransferTimeout
from workers.kv.framing import (
    Frame,
    FrameKind,
    pack_header,
    recv_polling,
    recv_vectored,
    send_vectored,
    set_stall_timeout,
)
from workers.kv.interface import EndpointOptions, KVSpec
from workers.kv.pipeline import as_bytes
from workers.kv.tcp import TcpEndpoint


def _pair(buffer_nbytes: int = 64 << 10) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    for s in (a, b):  # small kernel buffers: sends and receives come back short and must be finished
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_nbytes)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_nbytes)
        set_stall_timeout(s, 5.0)
    return a, b


def test_vectored_parts_arrive_in_order_through_small_buffers() -> None:
    rng = np.random.default_rng(1)
    parts = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (40, 3 << 20, 7, 1 << 20)]
    a, b = _pair()
    sender = threading.Thread(target=send_vectored, args=(a, [memoryview(p) for p in parts]))
    sender.start()
    received = [bytearray(n) for n in (17, 3 << 20, 30, 1 << 20)]  # cut differently from the sends
    recv_vectored(b, [memoryview(r) for r in received], "parts")
    sender.join(5)
    assert b"".join(received) == b"".join(parts)
    a.close()
    b.close()


def test_vectored_receive_times_out_after_partial_data() -> None:
    a, b = _pair()
    set_stall_timeout(b, 0.2)
    a.sendall(b"x" * 10)
    views = [memoryview(bytearray(8)), memoryview(bytearray(8))]
    t0 = time.monotonic()
    with pytest.raises(KVTransferTimeout, match="layer 3"):
        recv_vectored(b, views, "layer 3")
    assert time.monotonic() - t0 < 2.0
    assert bytes(views[0]) == b"x" * 8  # what arrived was kept
    a.close()
    b.close()


def _count_yields(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    yields = [0]
    real = framing.os.sched_yield

    def counted() -> None:
        yields[0] += 1
        real()

    monkeypatch.setattr(framing.os, "sched_yield", counted)
    return yields


def _send_later(sock: socket.socket, delay_s: float, *chunks: bytes) -> threading.Thread:
    def run() -> None:
        for chunk in chunks:
            time.sleep(delay_s)
            sock.sendall(chunk)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_polling_read_takes_a_waiting_frame_without_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    yields = _count_yields(monkeypatch)
    a, b = _pair()
    a.sendall(b"h" * 40)
    view = memoryview(bytearray(40))
    recv_polling(b, (view,), "a header", 1.0)
    assert bytes(view) == b"h" * 40 and yields[0] == 0
    a.close()
    b.close()


def _read_polling(
    monkeypatch: pytest.MonkeyPatch, delay_s: float, chunks: tuple[bytes, ...], sizes: tuple[int, ...], poll_s: float
) -> tuple[list[bytes], int]:
    """``recv_polling`` into views of ``sizes`` while ``chunks`` arrive ``delay_s`` apart: (views' bytes, yields)."""
    yields = _count_yields(monkeypatch)
    a, b = _pair()
    sender = _send_later(a, delay_s, *chunks)
    views = [memoryview(bytearray(n)) for n in sizes]
    recv_polling(b, views, "a layer", poll_s)
    sender.join(5)
    a.close()
    b.close()
    return [bytes(view) for view in views], yields[0]


def test_polling_read_catches_pieces_arriving_while_it_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two pieces 20 ms apart inside a 5 s poll: both are taken by polling (it yielded), in order."""
    t0 = time.monotonic()
    got, yields = _read_polling(monkeypatch, 0.02, (b"a" * 10, b"b" * 30), (40,), 5.0)
    assert got == [b"a" * 10 + b"b" * 30]
    assert yields > 0 and time.monotonic() - t0 < 2.0


def test_polling_read_sleeps_once_the_poll_is_over(monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame later than the poll is still read whole, by the blocking receive it falls back to."""
    got, _ = _read_polling(monkeypatch, 0.1, (b"x" * 5, b"y" * 35), (40,), 0.001)
    assert got == [b"x" * 5 + b"y" * 35]


def test_polling_read_fills_several_views_and_restarts_its_poll_while_bytes_arrive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A block and its trailer from four pieces 30 ms apart, polling 60 ms: 90 ms in all, yet no sleep.

    The poll restarts with every piece that arrives, so a payload that keeps streaming in never falls
    back to the blocking read (which a poll measured from the start would do after 60 ms).
    """
    blocking: list[int] = []
    real = framing.recv_vectored

    def spied(sock: socket.socket, views: list[memoryview], what: str) -> None:
        blocking.append(len(views))
        real(sock, views, what)

    monkeypatch.setattr(framing, "recv_vectored", spied)
    got, yields = _read_polling(monkeypatch, 0.03, (b"a" * 10, b"b" * 20, b"c" * 15, b"t" * 8), (45, 8), 0.06)
    assert got == [b"a" * 10 + b"b" * 20 + b"c" * 15, b"t" * 8]
    assert yields > 0 and blocking == []


def test_polling_read_without_a_poll_reads_blocking_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    got, yields = _read_polling(monkeypatch, 0.02, (b"p" * 6, b"q" * 4), (6, 0, 4), 0.0)
    assert got == [b"p" * 6, b"", b"q" * 4] and yields == 0


def test_polling_read_on_a_socket_with_a_python_timeout_reads_blocking() -> None:
    """CPython waits out such a socket's timeout before a MSG_DONTWAIT read; the read blocks instead.

    So a silent peer is a KVTransferTimeout after the socket's timeout, as on any blocking read.
    """
    a, b = _pair()
    b.settimeout(0.2)
    t0 = time.monotonic()
    with pytest.raises(KVTransferTimeout, match="a header"):
        recv_polling(b, (memoryview(bytearray(40)),), "a header", 5.0)
    assert time.monotonic() - t0 < 2.0
    a.close()
    b.close()


@pytest.mark.parametrize("poll_s", [0.001, 5.0])
def test_polling_read_from_a_closed_peer_fails(poll_s: float) -> None:
    a, b = _pair()
    a.sendall(b"z" * 3)
    a.close()
    with pytest.raises(KVTransferError, match="closed the connection while reading a header"):
        recv_polling(b, (memoryview(bytearray(40)),), "a header", poll_s)
    b.close()


def test_polling_read_of_a_silent_peer_times_out_after_the_stall_timeout() -> None:
    a, b = _pair()
    set_stall_timeout(b, 0.2)
    t0 = time.monotonic()
    with pytest.raises(KVTransferTimeout, match="a header"):
        recv_polling(b, (memoryview(bytearray(40)),), "a header", 0.01)
    assert 0.15 < time.monotonic() - t0 < 2.0
    a.close()
    b.close()


def test_vectored_receive_from_a_closed_peer_fails() -> None:
    a, b = _pair()
    a.sendall(b"y" * 5)
    a.close()
    with pytest.raises(KVTransferError, match="closed"):
        recv_vectored(b, [memoryview(bytearray(4)), memoryview(bytearray(4))], "a layer")
    b.close()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_as_bytes_is_the_tensor_memory(dtype: torch.dtype) -> None:
    t = torch.randn(5, 3, 4).to(dtype)
    view = as_bytes(t)
    assert len(view) == t.numel() * t.element_size()
    assert bytes(view) == t.view(torch.uint8).numpy().tobytes()


# 200 tokens x 8 heads x 128 x float32: K and V of 800 KiB each, a layer of four blocks (the last one short)
SPEC = KVSpec(num_layers=2, num_kv_heads=8, head_dim=128, dtype="float32")
NUM_TOKENS = 200


@pytest.mark.parametrize("position", [0, BLOCK_NBYTES + 3, 2 * 819200 - 1])
def test_multi_block_layer_with_a_flipped_byte_is_caught(position: int) -> None:
    endpoint = TcpEndpoint(EndpointOptions(stall_timeout_s=2.0))
    try:
        landed: list[tuple[int, torch.Tensor]] = []
        rx = endpoint.expect("big", NUM_TOKENS, SPEC, lambda i, k, v: landed.append((i, k.clone())))
        host, port = endpoint.address.split(":")
        sock = socket.create_connection((host, int(port)), timeout=5)
        hello = rx.descriptor.to_json().encode()
        sock.sendall(pack_header(Frame(FrameKind.HELLO, nbytes=len(hello))) + hello)
        good = torch.randn(2 * NUM_TOKENS * 8 * 128).numpy().tobytes()
        assert len(good) > 3 * BLOCK_NBYTES
        checksum = checksum_buffer(memoryview(good))
        tag = request_tag("big")

        def layer(idx: int, payload: bytes) -> bytes:
            header = pack_header(Frame(FrameKind.LAYER, idx, 0, len(payload), 0, tag))
            return header + payload + struct.pack("<Q", checksum)

        bad = bytearray(good)
        bad[position] ^= 0x10
        sender = threading.Thread(target=sock.sendall, args=(layer(0, good) + layer(1, bytes(bad)),))
        sender.start()
        with pytest.raises(KVChecksumError, match="layer 1"):
            rx.wait(5)
        sender.join(5)
        assert [i for i, _ in landed] == [0]
        expected_k = torch.frombuffer(bytearray(good[: len(good) // 2]), dtype=torch.float32).view(NUM_TOKENS, 8, 128)
        assert torch.equal(landed[0][1], expected_k)
        sock.close()
    finally:
        endpoint.close()
