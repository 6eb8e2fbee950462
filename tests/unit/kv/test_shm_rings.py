"""The shm transport keeps a connection's ring across its requests and leases a larger one when needed."""

from __future__ import annotations

import torch

from workers.kv.interface import EndpointOptions, KVSpec, SenderOptions
from workers.kv.shm import ShmConnector, ShmEndpoint

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=16, dtype="float32")


def _round_trip(endpoint: ShmEndpoint, connector: ShmConnector, rid: str, num_tokens: int) -> None:
    shape = (num_tokens, SPEC.num_kv_heads, SPEC.head_dim)
    sent = [(torch.randn(shape), torch.randn(shape)) for _ in range(SPEC.num_layers)]
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rx = endpoint.expect(rid, num_tokens, SPEC, lambda i, k, v: got.__setitem__(i, (k.clone(), v.clone())))
    tx = connector.open(rx.descriptor, SenderOptions(timeout_s=5.0))
    for i, (k, v) in enumerate(sent):
        tx.send_layer(i, k, v)
    tx.finish()
    rx.wait(5)
    for i, (k, v) in enumerate(sent):
        assert torch.equal(got[i][0], k) and torch.equal(got[i][1], v)


def test_later_requests_reuse_the_connection_ring_until_layers_outgrow_it() -> None:
    endpoint = ShmEndpoint(EndpointOptions(stall_timeout_s=2.0, staging_nbytes=1 << 16, shm_num_slots=2))
    connector = ShmConnector()
    try:
        _round_trip(endpoint, connector, "first", 16)
        rings = list(connector.rings_by_connection.values())
        assert len(rings) == 1
        _round_trip(endpoint, connector, "second", 32)  # same slots fit: no RING, same ring
        assert list(connector.rings_by_connection.values()) == rings
        big = (1 << 16) // (2 * SPEC.num_kv_heads * SPEC.head_dim * 4) + 1  # layers larger than a slot
        _round_trip(endpoint, connector, "larger", big)
        (larger,) = connector.rings_by_connection.values()
        assert larger.ring_id != rings[0].ring_id and larger.slot_nbytes > rings[0].slot_nbytes
        _round_trip(endpoint, connector, "small-again", 16)  # a larger ring serves smaller layers
        assert list(connector.rings_by_connection.values()) == [larger]
    finally:
        connector.close()
        endpoint.close()

