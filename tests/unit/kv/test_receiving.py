"""The verifier thread of a receiving connection: checks, delivers in order, reports the first failure."""

from __future__ import annotations

import threading

import pytest
import torch

from workers.kv.checksum import checksum_buffer
from workers.kv.descriptor import TransportKind
from workers.kv.errors import KVChecksumError
from workers.kv.interface import KVSpec
from workers.kv.pipeline import PendingTable, StagingPool
from workers.kv.receiving import LayerVerifier

SPEC = KVSpec(num_layers=4, num_kv_heads=1, head_dim=8, dtype="float32")
NUM_TOKENS = 3
LAYER_NBYTES = 2 * NUM_TOKENS * 8 * 4


def _fill(buffer: torch.Tensor, layer_idx: int) -> int:
    payload = torch.full((LAYER_NBYTES // 4,), float(layer_idx), dtype=torch.float32).view(torch.uint8)
    buffer[:LAYER_NBYTES].copy_(payload)
    return checksum_buffer(payload.numpy().data)


def test_layers_are_verified_and_delivered_over_two_reused_buffers() -> None:
    table = PendingTable(TransportKind.MEMORY, "here")
    got: list[tuple[int, float]] = []
    pending = table.register("r", NUM_TOKENS, SPEC, lambda i, k, v: got.append((i, float(v[0, 0, 0]))))
    verifier = LayerVerifier(StagingPool(64), name="test-verify")
    seen: set[int] = set()
    try:
        for i in range(SPEC.num_layers):
            buffer = verifier.take(LAYER_NBYTES, timeout_s=5)
            seen.add(buffer.data_ptr())
            verifier.submit(pending, i, buffer, LAYER_NBYTES, _fill(buffer, i))
        assert verifier.drain() is None
    finally:
        verifier.close()
    pending.complete()
    assert got == [(i, float(i)) for i in range(SPEC.num_layers)]
    assert len(seen) <= 2


def test_bad_checksum_is_reported_by_drain_and_later_layers_are_dropped() -> None:
    table = PendingTable(TransportKind.MEMORY, "here")
    got: list[int] = []
    pending = table.register("bad", NUM_TOKENS, SPEC, lambda i, k, v: got.append(i))
    verifier = LayerVerifier(StagingPool(64), name="test-verify")
    try:
        for i in range(SPEC.num_layers):
            buffer = verifier.take(LAYER_NBYTES, timeout_s=5)
            checksum = _fill(buffer, i)
            if i == 1:
                buffer[5] ^= 0x10  # damaged after the checksum was taken
            verifier.submit(pending, i, buffer, LAYER_NBYTES, checksum)
        error = verifier.drain()
        assert isinstance(error, KVChecksumError) and error.layer_idx == 1
        assert verifier.drain() is None  # cleared for the connection's next request
    finally:
        verifier.close()
    assert got == [0]
    with pytest.raises(KVChecksumError):
        pending.wait(1)


def test_take_waits_while_both_buffers_are_busy() -> None:
    table = PendingTable(TransportKind.MEMORY, "here")
    release = threading.Event()
    pending = table.register("slow", NUM_TOKENS, SPEC, lambda i, k, v: release.wait(5))
    verifier = LayerVerifier(StagingPool(64), name="test-verify")
    try:
        for i in range(2):
            buffer = verifier.take(LAYER_NBYTES, timeout_s=5)
            verifier.submit(pending, i, buffer, LAYER_NBYTES, _fill(buffer, i))
        with pytest.raises(Exception, match="stalled"):
            verifier.take(LAYER_NBYTES, timeout_s=0.2)
        release.set()
        assert verifier.take(LAYER_NBYTES, timeout_s=5).numel() >= LAYER_NBYTES
        assert verifier.drain() is None
    finally:
        release.set()
        verifier.close()
