"""The tcp transport's choice of TCP congestion control (SenderOptions.tcp_congestion), on real sockets."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from workers.kv.congestion import apply_congestion_control, chosen_algorithm, same_host
from workers.kv.errors import KVTransferError
from workers.kv.host import local_host_id
from workers.kv.interface import EndpointOptions, KVSpec, SenderOptions
from workers.kv.tcp import TcpConnector, TcpEndpoint

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CONGESTION"), reason="Linux socket option")

HOST_DEFAULT = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
SPEC = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, dtype="float16")


def _algorithm(sock: socket.socket) -> str:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0").decode()


@pytest.fixture
def loopback_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    peer, _ = server.accept()
    yield client, peer
    for sock in (client, peer, server):
        sock.close()


def test_auto_picks_reno_on_loopback(loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = loopback_pair
    assert same_host(client)
    assert apply_congestion_control(client, "auto") == "reno"
    assert _algorithm(client) == "reno"


def test_system_keeps_the_host_default(loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = loopback_pair
    assert apply_congestion_control(client, "system") is None
    assert _algorithm(client) == HOST_DEFAULT


def test_an_algorithm_named_explicitly_is_set(loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    """reno first, then the host's default by name (always allowed): the connection follows each time."""
    client, _ = loopback_pair
    assert apply_congestion_control(client, "reno") == "reno" and _algorithm(client) == "reno"
    assert apply_congestion_control(client, HOST_DEFAULT) == HOST_DEFAULT
    assert _algorithm(client) == HOST_DEFAULT


def test_an_unknown_algorithm_is_a_clear_error(loopback_pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = loopback_pair
    with pytest.raises(KVTransferError, match=r"tcp_congestion='nosuchcc' refused .*allows '.*reno"):
        apply_congestion_control(client, "nosuchcc")
    assert _algorithm(client) == HOST_DEFAULT  # left as it was


class _RemotePeer:
    """A connection's two addresses on different hosts (no second host to connect to here)."""

    def getsockname(self) -> tuple[str, int]:
        return ("10.0.0.5", 40000)

    def getpeername(self) -> tuple[str, int]:
        return ("10.0.0.6", 7000)


def test_auto_leaves_a_connection_to_another_host_to_the_host_default() -> None:
    remote = _RemotePeer()
    assert not same_host(remote)  # type: ignore[arg-type]
    assert not same_host(remote, "another-boot-id")  # type: ignore[arg-type]
    assert chosen_algorithm(remote, "auto") is None  # type: ignore[arg-type]
    assert chosen_algorithm(remote, "cubic") == "cubic"  # type: ignore[arg-type]


def test_auto_treats_a_receiver_whose_descriptor_names_this_host_as_same_host() -> None:
    """Two pods of one node: addresses of their own, one kernel (its boot id is in the descriptor)."""
    assert len(local_host_id()) == 36  # a UUID, the same in every process and container of this host
    remote = _RemotePeer()
    assert same_host(remote, local_host_id())  # type: ignore[arg-type]
    assert chosen_algorithm(remote, "auto", local_host_id()) == "reno"  # type: ignore[arg-type]


def test_endpoints_put_this_host_in_their_descriptors() -> None:
    endpoint = TcpEndpoint(EndpointOptions())
    try:
        assert endpoint.expect("h", 5, SPEC, lambda i, k, v: None).descriptor.host_id == local_host_id()
    finally:
        endpoint.close()


@pytest.mark.parametrize("bad", ["", "no such", "x" * 16, "bbr;"])
def test_sender_options_reject_malformed_names(bad: str) -> None:
    with pytest.raises(ValueError, match="tcp_congestion must be"):
        SenderOptions(tcp_congestion=bad)


@pytest.mark.parametrize(("choice", "expected"), [("auto", "reno"), ("system", HOST_DEFAULT)])
@pytest.mark.parametrize("poll_us", [0.0, 100.0, 5e6])
def test_tcp_transfers_use_the_chosen_algorithm_whether_the_receiver_sleeps_or_polls(
    choice: str, expected: str, poll_us: float
) -> None:
    """Layers land intact; the pooled data connection carries the algorithm the options asked for.

    poll_us 0: the receiver sleeps in recv at once; 5e6: it polls through every gap, END included.
    """
    endpoint = TcpEndpoint(EndpointOptions(stall_timeout_s=2.0, poll_us=poll_us))
    connector = TcpConnector()
    try:
        landed: dict[int, torch.Tensor] = {}
        for rid in ("a", "b"):  # the second request reuses the pooled connection
            landed.clear()
            rx = endpoint.expect(f"{rid}-{choice}-{poll_us}", 5, SPEC, lambda i, k, v: landed.update({i: k.clone()}))
            layers = [torch.randn(5, 2, 8).half() for _ in range(SPEC.num_layers)]
            with connector.open(rx.descriptor, SenderOptions(timeout_s=5, tcp_congestion=choice)) as sender:
                for i, k in enumerate(layers):
                    sender.send_layer(i, k, k)
                sender.finish()
            rx.wait(5)
            assert all(torch.equal(landed[i], k) for i, k in enumerate(layers))
        pooled = connector._pool.take(rx.descriptor.address)
        assert pooled is not None and _algorithm(pooled) == expected
        pooled.close()
    finally:
        connector.close()
        endpoint.close()


def test_a_socket_whose_peer_is_gone_counts_as_another_host() -> None:
    """getpeername fails on a connection already reset: no error here, the host's default stays."""
    sock = socket.socket()
    try:
        assert not same_host(sock)
        assert apply_congestion_control(sock, "auto") is None
    finally:
        sock.close()
