"""How a torch_dist pair picks NCCL or gloo at PAIR, and what a receiver does with a PAIR it cannot read
(real sockets, real gloo groups; the NCCL case runs where a GPU is)."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator

import pytest
import torch

import workers.kv.pair_groups as pair_groups
import workers.kv.torch_dist as torch_dist
from workers.kv.descriptor import TransferDescriptor
from workers.kv.errors import KVRejected
from workers.kv.framing import HEADER_NBYTES, Frame, FrameKind, recv_control_payload, recv_frame, send_frame
from workers.kv.interface import EndpointOptions, KVSpec, SenderOptions
from workers.kv.registry import open_endpoint

SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float32")


@pytest.mark.parametrize(
    ("receiver_device", "receiver_gpu", "sender_gpu", "want"),
    [
        ("cuda", "GPU-a", "GPU-b", "cuda"),  # two GPUs: NCCL moves device tensors
        ("cuda", "GPU-a", "GPU-a", "cpu"),  # one GPU: NCCL refuses two ranks on it
        ("cuda", "GPU-a", "", "cpu"),  # a sender without CUDA or NCCL
        ("cuda", "", "GPU-b", "cpu"),  # a receiver that could not name its GPU
        ("cpu", "", "GPU-b", "cpu"),  # staging in host memory: gloo whatever the sender has
    ],
)
def test_a_pair_uses_nccl_only_between_two_different_gpus(
    receiver_device: str, receiver_gpu: str, sender_gpu: str, want: str
) -> None:
    assert pair_groups.pair_device(receiver_device, receiver_gpu, sender_gpu) == want


def test_without_cuda_this_process_names_no_gpu() -> None:
    if torch.cuda.is_available():
        assert pair_groups.gpu_identity()  # a UUID string
    else:
        assert pair_groups.gpu_identity() == ""


@pytest.fixture
def endpoint() -> Iterator[torch_dist.TorchDistEndpoint]:
    ep = open_endpoint("torch_dist", EndpointOptions(stall_timeout_s=2.0))
    assert isinstance(ep, torch_dist.TorchDistEndpoint)
    yield ep
    ep.close()


def _pair_reply(address: str, payload: bytes) -> tuple[Frame, bytes]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5.0) as sock:
        send_frame(sock, Frame(FrameKind.PAIR, nbytes=len(payload)), [payload])
        reply = recv_frame(sock, bytearray(HEADER_NBYTES), "the PAIR reply")
        return reply, recv_control_payload(sock, reply)


@pytest.mark.parametrize("payload", [b"0123abcd", b'{"pair_id": "p"}', b"[1, 2]"])
def test_a_pair_offer_the_receiver_cannot_read_is_refused_with_an_error(
    endpoint: torch_dist.TorchDistEndpoint, payload: bytes
) -> None:
    reply, message = _pair_reply(endpoint.address, payload)
    assert reply.kind == FrameKind.ERROR
    assert b"malformed PAIR" in message


def test_a_host_receiver_answers_a_gpu_sender_with_a_gloo_pair(endpoint: torch_dist.TorchDistEndpoint) -> None:
    # a sender on a GPU offering to a receiver whose staging is in host memory: the receiver says "cpu"
    host, port = endpoint.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5.0) as sock:
        offer = json.dumps({"pair_id": "gpu-sender", "gpu": "GPU-elsewhere"}).encode()
        send_frame(sock, Frame(FrameKind.PAIR, nbytes=len(offer)), [offer])
        reply = recv_frame(sock, bytearray(HEADER_NBYTES), "the PAIR reply")
        assert reply.kind == FrameKind.PAIR
        assert json.loads(recv_control_payload(sock, reply)) == {"device": "cpu"}
        # the receiver now waits in the gloo rendezvous of that pair; closing the socket ends it


def _send(connector: torch_dist.TorchDistConnector, descriptor: TransferDescriptor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    tx = connector.open(descriptor, SenderOptions(timeout_s=5.0))
    layers = [(torch.randn(4, 2, 8), torch.randn(4, 2, 8)) for _ in range(SPEC.num_layers)]
    for i, (k, v) in enumerate(layers):
        tx.send_layer(i, k, v)
    tx.finish()
    return layers


def test_a_sender_pairs_over_what_the_receiver_chose(
    endpoint: torch_dist.TorchDistEndpoint, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the descriptor says the receiver stages on CUDA, but this receiver answers "cpu": the sender must
    # build its side of the group as the receiver's answer says, or the two ranks would never meet
    built: list[tuple[int, str]] = []
    make_group = torch_dist.make_group

    def recording(store: object, pair_id: str, rank: int, device: str, timeout_s: float) -> object:
        built.append((rank, device))
        return make_group(store, pair_id, rank, device, timeout_s)

    monkeypatch.setattr(torch_dist, "make_group", recording)  # the receiver's side
    monkeypatch.setattr(pair_groups, "make_group", recording)  # the sender's, in join_group
    connector = torch_dist.TorchDistConnector()
    try:
        rx = endpoint.expect("paired", 4, SPEC, lambda i, k, v: None)
        as_if_on_gpu = dataclasses.replace(rx.descriptor, device="cuda")
        with pytest.raises(KVRejected, match="sender descriptor"):  # it is not the descriptor the receiver made
            connector.open(as_if_on_gpu, SenderOptions(timeout_s=5.0))
        assert sorted(built) == [(0, "cpu"), (1, "cpu")]
        assert connector._pairs[rx.descriptor.address].device == "cpu"
        rx.cancel()
    finally:
        connector.close()


def test_a_transfer_refused_at_hello_keeps_the_pair_for_the_next(endpoint: torch_dist.TorchDistEndpoint) -> None:
    connector = torch_dist.TorchDistConnector()
    try:
        got: dict[int, torch.Tensor] = {}
        rx = endpoint.expect("known", 4, SPEC, lambda i, k, v: got.__setitem__(i, torch.cat([k, v]).clone()))
        with pytest.raises(KVRejected, match="no transfer expected"):
            connector.open(dataclasses.replace(rx.descriptor, request_id="stranger"), SenderOptions(timeout_s=5.0))
        pair = connector._pairs[rx.descriptor.address]
        assert not pair.broken  # the receiver refused before any tensor moved, and keeps its end too
        layers = _send(connector, rx.descriptor)
        rx.wait(5.0)
        assert connector._pairs[rx.descriptor.address] is pair and pair.transfers == 1
        assert all(torch.equal(got[i], torch.cat(layer)) for i, layer in enumerate(layers))
    finally:
        connector.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_workers_on_one_gpu_pair_over_gloo_into_cuda_staging() -> None:
    ep = open_endpoint("torch_dist", EndpointOptions(stall_timeout_s=5.0, device="cuda"))
    connector = torch_dist.TorchDistConnector()
    try:
        got: dict[int, torch.Tensor] = {}
        rx = ep.expect("one-gpu", 4, SPEC, lambda i, k, v: got.__setitem__(i, torch.cat([k, v]).cpu()))
        tx = connector.open(rx.descriptor, SenderOptions(timeout_s=10.0))
        layers = [(torch.randn(4, 2, 8, device="cuda"), torch.randn(4, 2, 8, device="cuda")) for _ in range(3)]
        for i, (k, v) in enumerate(layers):
            tx.send_layer(i, k, v)
        tx.finish()
        rx.wait(10.0)
        assert connector._pairs[rx.descriptor.address].device == "cpu"  # same GPU: NCCL would refuse it
        assert all(torch.equal(got[i], torch.cat(layer).cpu()) for i, layer in enumerate(layers))
    finally:
        connector.close()
        ep.close()
