"""The KV paths that differ on CUDA, run on every device here: the CPU case always, the CUDA case where a GPU is.

CUDA tensors cross the host transports through a pinned staging copy (``HostStager``); a receiver whose
staging is on the GPU verifies with ``device_checksum`` and, with ``keep=True``, hands out device copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from workers.kv import checksum
from workers.kv.checksum import POSITION_STEP, checksum_buffer, device_checksum, fmix64
from workers.kv.descriptor import TransportKind
from workers.kv.errors import KVChecksumError
from workers.kv.interface import EndpointOptions, KVEndpoint, KVSpec, SenderOptions
from workers.kv.pipeline import PendingTable
from workers.kv.registry import KVClient, open_endpoint

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]
SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=64, dtype="bfloat16")


@pytest.fixture(params=["memory", "tcp", "shm"])
def endpoint(request: pytest.FixtureRequest) -> Iterator[KVEndpoint]:
    ep = open_endpoint(request.param, EndpointOptions(stall_timeout_s=5.0))
    yield ep
    ep.close()


def _round_trip(
    endpoint: KVEndpoint, request_id: str, spec: KVSpec, layers: list[tuple[torch.Tensor, ...]]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Send ``layers`` (K, V of 37 tokens each) to ``endpoint``; the layers it kept, by index."""
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rx = endpoint.expect(request_id, 37, spec, lambda i, k, v: got.update({i: (k, v)}), keep=True)
    client = KVClient(SenderOptions(timeout_s=5.0))
    try:
        tx = client.open(rx.descriptor)
        for i, (k, v) in enumerate(layers):
            tx.send_layer(i, k, v)
        tx.finish()
        rx.wait(5)
    finally:
        client.close()
    return got


