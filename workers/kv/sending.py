"""The sending side every transport shares: the pipelined sender, its layer queue and its threads.

``PipelinedSender.send_layer`` validates and queues the layer's tensors (a
bounded queue, so memory in flight is bounded) and returns; a background
thread hands each layer to the transport's ``SenderWire``, so layer i is on
the wire while the model computes layer i+1. The threads are kept and reused
across transfers (``SendThreads``): starting one costs 0.1-1 ms, a tenth of
a 16 MB transfer.

The wire carries the receiver's dtype (the descriptor's). A layer of the
descriptor's shape in another float dtype is converted on the way (a GPU engine
keeps a bf16 checkpoint in bf16, a CPU engine loads it as fp32): a CUDA layer on
the caller's stream when it is queued, a host layer on the sending thread, so
the caller goes on to the next layer meanwhile.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Callable
from typing import NoReturn, Protocol, cast

import torch

from workers.kv.descriptor import TransferDescriptor, TransferStats
from workers.kv.errors import KVPeerTimeout, KVTransferError, KVTransferTimeout
from workers.kv.interface import SenderOptions
from workers.kv.pipeline import dtype_name, torch_dtype


class SenderWire(Protocol):
    """The transport-specific half of a sender: moves one layer, then ends the transfer.

    A wire that holds bytes back to send them with the next layer defines ``flush()``: the
    sending thread calls it whenever it runs out of queued layers. A wire that can put several
    layers on the wire at once defines ``send_layers(layers)`` (a list of ``(layer_idx, k, v)``):
    the sending thread hands it every layer that is queued when it looks. A wire that defines
    ``end()`` gets it called on the sending thread right after the last layer, to send what it
    held back and its end mark at once; ``finish()`` then only waits for the verdict.
    """

    def send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        """Put one layer on the wire (called from the sending thread only)."""
        ...

    def finish(self) -> None:
        """Mark the end and wait for the receiver's verdict; raise its error."""
        ...

    def close(self) -> None:
        """Release the connection (without an end mark if finish was not called); idempotent."""
        ...


