"""torch_dist's runs: layers queued at once cross a real gloo pair as one message each, verified per layer."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

import workers.kv.torch_dist as torch_dist
from workers.kv.checksum import copy_and_checksum
from workers.kv.errors import KVChecksumError, KVTransferError
from workers.kv.framing import RUN_ENTRY, Frame, FrameKind, next_layer_frame, send_frame
from workers.kv.interface import EndpointOptions, KVReceiver, KVSpec, SenderOptions
from workers.kv.registry import open_endpoint

SPEC = KVSpec(num_layers=7, num_kv_heads=2, head_dim=16, dtype="float32")
NUM_TOKENS = 40
LAYER_NBYTES = 2 * NUM_TOKENS * SPEC.num_kv_heads * SPEC.head_dim * 4  # 10,240


@pytest.fixture
def endpoint() -> Iterator[torch_dist.TorchDistEndpoint]:
    # staging smaller than a run: the receiver must grow it when the first run arrives
    ep = open_endpoint("torch_dist", EndpointOptions(stall_timeout_s=5.0, staging_nbytes=LAYER_NBYTES))
    assert isinstance(ep, torch_dist.TorchDistEndpoint)
    yield ep
    ep.close()


@pytest.fixture
def connector() -> Iterator[torch_dist.TorchDistConnector]:
    c = torch_dist.TorchDistConnector()
    yield c
    c.close()


class _Collector:
    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.layers[layer_idx] = (k.clone(), v.clone())


def _layers(seed: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_TOKENS, SPEC.num_kv_heads, SPEC.head_dim)
    order = [5, 0, 3, 6, 1, 4, 2]  # runs need not hold consecutive layers
    return [(i, torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for i in order]


def _wire(
    endpoint: torch_dist.TorchDistEndpoint, connector: torch_dist.TorchDistConnector, rid: str, got: _Collector
) -> tuple[torch_dist.TorchDistWire, torch_dist._Pair, KVReceiver]:
    rx = endpoint.expect(rid, NUM_TOKENS, SPEC, got)
    options = SenderOptions(timeout_s=5.0)
    pair = connector._pair(rx.descriptor, options, time.monotonic() + options.timeout_s)
    assert pair.lock.acquire(timeout=5)
    return torch_dist.TorchDistWire(rx.descriptor, options, pair, connector), pair, rx


@pytest.mark.parametrize("per_run", [2, 3, 7])
def test_queued_layers_cross_in_runs_bit_exact(
    endpoint: torch_dist.TorchDistEndpoint, connector: torch_dist.TorchDistConnector,
    monkeypatch: pytest.MonkeyPatch, per_run: int,
) -> None:
    monkeypatch.setattr(torch_dist, "RUN_NBYTES", per_run * LAYER_NBYTES)
    for n in range(2):  # a second request on the same pair reuses its run buffers
        got = _Collector()
        wire, pair, rx = _wire(endpoint, connector, f"runs-{per_run}-{n}", got)
        sent = _layers(seed=n)
        wire.send_layers(sent)
        wire.finish()
        wire.close()
        rx.wait(10)
        assert sorted(got.layers) == list(range(SPEC.num_layers))
        for layer_idx, k, v in sent:
            assert torch.equal(got.layers[layer_idx][0], k) and torch.equal(got.layers[layer_idx][1], v)
        # the first run was copied into the pair's first run buffer, the next (if any) into the second
        sizes = [b.numel() for b in pair.run_buffers]
        assert sizes[0] >= per_run * LAYER_NBYTES
        assert (sizes[1] > 0) == (per_run < SPEC.num_layers)


def test_a_layer_damaged_inside_a_run_fails_its_checksum_and_the_pair_survives(
    endpoint: torch_dist.TorchDistEndpoint, connector: torch_dist.TorchDistConnector,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch_dist, "RUN_NBYTES", 3 * LAYER_NBYTES)
    calls = iter(range(100))

    def damage_second(target: np.ndarray, parts: object, corrupt: bool = False, nontemporal: bool = True) -> int:
        return copy_and_checksum(target, parts, corrupt=next(calls) == 1, nontemporal=nontemporal)  # type: ignore[arg-type]

    monkeypatch.setattr(torch_dist, "copy_and_checksum", damage_second)
    got = _Collector()
    wire, _, rx = _wire(endpoint, connector, "damaged-run", got)
    sent = _layers(seed=3)
    wire.send_layers(sent)
    with pytest.raises(KVChecksumError) as sender_error:
        wire.finish()
    wire.close()
    assert sender_error.value.layer_idx == sent[1][0]  # the second layer copied: layer 0
    with pytest.raises(KVChecksumError):
        rx.wait(10)
    assert sent[1][0] not in got.layers

    monkeypatch.setattr(torch_dist, "copy_and_checksum", copy_and_checksum)
    got = _Collector()
    wire, _, rx = _wire(endpoint, connector, "after-damage", got)
    wire.send_layers(sent)
    wire.finish()
    wire.close()
    rx.wait(10)
    assert all(torch.equal(got.layers[i][0], k) for i, k, _ in sent)


def _frame_reader(frame: Frame, entries: bytes = b"") -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    b.settimeout(2)
    send_frame(a, frame, [entries] if entries else [])
    return a, b


@pytest.mark.parametrize(
    ("count", "nbytes", "max_run"),
    [(3, 3 * 1000, 1), (1, 1000, 8), (9, 9 * 1000, 8), (3, 3 * 1000 + 1, 8)],
    ids=["runs-not-expected", "run-of-one", "more-than-max", "wrong-size"],
)
def test_a_malformed_run_header_is_a_protocol_error(count: int, nbytes: int, max_run: int) -> None:
    a, b = _frame_reader(Frame(FrameKind.LAYERS, count, 0, nbytes, 0, tag=7))
    with a, b, pytest.raises(KVTransferError, match="unexpected frame"):
        next_layer_frame(b, bytearray(40), 7, 1000, max_run=max_run)


def test_a_run_header_passes_with_its_entries_left_on_the_socket() -> None:
    entries = RUN_ENTRY.pack(4, 11) + RUN_ENTRY.pack(2, 22)
    a, b = _frame_reader(Frame(FrameKind.LAYERS, 2, 0, 2000, 0, tag=7), entries)
    with a, b:
        frame = next_layer_frame(b, bytearray(40), 7, 1000, max_run=8)
        assert frame is not None and frame.kind == FrameKind.LAYERS and frame.layer_idx == 2
        assert list(RUN_ENTRY.iter_unpack(b.recv(len(entries), socket.MSG_WAITALL))) == [(4, 11), (2, 22)]


def test_a_run_announced_but_never_sent_fails_within_the_deadline(connector: torch_dist.TorchDistConnector) -> None:
    deadline_s = 1.0
    ep = open_endpoint("torch_dist", EndpointOptions(stall_timeout_s=deadline_s))
    try:
        assert isinstance(ep, torch_dist.TorchDistEndpoint)
        got = _Collector()
        wire, pair, rx = _wire(ep, connector, "announced-only", got)
        entries = RUN_ENTRY.pack(0, 1) + RUN_ENTRY.pack(1, 2)
        send_frame(pair.sock, Frame(FrameKind.LAYERS, 2, 0, 2 * LAYER_NBYTES, 0, wire._tag), [entries])
        t0 = time.monotonic()
        with pytest.raises(KVTransferError, match="a run of 2 layers"):
            rx.wait(30)
        assert time.monotonic() - t0 < deadline_s + 3.0
        assert got.layers == {}
        wire.close()
    finally:
        ep.close()
