"""The shm transport keeps a connection's ring across its requests and leases a larger one when needed."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import threading
import time

import pytest
import torch

from workers.kv.errors import KVTransferError
from workers.kv.interface import EndpointOptions, KVSpec, SenderOptions
from workers.kv.shm import ShmConnector, ShmEndpoint, create_ring, map_ring

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


TOKEN_LAYER_NBYTES = 2 * SPEC.num_kv_heads * SPEC.head_dim * 4


def test_later_requests_reuse_the_connection_ring_until_layers_outgrow_it() -> None:
    endpoint = ShmEndpoint(EndpointOptions(stall_timeout_s=2.0, shm_num_slots=2))
    connector = ShmConnector()
    try:
        _round_trip(endpoint, connector, "first", 64)  # 16 KiB layers: 16 KiB slots
        rings = list(connector.rings_by_connection.values())
        assert len(rings) == 1 and rings[0].slot_nbytes == 64 * TOKEN_LAYER_NBYTES
        _round_trip(endpoint, connector, "second", 40)  # same slots fit: no RING, same ring
        assert list(connector.rings_by_connection.values()) == rings
        big = 64 + 1  # layers one token larger than a slot
        _round_trip(endpoint, connector, "larger", big)
        (larger,) = connector.rings_by_connection.values()
        assert larger.ring_id != rings[0].ring_id and larger.slot_nbytes > rings[0].slot_nbytes
        _round_trip(endpoint, connector, "small-again", 16)  # a larger ring serves smaller layers
        assert list(connector.rings_by_connection.values()) == [larger]
    finally:
        connector.close()
        endpoint.close()



def _let_go(endpoint: ShmEndpoint, ring_id: str) -> bool:
    """Whether no connection holds the ring any more: it is back in the free pool, or dropped."""
    with endpoint._lock:
        return any(r.ring_id == ring_id for r in endpoint._free) or all(r.ring_id != ring_id for r in endpoint._all)


def test_a_ring_whose_request_was_refused_is_never_leased_to_another_connection() -> None:
    """A pooled sender writes into the ring it knows before it reads the refusal of its HELLO: the ring is dropped."""
    endpoint = ShmEndpoint(EndpointOptions(stall_timeout_s=2.0))
    a, b = ShmConnector(), ShmConnector()
    shape = (8, SPEC.num_kv_heads, SPEC.head_dim)
    try:
        _round_trip(endpoint, a, "warm", 8)
        (ring_a,) = a.rings_by_connection.values()
        gone = endpoint.expect("gone", 8, SPEC, lambda i, k, v: None)
        gone.cancel()
        stray = a.open(gone.descriptor, SenderOptions(timeout_s=5.0))  # no RING read: the connection's ring
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not _let_go(endpoint, ring_a.ring_id):  # the HELLO is refused
            time.sleep(0.01)

        # another connection's request, whose first layer is held in its callback while the stray sender writes
        in_callback, written = threading.Event(), threading.Event()
        got: dict[int, torch.Tensor] = {}

        def on_layer(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
            if i == 0:
                in_callback.set()
                written.wait(5)
            got[i] = torch.cat([k, v]).clone()

        victim = endpoint.expect("victim", 8, SPEC, on_layer)
        tx = b.open(victim.descriptor, SenderOptions(timeout_s=5.0))
        (ring_b,) = b.rings_by_connection.values()
        assert ring_b.ring_id != ring_a.ring_id
        sent = [(torch.full(shape, 1.0 + i), torch.full(shape, -1.0 - i)) for i in range(SPEC.num_layers)]
        for i, (k, v) in enumerate(sent):
            tx.send_layer(i, k, v)
        assert in_callback.wait(5)
        with contextlib.suppress(KVTransferError):  # the stray sender writes into the first slots of its ring
            for i in range(SPEC.num_layers):
                stray.send_layer(i, torch.full(shape, 99.0), torch.full(shape, 99.0))
            time.sleep(0.2)
        written.set()
        tx.finish()
        victim.wait(5)
        for i, (k, v) in enumerate(sent):
            assert torch.equal(got[i], torch.cat([k, v]))
        with pytest.raises(KVTransferError, match="no transfer expected"):
            stray.finish()
    finally:
        a.close()
        b.close()
        endpoint.close()


def test_slots_are_a_power_of_two_and_fill_the_ring_budget() -> None:
    endpoint = ShmEndpoint(EndpointOptions(stall_timeout_s=2.0, shm_num_slots=2, shm_ring_nbytes=1 << 20))
    connector = ShmConnector()
    try:
        _round_trip(endpoint, connector, "odd", 100)  # 25,600-byte layers
        (ring,) = connector.rings_by_connection.values()
        assert ring.slot_nbytes == 32 << 10 and ring.num_slots == (1 << 20) // (32 << 10)
    finally:
        connector.close()
        endpoint.close()


def test_more_layers_than_slots_still_arrive_in_order_through_freed_slots() -> None:
    spec = KVSpec(num_layers=7, num_kv_heads=2, head_dim=16, dtype="float32")
    endpoint = ShmEndpoint(EndpointOptions(stall_timeout_s=2.0, shm_num_slots=2, shm_ring_nbytes=1))
    connector = ShmConnector()
    try:
        for rid in ("a", "b"):  # the second request reuses the ring with every slot free again
            shape = (8, spec.num_kv_heads, spec.head_dim)
            sent = [(torch.randn(shape), torch.randn(shape)) for _ in range(spec.num_layers)]
            got: dict[int, torch.Tensor] = {}
            rx = endpoint.expect(rid, 8, spec, lambda i, k, v, got=got: got.__setitem__(i, k.clone()))
            tx = connector.open(rx.descriptor, SenderOptions(timeout_s=5.0))
            for i, (k, v) in enumerate(sent):
                tx.send_layer(i, k, v)
            tx.finish()
            rx.wait(5)
            (ring,) = connector.rings_by_connection.values()
            assert ring.num_slots == 2
            assert all(torch.equal(got[i], k) for i, (k, _) in enumerate(sent))
    finally:
        connector.close()
        endpoint.close()


@pytest.mark.parametrize("poll_us", [0.0, 100.0, 5e6])
def test_layers_arrive_whether_the_receiver_sleeps_or_polls_between_them(poll_us: float) -> None:
    """0: sleeps in recv at once; 5e6: polls through every gap (the END frame ends the poll too)."""
    endpoint = ShmEndpoint(EndpointOptions(stall_timeout_s=2.0, poll_us=poll_us))
    connector = ShmConnector()
    try:
        for rid in ("a", "b"):
            _round_trip(endpoint, connector, f"{rid}-{poll_us}", 32)
    finally:
        connector.close()
        endpoint.close()


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of this process's mapping that contains ``address`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_rings_are_mapped_with_huge_pages_advised_on_both_sides() -> None:
    """Both the owner's and the sender's mapping carry MADV_HUGEPAGE ("hg"), whatever the host then grants."""
    owner = create_ring(2, 1 << 21)
    try:
        sender = map_ring(owner.ring_id, owner.path, owner.num_slots, owner.slot_nbytes)
        try:
            for ring in (owner, sender):
                assert "hg" in _vm_flags(ring.array.ctypes.data)
        finally:
            sender.close()
    finally:
        owner.close()


def test_slot_views_are_made_once_per_ring_and_released_with_it() -> None:
    """A later request on the connection gets the very K/V views of the earlier one; closing unmaps the ring."""
    endpoint = ShmEndpoint(EndpointOptions(stall_timeout_s=2.0))
    connector = ShmConnector()
    seen: list[dict[int, torch.Tensor]] = []
    try:
        for rid in ("first", "second"):
            shape = (16, SPEC.num_kv_heads, SPEC.head_dim)
            sent = [(torch.randn(shape), torch.randn(shape)) for _ in range(SPEC.num_layers)]
            got: dict[int, torch.Tensor] = {}
            values: dict[int, torch.Tensor] = {}

            def on_layer(i: int, k: torch.Tensor, v: torch.Tensor, got: dict = got, values: dict = values) -> None:
                got[i] = k
                values[i] = v.clone()

            rx = endpoint.expect(rid, 16, SPEC, on_layer)
            tx = connector.open(rx.descriptor, SenderOptions(timeout_s=5.0))
            for i, (k, v) in enumerate(sent):
                tx.send_layer(i, k, v)
            tx.finish()
            rx.wait(5)
            assert all(torch.equal(values[i], v) for i, (_, v) in enumerate(sent))  # the views show this request
            seen.append(got)
        assert all(seen[1][i] is seen[0][i] for i in range(SPEC.num_layers))
        (ring,) = endpoint._all
        del seen, got, on_layer, rx  # this test's own references to the views
        gc.collect()
    finally:
        connector.close()
        endpoint.close()
    assert not ring.views and not ring.payloads
    assert ring.mm.closed  # nothing of pdserve's kept a view: the mapping went at close


def test_a_receiver_on_another_host_is_refused_before_anything_is_mapped() -> None:
    """Its descriptor names another host: a clear error that points at tcp, and no connection is made."""
    endpoint = ShmEndpoint(EndpointOptions(stall_timeout_s=2.0))
    connector = ShmConnector()
    try:
        rx = endpoint.expect("elsewhere", 4, KVSpec(2, 1, 8, "float16"), lambda i, k, v: None)
        moved = dataclasses.replace(rx.descriptor, host_id="00000000-0000-0000-0000-000000000000")
        with pytest.raises(KVTransferError, match="shm needs the receiver on this host.*use tcp"):
            connector.open(moved, SenderOptions(timeout_s=2.0))
        assert connector.rings_by_connection == {}
        rx.cancel()
    finally:
        connector.close()
        endpoint.close()


def test_queued_layers_go_through_the_kernel_loop_a_few_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers queued while the first is copied go four to a call, in order, and land intact."""
    import threading

    import workers.kv.shm as shm

    assert shm.COPY_KERNEL is not None, "the KV kernel's shm loop is not built here"
    real, started, release, calls = shm.COPY_KERNEL, threading.Event(), threading.Event(), []

    def held(fd: int, layers: list[tuple[object, object, bytearray]], block: int, offset: int) -> list[int]:
        calls.append([int.from_bytes(header[8:12], "little") for _, _, header in layers])  # layer_idx field
        if len(calls) == 1:
            started.set()
            assert release.wait(5)
        return list(real(fd, layers, block, offset))

    monkeypatch.setattr(shm, "COPY_KERNEL", held)
    spec = KVSpec(num_layers=9, num_kv_heads=2, head_dim=16, dtype="float32")
    endpoint = ShmEndpoint(EndpointOptions(stall_timeout_s=2.0))
    connector = ShmConnector()
    try:
        shape = (8, spec.num_kv_heads, spec.head_dim)
        sent = [torch.randn(shape) for _ in range(spec.num_layers)]
        got: dict[int, torch.Tensor] = {}
        rx = endpoint.expect("four", 8, spec, lambda i, k, v: got.__setitem__(i, v.clone()))
        tx = connector.open(rx.descriptor, SenderOptions(timeout_s=5.0))
        for i, k in enumerate(sent):
            tx.send_layer(i, -k, k)
            assert i > 0 or started.wait(5)
        release.set()
        tx.finish()
        rx.wait(5)
        assert calls == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
        assert all(torch.equal(got[i], k) for i, k in enumerate(sent))
    finally:
        connector.close()
        endpoint.close()