class SendThreads:
    """Daemon threads that run senders' loops, reused across transfers; an idle one exits after ``idle_s``."""

    def __init__(self, idle_s: float = 60.0) -> None:
        self._idle_s = idle_s
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # a forked child has none of the parent's threads

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._idle = 0  # threads waiting for a job that no submitted job has claimed yet
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on an idle thread, or on a new one if none is idle."""
        with self._lock:
            spawn = self._idle == 0
            if not spawn:
                self._idle -= 1
        self._jobs.put(job)
        if spawn:
            threading.Thread(target=self._loop, name="kv-send", daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # more idle threads than queued jobs: this one may go
                        self._idle -= 1
                        return
                continue  # a job was claimed for the idle threads and is about to be queued
            try:
                job()
            finally:
                with self._lock:
                    self._idle += 1


SEND_THREADS = SendThreads()
_STOP = object()
# dtypes a layer may be sent in when the descriptor names another of them; fp8 caches are left out:
# they carry scales that a plain cast would drop
_CONVERTIBLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
_Item = tuple[int, torch.Tensor, torch.Tensor, "torch.cuda.Event | None"]


class _LayerQueue:
    """The layers between ``send_layer`` and the sending thread: FIFO, at most ``limit`` waiting at once.

    A C ``SimpleQueue`` beside two counters, each written by one thread only (layers put, by the
    producer; layers taken, by the sending thread). ``queue.Queue``'s locking in Python cost
    1.5-3 us a layer, ~0.1 ms of a transfer's 32 layers before the first byte went out.
    """

    def __init__(self, limit: int) -> None:
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._limit = limit
        self._put = 0
        self._taken = 0
        self._room = threading.Event()  # set by the sending thread whenever it took layers

    def put(self, item: _Item, timeout_s: float) -> bool:
        """Queue a layer, waiting while ``limit`` are queued; False if none was taken within ``timeout_s``."""
        if self._put - self._taken >= self._limit:
            deadline = time.monotonic() + timeout_s
            while self._put - self._taken >= self._limit:
                self._room.clear()
                # re-checked after clearing: a take between the check above and the clear set it too early
                if self._put - self._taken < self._limit:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._room.wait(left)
        self._put += 1
        self._items.put(item)
        return True

    def put_stop(self) -> None:
        """Tell the sending thread to return once it took what is queued before (never waits)."""
        self._items.put(_STOP)

    def empty(self) -> bool:
        """Whether nothing is queued."""
        return self._items.empty()

    def take(self, every: bool) -> tuple[list[_Item], bool]:
        """Wait for the next item, then take it (and, with ``every``, all queued after it): (layers, stop seen)."""
        item = self._items.get()
        layers: list[_Item] = []
        while item is not _STOP:
            layers.append(cast(_Item, item))
            if not every or self._items.empty():
                break
            item = self._items.get_nowait()
        if layers:
            self._taken += len(layers)
            self._room.set()
        return layers, item is _STOP


class PipelinedSender:
    """A KVSender: validates layers, queues them, and sends from a background thread."""

    def __init__(self, descriptor: TransferDescriptor, wire: SenderWire, options: SenderOptions) -> None:
        self._desc = descriptor
        self._wire = wire
        self._options = options
        self._queue = _LayerQueue(max(1, options.max_inflight_layers))
        self._queued: set[int] = set()
        self._error: BaseException | None = None
        self._closed = False
        self._blocked_s = 0.0
        self._wire_s = 0.0
        self._t_first: float | None = None
        self._shape = (descriptor.num_tokens, descriptor.num_kv_heads, descriptor.head_dim)
        self._dtype = torch_dtype(descriptor.dtype)
        self._stopped = threading.Event()  # set when the sending loop returned
        self._flush: Callable[[], None] | None = getattr(wire, "flush", None)
        self._send_many: Callable[[list[tuple[int, torch.Tensor, torch.Tensor]]], None] | None = getattr(
            wire, "send_layers", None
        )
        self._end: Callable[[], None] | None = getattr(wire, "end", None)
        SEND_THREADS.submit(self._run)

    def send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Queue one layer's K/V; blocks only while ``max_inflight_layers`` layers are still unsent.

        K and V have the descriptor's shape, and its dtype or another float dtype, which is sent
        converted to the descriptor's (the receiver's): bf16 to fp32 exactly, fp32 to bf16 rounded.
        """
        self._raise_if_failed()
        if self._closed:
            raise KVTransferError(f"request {self._desc.request_id!r}: send_layer after finish/abort")
        if not 0 <= layer_idx < self._desc.num_layers:
            raise ValueError(f"layer_idx {layer_idx} out of range [0, {self._desc.num_layers})")
        if layer_idx in self._queued:
            raise ValueError(f"layer {layer_idx} sent twice for request {self._desc.request_id!r}")
        if k.shape != self._shape or v.shape != self._shape or k.dtype != self._dtype or v.dtype != self._dtype:
            if not (self._fits(k) and self._fits(v)):
                self._refuse(layer_idx, k, v)
        t0 = time.perf_counter()
        if self._t_first is None:
            self._t_first = t0
        ready = None
        if k.is_cuda:
            # the conversion and copies are queued on the caller's stream, so the event that the
            # sending thread waits for is recorded after them
            k, v = k.to(self._dtype).contiguous(), v.to(self._dtype).contiguous()
            ready = torch.cuda.Event()
            ready.record()
        else:  # a host layer in another dtype is converted on the sending thread (_send_batch)
            k, v = k.contiguous(), v.contiguous()
        if not self._queue.put((layer_idx, k, v, ready), self._options.timeout_s):
            self._error = KVPeerTimeout(
                f"request {self._desc.request_id!r}: layer {layer_idx} not accepted within "
                f"{self._options.timeout_s}s (receiver too slow or stalled)"
            )
            self._raise_if_failed()  # the sending thread and the connection go with it
        self._blocked_s += time.perf_counter() - t0
        self._queued.add(layer_idx)

    def _fits(self, t: torch.Tensor) -> bool:
        """Whether ``t`` has the descriptor's shape, and its dtype or one that converts to it."""
        if tuple(t.shape) != self._shape:
            return False
        convertible = t.dtype in _CONVERTIBLE_DTYPES and self._dtype in _CONVERTIBLE_DTYPES
        return t.dtype == self._dtype or convertible

    def _refuse(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> NoReturn:
        """Raise the ValueError naming the first of K and V whose shape or dtype the descriptor refuses."""
        for name, t in (("k", k), ("v", v)):
            if not self._fits(t):
                raise ValueError(
                    f"{name} of layer {layer_idx} is {tuple(t.shape)} {dtype_name(t.dtype)}, "
                    f"descriptor expects {self._shape} {self._desc.dtype}"
                )
        raise AssertionError("_refuse called for a layer that matches the descriptor")

    def finish(self) -> TransferStats:
        """Wait for every layer to be sent and verified by the receiver."""
        self._raise_if_failed()
        missing = sorted(set(range(self._desc.num_layers)) - self._queued)
        if missing:
            self.abort()
            raise KVTransferError(f"request {self._desc.request_id!r}: finish() with layers {missing} never sent")
        self._closed = True
        self._queue.put_stop()
        self._stopped.wait(timeout=self._options.timeout_s * 2)
        try:
            if not self._stopped.is_set():
                raise KVTransferTimeout(f"request {self._desc.request_id!r}: sending did not finish in time")
            self._raise_if_failed()
            t0 = time.perf_counter()
            self._wire.finish()
            self._wire_s += time.perf_counter() - t0
        finally:
            self._wire.close()
        seconds = time.perf_counter() - (self._t_first or time.perf_counter())
        return TransferStats(
            self._desc.request_id, self._desc.kind, self._desc.total_nbytes, self._desc.num_layers,
            seconds, self._blocked_s, self._wire_s,
        )

    def abort(self) -> None:
        """Stop sending; the receiver sees the connection end without an end mark."""
        if self._error is None:
            self._error = KVTransferError(f"request {self._desc.request_id!r}: transfer aborted by sender")
        self._wire.close()  # first: unblocks a sending thread stuck on a stalled peer
        if not self._closed:
            self._closed = True
            self._queue.put_stop()  # the thread drains the queue once the error is set
        self._stopped.wait(timeout=self._options.timeout_s)

    def __enter__(self) -> PipelinedSender:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            # the connection and the sending thread go now: a caller that catches the error without
            # calling abort() must leak neither (nor hold a torch_dist pair's lock)
            self.abort()
            raise self._error

    def _run(self) -> None:
        try:
            self._send_queued()
        finally:
            self._stopped.set()

    def _send_queued(self) -> None:
        while True:
            if self._flush is not None and self._error is None and self._queue.empty():
                try:
                    self._flush()  # nothing queued: what the wire held back for the next layer goes now
                except BaseException as exc:  # surfaced to the caller on its next call
                    self._error = exc
            # every layer queued by now goes in one call to a wire that takes several
            batch, stop = self._queue.take(every=self._send_many is not None)
            if batch and self._error is None:  # else drain, so producers never block on a dead transfer
                try:
                    self._send_batch(batch)
                except BaseException as exc:  # surfaced to the caller on its next call
                    self._error = exc
            if stop:
                # finish() queued the stop after every layer: the end mark leaves now, ~30-50 us before
                # the caller's thread wakes to send it (an abort sets the error before its stop)
                if self._end is not None and self._error is None:
                    try:
                        self._end()
                    except BaseException as exc:  # finish() raises it
                        self._error = exc
                return

    def _send_batch(self, batch: list[_Item]) -> None:
        """Put queued layers on the wire: runs of host layers through ``send_layers`` where the wire has it.

        A CUDA layer goes alone once its producer's event completed (a run would wait for the last
        one's), as does a layer the fault-injection hook damages.
        """
        fault = self._options.fault
        send_many = self._send_many
        run: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        t0 = time.perf_counter()
        for layer_idx, k, v, ready in batch:
            if k.dtype != self._dtype or v.dtype != self._dtype:  # a host layer (CUDA ones are converted)
                k, v = k.to(self._dtype), v.to(self._dtype)
            corrupt = fault is not None and fault.corrupt_layer_idx == layer_idx
            if send_many is not None and ready is None and not corrupt:
                run.append((layer_idx, k, v))
                continue
            if send_many is not None and run:
                send_many(run)
                run = []
            if ready is not None:
                ready.synchronize()  # K/V were produced on the caller's CUDA stream
            self._wire.send_layer(layer_idx, k, v, corrupt)
        if send_many is not None and run:
            send_many(run)
        self._wire_s += time.perf_counter() - t0
