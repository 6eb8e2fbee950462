"""The transport registry: enum keys, lazy imports, clear errors for missing backends."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workers.kv.descriptor import TransportKind
from workers.kv.errors import KVBackendUnavailable
from workers.kv.registry import BACKENDS, KVClient, open_connector, open_endpoint, parse_kind


def test_every_kind_has_a_backend_entry() -> None:
    assert set(BACKENDS) == set(TransportKind)


def test_parse_kind() -> None:
    assert parse_kind("shm") is TransportKind.SHM
    assert parse_kind(TransportKind.TCP) is TransportKind.TCP
    with pytest.raises(ValueError, match="unknown transport 'udp'"):
        parse_kind("udp")


@pytest.mark.slow  # a fresh interpreter importing torch
def test_backends_are_imported_only_when_used() -> None:
    code = (
        "import sys, workers.kv.registry as r\n"
        "assert not any(m in sys.modules for m in ('torch', 'workers.kv.tcp', 'workers.kv.torch_dist'))\n"
        "r.open_endpoint('tcp').close()\n"
        "assert 'workers.kv.tcp' in sys.modules and 'workers.kv.torch_dist' not in sys.modules\n"
        "print('lazy')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lazy"


def test_uninstalled_rdma_backends_say_what_to_install() -> None:
    with pytest.raises(KVBackendUnavailable, match="pip install mooncake"):
        open_endpoint(TransportKind.MOONCAKE)
    with pytest.raises(KVBackendUnavailable, match="pip install mooncake"):
        open_connector(TransportKind.MOONCAKE)


@pytest.mark.slow  # a fresh interpreter importing torch
def test_missing_nixl_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['nixl'] = None  # as if not installed\n"
        "from workers.kv.registry import open_endpoint\n"
        "from workers.kv.errors import KVBackendUnavailable\n"
        "try:\n    open_endpoint('nixl')\nexcept KVBackendUnavailable as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install nixl-cu12" in out.stdout


@pytest.mark.parametrize("kind", [TransportKind.MEMORY, TransportKind.TCP, TransportKind.SHM])
def test_endpoints_open_and_close(kind: TransportKind) -> None:
    endpoint = open_endpoint(kind)
    try:
        assert endpoint.kind is kind
    finally:
        endpoint.close()


def test_client_caches_one_connector_per_kind() -> None:
    from workers.kv.interface import KVSpec

    endpoint = open_endpoint("memory")
    client = KVClient()
    try:
        spec = KVSpec(1, 1, 4, "float32")
        for rid in ("a", "b"):
            rx = endpoint.expect(rid, 2, spec, lambda i, k, v: None)
            import torch

            tx = client.open(rx.descriptor)
            tx.send_layer(0, torch.zeros(2, 1, 4), torch.ones(2, 1, 4))
            tx.finish()
            rx.wait(5)
        assert len(client._connectors) == 1
    finally:
        client.close()
        endpoint.close()
