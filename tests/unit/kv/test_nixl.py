"""The NIXL transport's own parts: slot credits and no spinning progress thread."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("nixl", reason="optional NIXL not installed")

from workers.kv.errors import KVTransferError  # noqa: E402
from workers.kv.hugepages import huge_page_buffer  # noqa: E402
from workers.kv.interface import EndpointOptions, KVSpec, SenderOptions  # noqa: E402
from workers.kv.nixl import NixlAgent, NixlConnector, NixlEndpoint  # noqa: E402

SPEC = KVSpec(num_layers=7, num_kv_heads=2, head_dim=16, dtype="float32")


def _round_trip(endpoint: NixlEndpoint, connector: NixlConnector, rid: str, num_tokens: int) -> set[int]:
    """Send SPEC's layers and check them bit for bit; the addresses the receiver saw them at."""
    shape = (num_tokens, SPEC.num_kv_heads, SPEC.head_dim)
    sent = [(torch.randn(shape), torch.randn(shape)) for _ in range(SPEC.num_layers)]
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    addresses: set[int] = set()

    def on_layer(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        addresses.add(k.data_ptr())
        got[i] = (k.clone(), v.clone())

    rx = endpoint.expect(rid, num_tokens, SPEC, on_layer)
    tx = connector.open(rx.descriptor, SenderOptions(timeout_s=5.0))
    for i, (k, v) in enumerate(sent):
        tx.send_layer(i, k, v)
    tx.finish()
    rx.wait(10)
    assert sorted(got) == list(range(SPEC.num_layers))
    for i, (k, v) in enumerate(sent):
        assert torch.equal(got[i][0], k) and torch.equal(got[i][1], v)
    return addresses


def test_more_layers_than_slots_arrive_through_freed_slots() -> None:
    endpoint = NixlEndpoint(EndpointOptions(stall_timeout_s=3.0, shm_num_slots=2, shm_ring_nbytes=1))
    connector = NixlConnector()
    try:
        for rid in ("a", "b"):  # the second request starts with every slot free again
            addresses = _round_trip(endpoint, connector, rid, 8)
            assert len(addresses) == 2  # seven layers through the ring's two slots
    finally:
        connector.close()
        endpoint.close()


def test_ring_holds_as_many_layers_as_the_ring_budget() -> None:
    layer_nbytes = 2 * 8 * SPEC.num_kv_heads * SPEC.head_dim * 4
    endpoint = NixlEndpoint(EndpointOptions(stall_timeout_s=3.0, shm_num_slots=2, shm_ring_nbytes=4 * layer_nbytes))
    connector = NixlConnector()
    try:
        assert len(_round_trip(endpoint, connector, "budget", 8)) == 4
    finally:
        connector.close()
        endpoint.close()


def _cpu_s() -> float:
    return time.process_time()  # every thread of this process


def test_idle_agents_leave_the_cores_alone() -> None:
    """UCX's own progress thread spun on a core for as long as an agent lived; pdserve's sleeps."""
    endpoint = NixlEndpoint(EndpointOptions(stall_timeout_s=3.0))
    connector = NixlConnector()
    try:
        _round_trip(endpoint, connector, "wire-up", 8)  # connected: both agents have worked
        start = _cpu_s()
        time.sleep(1.0)
        assert _cpu_s() - start < 0.2  # a spinning thread takes ~1 s of CPU in this second
        _round_trip(endpoint, connector, "after-idle", 8)  # and the pair still works
    finally:
        connector.close()
        endpoint.close()


def test_nixl_failures_surface_as_transfer_errors() -> None:
    """NIXL raises plain Exceptions of its own; callers of a transport catch KVTransferError."""
    target, source = NixlAgent("target", progress=True), NixlAgent("source", progress=False)
    try:
        ring, staging = huge_page_buffer(1 << 20), huge_page_buffer(1 << 20)
        target.register(ring)
        source.register(staging)
        peer = source.load_peer(target.metadata())
        source.write(staging.data_ptr(), 4096, peer, ring.data_ptr(), 5.0)  # registered: fine
        with pytest.raises(KVTransferError, match="NIXL WRITE to"):
            source.write(staging.data_ptr(), 4096, peer, ring.data_ptr() + (4 << 20), 5.0)  # beyond the ring
        with pytest.raises(KVTransferError, match="NIXL loading peer 'junk'"):
            source.load_peer({"name": "junk", "version": 1, "meta": "AAAA"})
        with pytest.raises(KVTransferError, match="malformed NIXL peer description"):
            source.load_peer({"name": "no-meta", "version": 1})
    finally:
        target.close()
        source.close()


def test_a_write_into_a_closed_endpoint_names_the_request() -> None:
    endpoint, connector = NixlEndpoint(EndpointOptions(stall_timeout_s=3.0)), NixlConnector()
    shape = (8, SPEC.num_kv_heads, SPEC.head_dim)
    try:
        rx = endpoint.expect("stranded", 8, SPEC, lambda *_: None)
        tx = connector.open(rx.descriptor, SenderOptions(timeout_s=3.0))
        tx.send_layer(0, torch.ones(shape), torch.ones(shape))
        time.sleep(0.3)
        endpoint.close()  # deregisters the ring the next WRITE targets
        with pytest.raises(KVTransferError, match="'stranded'"):
            for i in range(1, SPEC.num_layers):
                time.sleep(0.02)
                tx.send_layer(i, torch.ones(shape), torch.ones(shape))
            tx.finish()
    finally:
        connector.close()
        endpoint.close()
