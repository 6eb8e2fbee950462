"""The shm transport's rings never appear in /dev/shm and vanish with the processes that map them."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import Connection

import pytest
import torch

from workers.kv.errors import KVTransferError
from workers.kv.interface import EndpointOptions, KVSpec, SenderOptions
from workers.kv.registry import KVClient

pytestmark = pytest.mark.slow

SPEC = KVSpec(num_layers=8, num_kv_heads=2, head_dim=64, dtype="float32")
NUM_TOKENS = 512
RING_NAME = "memfd:pdserve-kv-ring"


def _receive_forever(conn: Connection) -> None:
    torch.set_num_threads(1)
    from workers.kv.registry import open_endpoint

    endpoint = open_endpoint("shm", EndpointOptions(stall_timeout_s=60))
    landed: list[int] = []
    rx = endpoint.expect("doomed", NUM_TOKENS, SPEC, lambda i, k, v: landed.append(i))
    conn.send(rx.descriptor.to_json())
    while True:
        conn.send(len(landed))
        time.sleep(0.05)


def _pdserve_files() -> set[str]:
    return {name for name in os.listdir("/dev/shm") if "pdserve" in name} if os.path.isdir("/dev/shm") else set()


def _ring_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as maps:
        return sum(RING_NAME in line for line in maps)


def test_killed_receiver_leaves_no_ring_behind() -> None:
    from workers.kv.descriptor import TransferDescriptor

    before = _pdserve_files()
    mapped_before = _ring_mappings(os.getpid())
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_receive_forever, args=(child,), daemon=True)
    proc.start()
    client = KVClient(SenderOptions(timeout_s=3.0))
    try:
        assert parent.poll(60), "receiver process did not start"
        desc = TransferDescriptor.from_json(parent.recv())
        sender = client.open(desc)
        shape = (NUM_TOKENS, SPEC.num_kv_heads, SPEC.head_dim)
        for i in range(2):
            sender.send_layer(i, torch.randn(shape), torch.randn(shape))
        deadline = time.monotonic() + 10
        while parent.recv() < 2 and time.monotonic() < deadline:
            pass
        assert proc.pid is not None
        # mid-transfer: the ring is mapped by both processes, and has no name in /dev/shm
        assert _ring_mappings(proc.pid) == 1 and _ring_mappings(os.getpid()) == mapped_before + 1
        assert _pdserve_files() == before
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        try:
            for i in range(2, SPEC.num_layers):
                sender.send_layer(i, torch.randn(shape), torch.randn(shape))
            sender.finish()
        except KVTransferError:
            pass
        else:
            raise AssertionError("the transfer to a killed receiver succeeded")
    finally:
        proc.kill()
        proc.join(10)
        client.close()
    assert _pdserve_files() == before
    assert _ring_mappings(os.getpid()) == mapped_before  # the sender's mapping went with its connector
