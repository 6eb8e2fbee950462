"""PipelinedSender's queue: at most max_inflight_layers layers wait for the sending thread, in order.

The wire here is a small SenderWire that records what it is handed and can be held mid-send,
as a stalled peer holds a socket's send.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from workers.kv.descriptor import TransferDescriptor, TransportKind
from workers.kv.errors import KVTransferTimeout
from workers.kv.interface import SenderOptions
from workers.kv.sending import PipelinedSender

NUM_LAYERS, TOKENS, HEADS, DIM = 8, 4, 2, 8


class HeldWire:
    """Records each layer it is handed; ``send_layer`` waits while ``hold`` is clear."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hold = threading.Event()
        self.entered = threading.Event()  # set once the sending thread is inside send_layer
        self.finished = False

    def send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        self.entered.set()
        assert self.hold.wait(10), "the test never released the wire"
        self.sent.append(layer_idx)
        self.layers[layer_idx] = (k, v)

    def finish(self) -> None:
        self.finished = True

    def close(self) -> None:
        self.hold.set()


def _sender(wire: HeldWire, max_inflight: int, timeout_s: float) -> PipelinedSender:
    descriptor = TransferDescriptor("q", TransportKind.MEMORY, "here", TOKENS, NUM_LAYERS, HEADS, DIM, "float32")
    return PipelinedSender(descriptor, wire, SenderOptions(timeout_s=timeout_s, max_inflight_layers=max_inflight))


def _layer() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(TOKENS, HEADS, DIM), torch.zeros(TOKENS, HEADS, DIM)


def test_send_layer_fails_after_the_timeout_while_max_inflight_layers_wait() -> None:
    wire = HeldWire()
    sender = _sender(wire, max_inflight=2, timeout_s=0.3)
    sender.send_layer(0, *_layer())
    assert wire.entered.wait(5)  # layer 0 is on the (stalled) wire, out of the queue
    sender.send_layer(1, *_layer())
    sender.send_layer(2, *_layer())  # two waiting: the limit
    t0 = time.monotonic()
    with pytest.raises(KVTransferTimeout, match="layer 3 not accepted within 0.3s"):
        sender.send_layer(3, *_layer())
    assert 0.25 <= time.monotonic() - t0 < 5
    sender.abort()
    assert wire.sent == [0]  # nothing sent once the transfer failed: the queued layers were dropped


def test_a_waiting_send_layer_goes_on_once_the_thread_takes_a_layer_and_order_holds() -> None:
    wire = HeldWire()
    sender = _sender(wire, max_inflight=2, timeout_s=10)
    sender.send_layer(0, *_layer())
    assert wire.entered.wait(5)
    sender.send_layer(1, *_layer())
    sender.send_layer(2, *_layer())
    done = threading.Event()

    def third() -> None:
        sender.send_layer(3, *_layer())
        done.set()

    threading.Thread(target=third, daemon=True).start()
    assert not done.wait(0.3)  # no room while the wire holds layer 0
    wire.hold.set()
    assert done.wait(5)
    for i in range(4, NUM_LAYERS):
        sender.send_layer(i, *_layer())
    stats = sender.finish()
    assert wire.sent == list(range(NUM_LAYERS)) and wire.finished
    assert stats.num_layers == NUM_LAYERS


def test_layers_that_match_the_descriptor_only_are_queued() -> None:
    wire = HeldWire()
    wire.hold.set()
    sender = _sender(wire, max_inflight=4, timeout_s=5)
    k, v = _layer()
    with pytest.raises(ValueError, match=r"v of layer 0 is \(4, 2, 8\) int32, descriptor expects \(4, 2, 8\) float"):
        sender.send_layer(0, k, v.int())
    with pytest.raises(ValueError, match=r"k of layer 0 is \(2, 2, 8\) float32"):
        sender.send_layer(0, k[:2], v)
    with pytest.raises(ValueError, match=r"k of layer 0 is \(2, 2, 8\) bfloat16, descriptor expects \(4, 2, 8\)"):
        sender.send_layer(0, k[:2].bfloat16(), v.bfloat16())  # a float dtype converts; a shape never
    with pytest.raises(ValueError, match=r"v of layer 0 is \(4, 2, 8\) float8_e4m3fn"):
        sender.send_layer(0, k, v.to(torch.float8_e4m3fn))  # fp8 carries scales a cast would drop
    sender.send_layer(0, k, v)
    sender.abort()


def test_a_layer_in_another_float_dtype_reaches_the_wire_in_the_descriptors_dtype() -> None:
    wire = HeldWire()
    wire.hold.set()
    sender = _sender(wire, max_inflight=4, timeout_s=5)
    gen = torch.Generator().manual_seed(0)
    layers = [
        (torch.randn(TOKENS, HEADS, DIM, generator=gen).to(dtype), torch.randn(TOKENS, HEADS, DIM, generator=gen))
        for dtype in (torch.bfloat16, torch.float16, torch.float64, torch.float32)
    ]
    strided = [torch.randn(HEADS, TOKENS, DIM, generator=gen).bfloat16().transpose(0, 1) for _ in "kv"]
    layers.append((strided[0], strided[1]))
    layers += [_layer() for _ in range(NUM_LAYERS - len(layers))]
    for i, (k, v) in enumerate(layers):
        sender.send_layer(i, k, v)
    sender.finish()
    for i, (k, v) in enumerate(layers):
        got_k, got_v = wire.layers[i]
        assert got_k.dtype == got_v.dtype == torch.float32 and got_k.is_contiguous() and got_v.is_contiguous()
        assert torch.equal(got_k.view(torch.int32), k.float().view(torch.int32))
        assert torch.equal(got_v.view(torch.int32), v.float().view(torch.int32))
