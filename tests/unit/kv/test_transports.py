"""Every transport, in one process (threads): bit-exact round trips, reuse, and explicit failures."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from workers.kv.errors import (
    KVChecksumError,
    KVTransferError,
    KVTransferTimeout,
    TransferFault,
    sending_side_fault,
)
from workers.kv.interface import EndpointOptions, FaultInjection, KVEndpoint, KVSpec, SenderOptions
from workers.kv.registry import KVClient, open_endpoint


def _nixl_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("nixl") is not None


KINDS = [
    "memory", "tcp", "shm", "torch_dist",
    pytest.param("nixl", marks=pytest.mark.skipif(not _nixl_installed(), reason="optional NIXL not installed")),
]
STALL_S = 0.5
STALL_S_BY_KIND = {"nixl": 3.0}  # UCX connection set-up alone took up to a second on a loaded machine


@pytest.fixture(params=KINDS)
def endpoint(request: pytest.FixtureRequest) -> Iterator[KVEndpoint]:
    stall_s = STALL_S_BY_KIND.get(request.param, STALL_S)
    ep = open_endpoint(request.param, EndpointOptions(stall_timeout_s=stall_s, staging_nbytes=1 << 16))
    yield ep
    ep.close()


@pytest.fixture
def client() -> Iterator[KVClient]:
    c = KVClient(SenderOptions(timeout_s=5.0))
    yield c
    c.close()


def _random_layers(spec: KVSpec, num_tokens: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, spec.dtype)
    shape = (num_tokens, spec.num_kv_heads, spec.head_dim)
    layers = []
    for _ in range(spec.num_layers):
        k, v = (torch.randn(shape, generator=gen).to(dtype) for _ in range(2))
        k.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -0.0]).to(dtype)  # bit patterns, not values
        layers.append((k, v))
    return layers


class _Collector:
    """on_layer callback that copies out each layer and records the staging address it came from."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.addresses: set[int] = set()
        self.delay_s = delay_s

    def __call__(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        time.sleep(self.delay_s)
        self.addresses.add(k.data_ptr())
        self.layers[layer_idx] = (k.clone(), v.clone())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _transfer(endpoint: KVEndpoint, client: KVClient, rid: str, spec: KVSpec, num_tokens: int, seed: int = 0):
    sent = _random_layers(spec, num_tokens, seed)
    got = _Collector()
    rx = endpoint.expect(rid, num_tokens, spec, got)
    tx = client.open(rx.descriptor)
    for i, (k, v) in enumerate(sent):
        tx.send_layer(i, k, v)
    send_stats = tx.finish()
    recv_stats = rx.wait(10)
    return sent, got, send_stats, recv_stats


@pytest.mark.parametrize(
    ("dtype", "num_tokens", "num_kv_heads", "head_dim"),
    [("float32", 1, 1, 8), ("bfloat16", 37, 2, 64), ("float16", 300, 4, 32), ("float32", 1024, 8, 128)],
)
def test_round_trip_is_bit_exact(
    endpoint: KVEndpoint, client: KVClient, dtype: str, num_tokens: int, num_kv_heads: int, head_dim: int
) -> None:
    spec = KVSpec(num_layers=3, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
    sent, got, send_stats, recv_stats = _transfer(endpoint, client, f"rt-{dtype}-{num_tokens}", spec, num_tokens)
    assert sorted(got.layers) == [0, 1, 2]
    for i, (k, v) in enumerate(sent):
        gk, gv = got.layers[i]
        assert gk.dtype == k.dtype and gk.shape == k.shape
        assert torch.equal(_bits(gk), _bits(k)) and torch.equal(_bits(gv), _bits(v))
    expected_nbytes = 3 * 2 * num_tokens * num_kv_heads * head_dim * k.element_size()
    assert send_stats.num_bytes == recv_stats.num_bytes == expected_nbytes
    assert recv_stats.num_layers == 3


def test_staging_is_reused_across_layers_and_requests(endpoint: KVEndpoint, client: KVClient) -> None:
    spec = KVSpec(num_layers=8, num_kv_heads=2, head_dim=64, dtype="float32")
    addresses: set[int] = set()
    for n in range(3):
        _, got, _, _ = _transfer(endpoint, client, f"reuse-{n}", spec, 100, seed=n)
        addresses |= got.addresses
    # 24 layers of three requests landed in at most one buffer per layer of a request (a shm ring's
    # slots, a socket transport's staging) -- never a fresh buffer per layer
    assert len(addresses) <= spec.num_layers


def test_concurrent_requests_on_one_endpoint(endpoint: KVEndpoint, client: KVClient) -> None:
    spec = KVSpec(num_layers=4, num_kv_heads=2, head_dim=32, dtype="float32")
    results: dict[str, bool] = {}

    def run(rid: str, seed: int) -> None:
        sent, got, _, _ = _transfer(endpoint, client, rid, spec, 50 + seed, seed)
        results[rid] = all(torch.equal(_bits(got.layers[i][0]), _bits(k)) for i, (k, _) in enumerate(sent))

    threads = [threading.Thread(target=run, args=(f"c{i}", i)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {"c0": True, "c1": True, "c2": True}


@pytest.mark.parametrize("keep", [False, True])
def test_corrupted_layer_raises_checksum_error_on_both_sides(endpoint: KVEndpoint, keep: bool) -> None:
    spec = KVSpec(num_layers=4, num_kv_heads=2, head_dim=16, dtype="float32")
    got = _Collector()
    rx = endpoint.expect("corrupt-me", 20, spec, got, keep=keep)  # keep: verified while copied out
    client = KVClient(SenderOptions(timeout_s=5.0, fault=FaultInjection(corrupt_layer_idx=1)))
    try:
        tx = client.open(rx.descriptor)
        with pytest.raises(KVChecksumError, match="'corrupt-me' layer 1") as sent:
            for i, (k, v) in enumerate(_random_layers(spec, 20, 0)):
                tx.send_layer(i, k, v)
            tx.finish()
    finally:
        client.close()
    assert sending_side_fault(sent.value) is TransferFault.SENDER  # the bytes the sender put out went bad
    with pytest.raises(KVChecksumError, match="'corrupt-me' layer 1"):
        rx.wait(5)
    assert sorted(got.layers) == [0]  # nothing from the bad layer on was handed to the engine


def test_silent_sender_fails_within_the_deadline(endpoint: KVEndpoint, client: KVClient) -> None:
    spec = KVSpec(num_layers=4, num_kv_heads=2, head_dim=16, dtype="float32")
    rx = endpoint.expect("stalled", 10, spec, _Collector())
    tx = client.open(rx.descriptor)
    k, v = _random_layers(spec, 10, 0)[0]
    tx.send_layer(0, k, v)
    t0 = time.monotonic()
    stall_s = STALL_S_BY_KIND.get(endpoint.kind.value, STALL_S)
    with pytest.raises(KVTransferTimeout, match="stalled"):
        rx.wait(30.0)  # the stall timeout fires first
    assert time.monotonic() - t0 < stall_s + 2.0
    # the sender resumes and hears that the receiver gave up on it: not the receiver's fault
    with pytest.raises(KVTransferError) as sent:
        for i, (k, v) in enumerate(_random_layers(spec, 10, 0)[1:], start=1):
            tx.send_layer(i, k, v)
        tx.finish()
    assert sending_side_fault(sent.value) is not TransferFault.RECEIVER, repr(sent.value)


def test_unknown_request_is_rejected(endpoint: KVEndpoint, client: KVClient) -> None:
    import dataclasses

    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32")
    rx = endpoint.expect("known", 4, spec, _Collector())
    stranger = dataclasses.replace(rx.descriptor, request_id="stranger")
    with pytest.raises(KVTransferError, match="no transfer expected") as sent:
        tx = client.open(stranger)
        for i, (k, v) in enumerate(_random_layers(spec, 4, 0)):
            tx.send_layer(i, k, v)
        tx.finish()
    rx.cancel()
    assert sending_side_fault(sent.value) is TransferFault.RECEIVER


def test_a_receiver_that_is_gone_is_the_receivers_fault(endpoint: KVEndpoint, client: KVClient) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32")
    gone = open_endpoint(endpoint.kind.value, EndpointOptions(stall_timeout_s=2.0))
    descriptor = gone.expect("too-late", 4, spec, _Collector()).descriptor
    gone.close()  # nothing listens at its address any more
    with pytest.raises(KVTransferError) as sent:
        tx = client.open(descriptor)
        for i, (k, v) in enumerate(_random_layers(spec, 4, 0)):
            tx.send_layer(i, k, v)
        tx.finish()
    assert sending_side_fault(sent.value) is TransferFault.RECEIVER, repr(sent.value)


def test_a_late_failure_of_a_cancelled_transfer_leaves_the_retry_of_its_id_alone(
    endpoint: KVEndpoint, client: KVClient
) -> None:
    """The decode side gives up on a request and expects it again; the first sender dies after that."""
    spec = KVSpec(num_layers=3, num_kv_heads=1, head_dim=8, dtype="float32")
    layers = _random_layers(spec, 4, 0)
    first = _Collector()
    rx1 = endpoint.expect("again", 4, spec, first)
    tx1 = client.open(rx1.descriptor)
    tx1.send_layer(0, *layers[0])
    deadline = time.monotonic() + 5
    while 0 not in first.layers and time.monotonic() < deadline:  # the first sender holds the request
        time.sleep(0.01)
    rx1.cancel()
    retry = _Collector()
    rx2 = endpoint.expect("again", 4, spec, retry)
    tx1.abort()
    time.sleep(0.3)  # the first transfer's connection fails it now
    other = KVClient(SenderOptions(timeout_s=5.0))
    try:
        tx2 = other.open(rx2.descriptor)
        for i, (k, v) in enumerate(layers):
            tx2.send_layer(i, k, v)
        tx2.finish()
    finally:
        other.close()
    rx2.wait(5)
    assert sorted(retry.layers) == [0, 1, 2]
    for i, (k, v) in enumerate(layers):
        assert torch.equal(_bits(retry.layers[i][0]), _bits(k)) and torch.equal(_bits(retry.layers[i][1]), _bits(v))


def test_bad_sender_input(endpoint: KVEndpoint, client: KVClient) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32")
    rx = endpoint.expect("bad-input", 4, spec, _Collector())
    tx = client.open(rx.descriptor)
    (k, v), _ = _random_layers(spec, 4, 0)
    with pytest.raises(ValueError, match="descriptor expects"):
        tx.send_layer(0, k[:3], v[:3])
    with pytest.raises(ValueError, match="descriptor expects"):
        tx.send_layer(0, k.int(), v.int())  # another float dtype is converted (test_device_paths); an int never
    with pytest.raises(ValueError, match="descriptor expects"):
        tx.send_layer(0, k[:3].half(), v[:3].half())
    with pytest.raises(ValueError, match="out of range"):
        tx.send_layer(2, k, v)
    tx.send_layer(0, k, v)
    with pytest.raises(ValueError, match="sent twice"):
        tx.send_layer(0, k, v)
    with pytest.raises(KVTransferError, match=r"layers \[1\] never sent") as sent:
        tx.finish()
    assert sending_side_fault(sent.value) is TransferFault.UNKNOWN  # the sender's own mistake: no peer to blame
    with pytest.raises(KVTransferError):
        rx.wait(5)


def test_callback_failure_fails_the_transfer(endpoint: KVEndpoint, client: KVClient) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32")

    def explode(layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        raise RuntimeError("no room")

    rx = endpoint.expect("cb-fails", 4, spec, explode)
    tx = client.open(rx.descriptor)
    with pytest.raises(KVTransferError) as sent:
        for i, (k, v) in enumerate(_random_layers(spec, 4, 0)):
            tx.send_layer(i, k, v)
        tx.finish()
    assert sending_side_fault(sent.value) is TransferFault.RECEIVER, repr(sent.value)
    with pytest.raises(KVTransferError, match=r"on_layer\(0\) failed.*no room"):
        rx.wait(5)


def _sending_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "kv-send")


def test_a_caller_that_only_catches_the_error_leaks_no_sender(endpoint: KVEndpoint, client: KVClient) -> None:
    # a receiver that goes away mid-transfer fails the sending thread; the caller then sees the error from
    # send_layer or finish and, without abort(), must get back the thread and the connection (torch_dist:
    # the pair and its lock). A thread left waiting per failure shows as one more kv-send thread each time.
    spec = KVSpec(num_layers=3, num_kv_heads=1, head_dim=8, dtype="float32")
    layers = _random_layers(spec, 4, 0)
    rounds = _sending_threads() + 3
    for n in range(rounds):
        doomed = open_endpoint(endpoint.kind.value, EndpointOptions(stall_timeout_s=2.0))
        rx = doomed.expect(f"orphaned-{n}", 4, spec, _Collector())
        tx = client.open(rx.descriptor)
        tx.send_layer(0, *layers[0])
        time.sleep(0.05)
        doomed.close()
        with pytest.raises(KVTransferError) as sent:
            for i, (k, v) in enumerate(layers[1:], start=1):
                time.sleep(0.02)
                tx.send_layer(i, k, v)
            tx.finish()
        assert sending_side_fault(sent.value) is TransferFault.RECEIVER, repr(sent.value)
    assert _sending_threads() <= max(rounds - 3, 1) + 1
    _, got, _, _ = _transfer(endpoint, client, "after-failures", spec, 4)
    assert sorted(got.layers) == [0, 1, 2]


@pytest.mark.parametrize("kind", ["memory", "torch_dist"])  # tcp's and shm's socket buffers take these layers
def test_a_layer_not_taken_in_time_leaks_no_sender(kind: str) -> None:
    # a receiver slow once: send_layer gives up on a layer the sending thread did not take within the
    # timeout (torch_dist: or gloo's send times out first); a caller that only catches that error must
    # get back the thread and the connection too. A thread left waiting per failure shows as one more
    # kv-send thread each round, and a torch_dist pair left locked refuses the next request ("pair busy").
    spec = KVSpec(num_layers=6, num_kv_heads=1, head_dim=8, dtype="float32")
    layers = _random_layers(spec, 4, 0)
    endpoint = open_endpoint(kind, EndpointOptions(stall_timeout_s=30.0))
    client = KVClient(SenderOptions(timeout_s=0.5, max_inflight_layers=1))
    try:
        rounds = _sending_threads() + 3
        for n in range(rounds):
            rx = endpoint.expect(f"slow-once-{n}", 4, spec, _Collector(delay_s=1.0))
            tx = client.open(rx.descriptor)
            with pytest.raises(KVTransferError):
                for i, (k, v) in enumerate(layers):
                    tx.send_layer(i, k, v)
            rx.cancel()
            _, got, _, _ = _transfer(endpoint, client, f"next-{n}", spec, 4)
            assert sorted(got.layers) == list(range(6))
        assert _sending_threads() <= max(rounds - 3, 1) + 1
    finally:
        client.close()
        endpoint.close()


def test_send_layer_does_not_wait_for_the_wire(endpoint: KVEndpoint, client: KVClient) -> None:
    # The receiver takes 0.2 s per layer; queuing 3 layers must still return at once.
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=16, dtype="float32")
    rx = endpoint.expect("overlap", 8, spec, _Collector(delay_s=0.2))
    tx = client.open(rx.descriptor)
    t0 = time.perf_counter()
    for i, (k, v) in enumerate(_random_layers(spec, 8, 0)):
        tx.send_layer(i, k, v)
    queued_s = time.perf_counter() - t0
    stats = tx.finish()
    assert queued_s < 0.15 < 0.5 < stats.seconds
    rx.wait(5)


def test_closing_the_endpoint_fails_pending_transfers(endpoint: KVEndpoint) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32")
    rx = endpoint.expect("orphan", 4, spec, _Collector())
    endpoint.close()
    with pytest.raises(KVTransferError, match="endpoint closed"):
        rx.wait(5)


def test_a_closed_endpoint_expects_nothing(endpoint: KVEndpoint) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32")
    endpoint.close()
    with pytest.raises(KVTransferError, match="request 'late': endpoint closed"):
        endpoint.expect("late", 4, spec, _Collector())


def test_no_layer_is_written_after_the_receiver_gave_up(endpoint: KVEndpoint, client: KVClient) -> None:
    # The decode side frees the reserved blocks once wait() fails, so no callback may run after it.
    spec = KVSpec(num_layers=4, num_kv_heads=2, head_dim=16, dtype="float32")
    ends: list[float] = []
    writing = threading.Event()

    def slow_write(layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        writing.set()
        time.sleep(0.3)
        ends.append(time.monotonic())

    rx = endpoint.expect("slow", 8, spec, slow_write)
    tx = client.open(rx.descriptor)
    for i, (k, v) in enumerate(_random_layers(spec, 8, 0)):
        tx.send_layer(i, k, v)
    assert writing.wait(10)
    with pytest.raises(KVTransferTimeout):
        rx.wait(0.1)
    gave_up_at = time.monotonic()
    with pytest.raises(KVTransferError):
        tx.finish()
    time.sleep(0.4)
    assert ends and all(t <= gave_up_at for t in ends)


def test_keep_hands_the_callback_private_verified_copies(endpoint: KVEndpoint, client: KVClient) -> None:
    """keep=True: the tensors stay valid (and unchanged) after later transfers reuse the staging or ring."""
    spec = KVSpec(num_layers=4, num_kv_heads=2, head_dim=64, dtype="float16")
    kept: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    sent: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for n, num_tokens in enumerate((100, 100, 61)):  # the second reuses the first's buffers; the third, smaller
        rid = f"keep-{n}"
        layers = kept[rid] = {}
        rx = endpoint.expect(rid, num_tokens, spec, lambda i, k, v, layers=layers: layers.update({i: (k, v)}), keep=True)
        tx = client.open(rx.descriptor)
        sent[rid] = _random_layers(spec, num_tokens, seed=n)
        for i, (k, v) in enumerate(sent[rid]):
            tx.send_layer(i, k, v)
        tx.finish()
        rx.wait(10)
    storages: set[int] = set()
    for rid, layers in kept.items():
        assert sorted(layers) == list(range(spec.num_layers))
        for i, (k, v) in enumerate(sent[rid]):
            gk, gv = layers[i]  # no clone was taken: these are what the callback was handed
            assert torch.equal(_bits(gk), _bits(k)) and torch.equal(_bits(gv), _bits(v))
            storages.add(gk.untyped_storage().data_ptr())
    assert len(storages) == 3 * spec.num_layers  # every layer its own copy

