"""The tcp receiver against hand-built frames from a raw socket (no pdserve sender involved)."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest
import torch

from workers.kv.checksum import checksum_buffer, request_tag
from workers.kv.errors import KVChecksumError, KVTransferError
from workers.kv.framing import (
    HEADER_NBYTES,
    MAGIC,
    WIRE_VERSION,
    Frame,
    FrameKind,
    pack_header,
    recv_control_payload,
    recv_frame,
)
from workers.kv.interface import EndpointOptions, KVSpec, SenderOptions
from workers.kv.tcp import TcpConnector, TcpEndpoint

SPEC = KVSpec(num_layers=2, num_kv_heads=1, head_dim=4, dtype="float32")
NUM_TOKENS = 3


@pytest.fixture
def endpoint() -> Iterator[TcpEndpoint]:
    ep = TcpEndpoint(EndpointOptions(stall_timeout_s=2.0))
    yield ep
    ep.close()


def _raw_sender(endpoint: TcpEndpoint, descriptor_json: str) -> socket.socket:
    host, port = endpoint.address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    payload = descriptor_json.encode()
    sock.sendall(pack_header(Frame(FrameKind.HELLO, nbytes=len(payload))) + payload)
    return sock


def _layer_frame(rid: str, layer_idx: int, payload: bytes, checksum: int) -> bytes:
    header = pack_header(Frame(FrameKind.LAYER, layer_idx, 0, len(payload), 0, request_tag(rid)))
    return header + payload + struct.pack("<Q", checksum)  # the checksum trails the payload


def test_byte_flipped_in_flight_is_caught(endpoint: TcpEndpoint) -> None:
    landed: list[int] = []
    rx = endpoint.expect("raw", NUM_TOKENS, SPEC, lambda i, k, v: landed.append(i))
    sock = _raw_sender(endpoint, rx.descriptor.to_json())
    good = torch.arange(2 * NUM_TOKENS * 4, dtype=torch.float32).numpy().tobytes()
    sock.sendall(_layer_frame("raw", 0, good, checksum_buffer(memoryview(good))))
    bad = bytearray(good)
    bad[17] ^= 0x01  # one bit flipped after the checksum was taken
    sock.sendall(_layer_frame("raw", 1, bytes(bad), checksum_buffer(memoryview(good))))
    sock.sendall(pack_header(Frame(FrameKind.END, tag=request_tag("raw"))))
    with pytest.raises(KVChecksumError, match="'raw' layer 1"):
        rx.wait(5)
    assert landed == [0]
    reply = recv_frame(sock, bytearray(HEADER_NBYTES))
    assert reply.kind == FrameKind.ERROR and reply.slot == 1  # the sender is told which layer
    sock.close()


def test_garbage_and_truncated_streams_fail_cleanly(endpoint: TcpEndpoint) -> None:
    rx = endpoint.expect("garbage", NUM_TOKENS, SPEC, lambda i, k, v: None)
    sock = _raw_sender(endpoint, rx.descriptor.to_json())
    sock.sendall(b"HTTP/1.1 200 OK\r\n" + b"x" * 64)
    with pytest.raises(KVTransferError, match="bad frame magic"):
        rx.wait(5)
    sock.close()

    rx = endpoint.expect("truncated", NUM_TOKENS, SPEC, lambda i, k, v: None)
    sock = _raw_sender(endpoint, rx.descriptor.to_json())
    payload = bytes(2 * NUM_TOKENS * 4 * 4)
    sock.sendall(_layer_frame("truncated", 0, payload, 0)[:-10])
    sock.close()
    with pytest.raises(KVTransferError, match="closed the connection while reading layer 0"):
        rx.wait(5)


@pytest.mark.parametrize(("magic", "version"), [(b"PDKV", 1), (b"PDK\x09", 9)])
def test_a_sender_of_another_wire_version_is_told_which(endpoint: TcpEndpoint, magic: bytes, version: int) -> None:
    rx = endpoint.expect("old", NUM_TOKENS, SPEC, lambda i, k, v: None)
    host, port = endpoint.address.split(":")
    payload = rx.descriptor.to_json().encode()
    header = pack_header(Frame(FrameKind.HELLO, nbytes=len(payload)))
    assert header[:4] == MAGIC and MAGIC != magic
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(magic + header[4:] + payload)
        reply = recv_frame(sock, bytearray(HEADER_NBYTES))
        assert reply.kind == FrameKind.ERROR
        message = recv_control_payload(sock, reply).decode()
    assert message == (
        f"the peer speaks KV wire version {version}, this process {WIRE_VERSION}: prefill and decode workers "
        "must run the same pdserve release"
    )


def test_sender_to_a_receiver_that_stopped_reading_times_out() -> None:
    """A peer that accepts but never reads: the kernel's send timeout ends the transfer, nothing hangs."""
    import time

    from workers.kv.descriptor import TransferDescriptor, TransportKind
    from workers.kv.errors import KVTransferTimeout
    from workers.kv.interface import SenderOptions
    from workers.kv.tcp import TcpConnector

    listener = socket.create_server(("127.0.0.1", 0))
    spec = KVSpec(num_layers=4, num_kv_heads=8, head_dim=128, dtype="float32")
    num_tokens = 2048  # 8 MiB per layer: more than both socket buffers hold
    descriptor = TransferDescriptor(
        request_id="deaf", kind=TransportKind.TCP, address=f"127.0.0.1:{listener.getsockname()[1]}",
        num_tokens=num_tokens, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_dim, dtype=spec.dtype, device="cpu",
    )
    connector = TcpConnector()
    try:
        sender = connector.open(descriptor, SenderOptions(timeout_s=1.0, socket_buffer_nbytes=1 << 20))
        peer, _ = listener.accept()  # accepted, never read
        k = torch.zeros(num_tokens, spec.num_kv_heads, spec.head_dim)
        t0 = time.monotonic()
        with pytest.raises(KVTransferTimeout):
            for i in range(spec.num_layers):
                sender.send_layer(i, k, k)
            sender.finish()
        assert time.monotonic() - t0 < 5.0
        sender.abort()
        peer.close()
    finally:
        connector.close()
        listener.close()


