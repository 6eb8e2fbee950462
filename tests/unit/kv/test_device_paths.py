"""The KV paths that differ on CUDA, run on every device here: the CPU case always, the CUDA case where a GPU is.

CUDA tensors cross the host transports through a pinned staging copy (``HostStager``); a receiver whose
staging is on the GPU verifies with ``device_checksum`` and, with ``keep=True``, hands out device copies.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from workers.kv.checksum import checksum_buffer, device_checksum
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


@pytest.mark.parametrize("device", DEVICES)
def test_layers_on_any_device_cross_a_host_transport_bit_exact(endpoint: KVEndpoint, device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    sent = [
        tuple(torch.randn(37, SPEC.num_kv_heads, SPEC.head_dim, generator=gen).to(torch.bfloat16).to(device) for _ in "kv")
        for _ in range(SPEC.num_layers)
    ]
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rx = endpoint.expect(f"dev-{device}", 37, SPEC, lambda i, k, v: got.update({i: (k, v)}), keep=True)
    client = KVClient(SenderOptions(timeout_s=5.0))
    try:
        tx = client.open(rx.descriptor)
        for i, (k, v) in enumerate(sent):
            tx.send_layer(i, k, v)
        tx.finish()
        rx.wait(5)
    finally:
        client.close()
    for i, (k, v) in enumerate(sent):
        assert torch.equal(got[i][0].view(torch.int16), k.cpu().view(torch.int16))
        assert torch.equal(got[i][1].view(torch.int16), v.cpu().view(torch.int16))


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