@pytest.mark.parametrize("device", DEVICES)
def test_layers_on_any_device_cross_a_host_transport_bit_exact(endpoint: KVEndpoint, device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    sent = [
        tuple(torch.randn(37, SPEC.num_kv_heads, SPEC.head_dim, generator=gen).to(torch.bfloat16).to(device) for _ in "kv")
        for _ in range(SPEC.num_layers)
    ]
    got = _round_trip(endpoint, f"dev-{device}", SPEC, sent)
    for i, (k, v) in enumerate(sent):
        assert torch.equal(got[i][0].view(torch.int16), k.cpu().view(torch.int16))
        assert torch.equal(got[i][1].view(torch.int16), v.cpu().view(torch.int16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("sent", "expected"), [("bfloat16", "float32"), ("float32", "bfloat16")])
def test_a_layer_in_another_float_dtype_arrives_in_the_receivers_dtype(
    endpoint: KVEndpoint, device: str, sent: str, expected: str
) -> None:
    """A CPU engine loads a bf16 checkpoint as fp32, a GPU engine keeps it bf16: a mixed pair still transfers."""
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=64, dtype=expected)
    gen = torch.Generator().manual_seed(1)
    shape = (37, spec.num_kv_heads, spec.head_dim)
    layers = [
        tuple(torch.randn(shape, generator=gen).to(getattr(torch, sent)).to(device) for _ in "kv")
        for _ in range(spec.num_layers)
    ]
    got = _round_trip(endpoint, f"mixed-{sent}", spec, layers)
    bits = torch.int32 if expected == "float32" else torch.int16
    for i, (k, v) in enumerate(layers):
        for received, original in zip(got[i], (k, v), strict=True):
            assert received.dtype == getattr(torch, expected)
            # bit-exact: bf16 -> fp32 is exact, fp32 -> bf16 rounds the same way on every device
            assert torch.equal(received.cpu().view(bits), original.cpu().to(received.dtype).view(bits))


@pytest.mark.parametrize("device", DEVICES)
def test_a_receiver_staging_on_the_device_keeps_verified_copies(device: str) -> None:
    """What torch_dist's receiver does with its (NCCL) staging: verify on the device, copy with keep=True."""
    table = PendingTable(TransportKind.TORCH_DIST, "here:0", device=device)
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rx = table.register("staged", 5, SPEC, lambda i, k, v: got.update({i: (k, v)}), keep=True)
    layer_nbytes = rx.descriptor.layer_nbytes
    staging = torch.randint(0, 256, (layer_nbytes,), dtype=torch.uint8, device=device)
    expected = staging.clone()

    def checksum(payload: torch.Tensor) -> int:
        return device_checksum(payload) if payload.is_cuda else checksum_buffer(payload.cpu().numpy().data)

    rx.deliver(0, staging, checksum(staging))
    staging.zero_()  # the transport reuses its staging for the next layer
    assert got[0][0].device.type == device
    assert torch.equal(torch.cat([got[0][0].reshape(-1).view(torch.uint8), got[0][1].reshape(-1).view(torch.uint8)]), expected)
    bad = expected.clone()
    good_checksum = checksum(bad)
    bad[7] ^= 1
    with pytest.raises(KVChecksumError, match="'staged' layer 1"):
        rx.deliver(1, bad, good_checksum)
    assert sorted(got) == [0]


@pytest.mark.parametrize("device", DEVICES)
def test_a_flipped_byte_changes_the_checksum_on_any_device(device: str) -> None:
    data = torch.randint(0, 256, (1 << 20,), dtype=torch.uint8, device=device)
    hash_of = device_checksum if device == "cuda" else (lambda t: checksum_buffer(t.numpy().data))
    before = hash_of(data)
    assert hash_of(data.clone()) == before  # deterministic
    for position in (0, 4097, (1 << 20) - 1):
        data[position] ^= 0x10
        assert hash_of(data) != before
        data[position] ^= 0x10


def _reference_device_checksum(data: bytes) -> int:
    """``device_checksum`` written out plainly with Python ints, one word at a time."""
    mask = (1 << 64) - 1
    padded = data + bytes(-len(data) % 8)
    total = 0
    for i in range(len(padded) // 8):
        word = int.from_bytes(padded[8 * i : 8 * i + 8], "little")
        total = (total + fmix64((word + i * POSITION_STEP) & mask)) & mask
    return fmix64(total ^ fmix64(len(data)))


def _random_bytes(nbytes: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk_words", [3, checksum.DEVICE_CHUNK_WORDS])
def test_the_device_checksum_is_its_plain_definition_at_any_size_offset_and_chunking(
    device: str, chunk_words: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checksum, "DEVICE_CHUNK_WORDS", chunk_words)
    for nbytes in (0, 1, 3, 7, 8, 9, 23, 24, 25, 4096, 4099):
        data = _random_bytes(nbytes + 5, device, seed=nbytes)
        for start in (0, 1, 4, 5):  # a slice that is not 8-byte aligned is read through a copy
            piece = data[start : start + nbytes]
            expected = _reference_device_checksum(bytes(piece.cpu().numpy()))
            assert device_checksum(piece) == expected, (nbytes, start)


@pytest.mark.parametrize("device", DEVICES)
def test_equal_bytes_give_equal_device_checksums_in_any_tensor_and_on_any_device(device: str) -> None:
    nbytes = 3 * checksum.DEVICE_CHUNK_WORDS * 8 + 13  # several chunks and a ragged tail
    data = _random_bytes(nbytes, device)
    expected = device_checksum(data)
    assert device_checksum(data.clone()) == expected
    assert device_checksum(data.cpu()) == expected  # CPU and the device agree bit for bit
    wider = torch.zeros(nbytes + 3, dtype=torch.uint8, device=device)
    wider[3:] = data
    assert device_checksum(wider[3:]) == expected  # the same bytes at an unaligned offset of another buffer
    rows = data[: nbytes - 13].view(3, -1)
    assert device_checksum(rows) == device_checksum(data[: nbytes - 13])  # the bytes count, not the shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [0, 8, 1024, 5, 1027])  # at a word boundary or within a word
def test_a_buffer_split_in_parts_has_the_checksum_of_the_whole(
    device: str, split: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an NCCL sender hashes K and V as they are; its receiver hashes them in one staging buffer
    monkeypatch.setattr(checksum, "DEVICE_CHUNK_WORDS", 64)  # parts span several chunks
    data = _random_bytes(3 * 64 * 8 + 13, device)
    assert device_checksum(data[:split], data[split:]) == device_checksum(data)
    third = len(data) // 3 // 8 * 8
    assert device_checksum(data[:third], data[third : 2 * third], data[2 * third :]) == device_checksum(data)
    assert device_checksum(data[split:], data[:split]) != device_checksum(data) or split == 0  # order counts


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("word_nbytes", [4, 8])
def test_swapping_words_65521_apart_changes_the_device_checksum(device: str, word_nbytes: int) -> None:
    """A position-weighted sum with weights i % 65521 + 1 weighs words 0 and 65521 alike."""
    data = _random_bytes(2 * 65521 * word_nbytes, device)
    before = device_checksum(data)
    far = 65521 * word_nbytes
    first, second = data[:word_nbytes].clone(), data[far : far + word_nbytes].clone()
    assert not torch.equal(first, second)
    data[:word_nbytes], data[far : far + word_nbytes] = second, first
    assert device_checksum(data) != before


@pytest.mark.parametrize("device", DEVICES)
def test_a_flipped_byte_anywhere_changes_the_device_checksum(device: str) -> None:
    small = _random_bytes(67, device)
    before = device_checksum(small)
    for position in range(small.numel()):
        for bit in (0x01, 0x80):
            small[position] ^= bit
            assert device_checksum(small) != before, (position, bit)
            small[position] ^= bit
    chunk_nbytes = checksum.DEVICE_CHUNK_WORDS * 8
    large = _random_bytes(2 * chunk_nbytes + 5, device)
    before = device_checksum(large)
    for position in (0, chunk_nbytes - 1, chunk_nbytes, chunk_nbytes + 7, 2 * chunk_nbytes, large.numel() - 1):
        large[position] ^= 0x10
        assert device_checksum(large) != before, position
        large[position] ^= 0x10
    assert device_checksum(torch.cat([large, torch.zeros(1, dtype=torch.uint8, device=device)])) != before


def _nbytes_allocated_by(fn: Callable[[], object], device: str) -> int:
    """Bytes that ``fn`` allocated: the peak above the start on CUDA, the sum of every allocation on CPU.

    The CPU sum counts memory freed and allocated again twice, so it bounds the peak from above.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(event.self_cpu_memory_usage, 0) for event in prof.events())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("offset", [0, 1])
def test_the_device_checksum_allocates_a_few_chunks_whatever_the_payload_size(
    device: str, offset: int
) -> None:
    chunk_nbytes = checksum.DEVICE_CHUNK_WORDS * 8
    data = _random_bytes(8 * chunk_nbytes + offset + 3, device)
    payload = data[offset:]  # offset 1: unaligned, each chunk is copied into one more chunk-sized buffer
    allocated = _nbytes_allocated_by(lambda: device_checksum(payload), device)
    assert allocated <= 3 * chunk_nbytes + (64 << 10) < payload.numel()