# 320 tokens x 8 heads x 128 x float16: K and V of 640 KiB each, a layer of three blocks (one straddles K and V)
BIG = KVSpec(num_layers=3, num_kv_heads=8, head_dim=128, dtype="float16")
BIG_TOKENS = 320
TRAILER_NBYTES = 8


def _send_big_layers(endpoint: TcpEndpoint, rid: str) -> int:
    """Send BIG's layers to ``endpoint`` and check that they land intact; the layer's size in bytes."""
    import workers.kv.tcp as tcp

    landed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rx = endpoint.expect(rid, BIG_TOKENS, BIG, lambda i, k, v: landed.update({i: (k.clone(), v.clone())}))
    shape = (BIG_TOKENS, BIG.num_kv_heads, BIG.head_dim)
    layers = [(torch.randn(shape).half(), torch.randn(shape).half()) for _ in range(BIG.num_layers)]
    connector = tcp.TcpConnector()
    try:
        with connector.open(rx.descriptor, SenderOptions(timeout_s=5)) as sender:
            for i, (k, v) in enumerate(layers):
                sender.send_layer(i, k, v)
            sender.finish()
        rx.wait(5)
    finally:
        connector.close()
    for i, (k, v) in enumerate(layers):
        assert torch.equal(landed[i][0], k) and torch.equal(landed[i][1], v)
    return rx.descriptor.layer_nbytes


