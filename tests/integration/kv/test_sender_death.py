"""A sender process killed mid-transfer surfaces as an error on the receiver within the deadline."""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import Connection

import pytest

from workers.kv.errors import KVTransferError
from workers.kv.interface import EndpointOptions, KVSpec
from workers.kv.registry import open_endpoint

pytestmark = pytest.mark.slow

DEADLINE_S = 3.0  # the receiver's stall timeout
SLACK_S = 2.0


def _send_two_layers_then_hang(conn: Connection, descriptor_json: str) -> None:
    import torch

    from workers.kv.descriptor import TransferDescriptor
    from workers.kv.registry import KVClient

    torch.set_num_threads(1)
    desc = TransferDescriptor.from_json(descriptor_json)
    sender = KVClient().open(desc)
    shape = (desc.num_tokens, desc.num_kv_heads, desc.head_dim)
    for i in range(2):
        sender.send_layer(i, torch.randn(shape), torch.randn(shape))
    conn.send("sent")
    time.sleep(600)  # never finishes: the test kills this process


KINDS: list[object] = [
    "tcp", "shm", "torch_dist",
    pytest.param("nixl", marks=pytest.mark.skipif(
        importlib.util.find_spec("nixl") is None, reason="optional NIXL not installed")),
]


@pytest.mark.parametrize("kind", KINDS)
def test_killed_sender_fails_the_transfer_within_the_deadline(kind: str) -> None:
    endpoint = open_endpoint(kind, EndpointOptions(stall_timeout_s=DEADLINE_S))
    landed: list[int] = []
    try:
        spec = KVSpec(num_layers=8, num_kv_heads=2, head_dim=64, dtype="float32")
        rx = endpoint.expect(f"doomed-{kind}", 256, spec, lambda i, k, v: landed.append(i))
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_send_two_layers_then_hang, args=(child, rx.descriptor.to_json()), daemon=True)
        proc.start()
        try:
            assert parent.poll(60), "sender process did not start"
            assert parent.recv() == "sent"
            deadline = time.monotonic() + 10
            while len(landed) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(KVTransferError, match=f"doomed-{kind}"):
                rx.wait(60)
            elapsed_s = time.monotonic() - t0
        finally:
            proc.kill()
            proc.join(10)
        assert elapsed_s < DEADLINE_S + SLACK_S
        assert landed == [0, 1]
        if os.path.isdir("/dev/shm"):  # shm rings are anonymous memory files: nothing named is left behind
            assert not [name for name in os.listdir("/dev/shm") if "pdserve" in name]
    finally:
        endpoint.close()