def test_with_the_kernel_a_layer_of_several_blocks_goes_through_its_c_send_loop(
    endpoint: TcpEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every layer goes through the kernel's loop (header in front, blocks straddling K and V), and lands intact."""
    import workers.kv.tcp as tcp

    assert tcp.SEND_KERNEL is not None, "the KV kernel's send loop is not built here"
    real = tcp.SEND_KERNEL
    sizes: list[int] = []

    def counted(fd: int, layers: list[tuple[tuple[bytes, ...], tuple[tuple[int, int], ...]]], block: int) -> list[int]:
        sizes.extend(sum(nbytes for _, nbytes in parts) for _, parts in layers)  # (address, nbytes) pieces
        return list(real(fd, layers, block))

    monkeypatch.setattr(tcp, "SEND_KERNEL", counted)
    layer = _send_big_layers(endpoint, "c-loop")
    assert sizes == [layer] * BIG.num_layers  # one call a layer, or fewer holding several


def test_a_layer_of_several_blocks_is_hashed_block_by_block_right_after_each_send(
    endpoint: TcpEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the kernel's loop: each block is hashed right after the sendmsg that carried it (still in cache).

    The layer's checksum trails it: it rides on the next layer's first sendmsg, the last one with END
    (or on flush, when the sending thread ran out of layers before the caller finished).
    """
    import workers.kv.tcp as tcp

    monkeypatch.setattr(tcp, "SEND_KERNEL", None)
    events: list[tuple[str, int]] = []
    real_send, real_hash = tcp.send_vectored, tcp.hash_block

    def send(sock: socket.socket, parts: tuple[memoryview | bytes, ...]) -> None:
        events.append(("send", sum(len(p) for p in parts)))
        real_send(sock, parts)

    def hash_block(pieces: tuple[memoryview, ...], seed: int) -> int:
        events.append(("hash", sum(len(p) for p in pieces)))
        return real_hash(pieces, seed)

    monkeypatch.setattr(tcp, "send_vectored", send)
    monkeypatch.setattr(tcp, "hash_block", hash_block)
    layer = _send_big_layers(endpoint, "blocks")
    blocks = [512 << 10, 512 << 10, layer - (1 << 20)]
    per_layer = [("send", HEADER_NBYTES + blocks[0]), ("hash", blocks[0]), ("send", blocks[1]), ("hash", blocks[1]),
                 ("send", blocks[2]), ("hash", blocks[2])]
    # a layer's trailer rides on the next layer's first sendmsg, or goes alone when the sending thread
    # finds nothing queued (always after the last layer; between layers only if it outran the caller)
    trailers, sequence = 0, []
    for kind, nbytes in events:
        if kind == "send" and nbytes in (HEADER_NBYTES, TRAILER_NBYTES + HEADER_NBYTES):  # END, after the last trailer
            trailers += nbytes == TRAILER_NBYTES + HEADER_NBYTES
            continue
        if kind == "send" and nbytes in (TRAILER_NBYTES, TRAILER_NBYTES + HEADER_NBYTES + blocks[0]):
            trailers += 1
            if nbytes == TRAILER_NBYTES:
                continue
            nbytes -= TRAILER_NBYTES
        sequence.append((kind, nbytes))
    assert sequence == per_layer * BIG.num_layers and trailers == BIG.num_layers


def test_a_held_back_trailer_goes_out_when_no_next_layer_is_queued(endpoint: TcpEndpoint) -> None:
    """A sender that queues layers one at a time (as prefill computes them) gets each verified before the next.

    The trailer of an inline-hashed layer waits for the next frame only while one is queued: here the
    receiver must have delivered layer i before layer i+1 is even handed to the sender.
    """
    delivered = threading.Semaphore(0)
    rx = endpoint.expect("spaced", NUM_TOKENS, SPEC, lambda i, k, v: delivered.release())
    connector = TcpConnector()
    try:
        with connector.open(rx.descriptor, SenderOptions(timeout_s=5)) as sender:
            for i in range(SPEC.num_layers):
                sender.send_layer(i, torch.randn(NUM_TOKENS, 1, 4), torch.randn(NUM_TOKENS, 1, 4))
                assert delivered.acquire(timeout=5), f"layer {i} was not delivered before the next was queued"
            sender.finish()
        rx.wait(5)
    finally:
        connector.close()


def _hold_first_kernel_call(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[threading.Event, threading.Event, list[list[int]]]:
    """Make the kernel's first send signal ``started`` and wait for ``release``; record each call's layers."""
    import workers.kv.tcp as tcp
    from workers.kv.framing import _HEADER

    assert tcp.SEND_KERNEL is not None, "the KV kernel's send loop is not built here"
    real, started, release, calls = tcp.SEND_KERNEL, threading.Event(), threading.Event(), []

    def held(fd: int, layers: list[tuple[tuple[bytes, ...], tuple[memoryview, ...]]], block: int) -> list[int]:
        calls.append([_HEADER.unpack(head[-1])[2] for head, _ in layers])  # the index, from each header
        if len(calls) == 1:
            started.set()
            assert release.wait(5)
        return list(real(fd, layers, block))

    monkeypatch.setattr(tcp, "SEND_KERNEL", held)
    return started, release, calls


def test_layers_queued_while_the_wire_is_busy_go_out_in_one_call(
    endpoint: TcpEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = KVSpec(num_layers=5, num_kv_heads=8, head_dim=128, dtype="float16")
    started, release, calls = _hold_first_kernel_call(monkeypatch)
    landed: dict[int, torch.Tensor] = {}
    rx = endpoint.expect("burst", BIG_TOKENS, spec, lambda i, k, v: landed.update({i: k.clone()}))
    layers = [torch.randn(BIG_TOKENS, spec.num_kv_heads, spec.head_dim).half() for _ in range(spec.num_layers)]
    connector = TcpConnector()
    try:
        with connector.open(rx.descriptor, SenderOptions(timeout_s=5)) as sender:
            for i, k in enumerate(layers):
                sender.send_layer(i, k, k)
                assert i > 0 or started.wait(5)
            release.set()  # every later layer was queued while the first was on the wire
            sender.finish()
        rx.wait(5)
    finally:
        connector.close()
    assert calls == [[0], [1, 2, 3, 4]]
    assert all(torch.equal(landed[i], k) for i, k in enumerate(layers))


def test_the_sending_thread_ends_a_transfer_with_the_last_trailer_and_end_in_one_write(
    endpoint: TcpEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once finish() queued its stop behind the last layers, the sending thread sends the held-back trailer and END."""
    import workers.kv.tcp as tcp
    from workers.kv.framing import _HEADER

    spec = KVSpec(num_layers=5, num_kv_heads=8, head_dim=128, dtype="float16")
    started, release, calls = _hold_first_kernel_call(monkeypatch)
    writes: list[tuple[str, int, int]] = []  # (thread, bytes, frame kind of the last header)
    real_send = tcp.send_vectored

    def send(sock: socket.socket, parts: tuple[memoryview | bytes, ...]) -> None:
        writes.append((threading.current_thread().name, sum(len(p) for p in parts), _HEADER.unpack(parts[-1])[1]))
        real_send(sock, parts)

    monkeypatch.setattr(tcp, "send_vectored", send)
    rx = endpoint.expect("ending", BIG_TOKENS, spec, lambda i, k, v: None)
    k = torch.randn(BIG_TOKENS, spec.num_kv_heads, spec.head_dim).half()
    connector = TcpConnector()
    try:
        sender = connector.open(rx.descriptor, SenderOptions(timeout_s=5))
        for i in range(spec.num_layers):
            sender.send_layer(i, k, k)
            assert i > 0 or started.wait(5)
        threading.Timer(0.2, release.set).start()  # after finish() queued its stop behind layers 1-4
        sender.finish()
        rx.wait(5)
    finally:
        connector.close()
    assert calls == [[0], [1, 2, 3, 4]]
    assert writes == [("kv-send", TRAILER_NBYTES + HEADER_NBYTES, FrameKind.END.value)]


def test_a_damaged_layer_in_a_burst_goes_alone_and_is_caught(
    endpoint: TcpEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.kv.interface import FaultInjection

    spec = KVSpec(num_layers=5, num_kv_heads=8, head_dim=128, dtype="float16")
    started, release, calls = _hold_first_kernel_call(monkeypatch)
    rx = endpoint.expect("burst-bad", BIG_TOKENS, spec, lambda i, k, v: None)
    k = torch.randn(BIG_TOKENS, spec.num_kv_heads, spec.head_dim).half()
    connector = TcpConnector()
    try:
        sender = connector.open(rx.descriptor, SenderOptions(timeout_s=5, fault=FaultInjection(corrupt_layer_idx=2)))
        for i in range(spec.num_layers):
            sender.send_layer(i, k, k)
            assert i > 0 or started.wait(5)
        release.set()
        with pytest.raises(KVChecksumError, match="layer 2"):
            sender.finish()
        with pytest.raises(KVChecksumError, match="layer 2"):
            rx.wait(5)
    finally:
        connector.close()
    assert calls == [[0], [1], [3, 4]]  # the damaged layer 2 went through the Python path between them
