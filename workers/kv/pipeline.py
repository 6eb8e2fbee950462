"""Pieces every transport shares: the views a wire sends from, the pending-transfer table, staging buffers.

The sending side (the pipelined sender, its queue and threads) is in
workers.kv.sending. Receiving: the endpoint's I/O thread reads a layer into
a reused staging buffer (or a shared-memory slot) and
``PendingTransfer.deliver``, called on that thread, verifies the checksum and
calls the engine's callback with views of it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from workers.kv.checksum import checksum_buffer, copy_and_checksum, device_checksum, kernel_hashes_every_block
from workers.kv.descriptor import TransferDescriptor, TransferStats, TransportKind
from workers.kv.errors import KVChecksumError, KVPeerTimeout, KVTransferError, KVTransferTimeout
from workers.kv.host import local_host_id
from workers.kv.interface import KVSpec, LayerCallback


def dtype_name(dtype: torch.dtype) -> str:
    """torch dtype -> the descriptor's dtype name ("float32")."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    """The descriptor's dtype name -> torch dtype."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise KVTransferError(f"unknown dtype {name!r}")
    return dtype


_NUMPY_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int32, torch.int64})


def as_bytes(t: torch.Tensor) -> memoryview:
    """Byte view of a contiguous CPU tensor (no copy)."""
    if t.dtype in _NUMPY_DTYPES and t.numel() and not t.requires_grad:
        return t.numpy().data.cast("B")  # ~1.7 us; the uint8 view below costs ~4 us per tensor
    return t.view(torch.uint8).numpy().reshape(-1).data  # numpy's reshape costs ~1 us, torch's ~20 us here


MemoryPiece = tuple[int, int]  # (address, nbytes) of memory the kernel reads in place


def kernel_layer_parts(
    layers: list[tuple[int, torch.Tensor, torch.Tensor]],
) -> tuple[list[tuple[MemoryPiece, MemoryPiece]], int] | None:
    """Each layer's K and V as kernel memory pieces, and the layer size; None where the kernel cannot take them.

    The pieces name the tensors' memory by address (a numpy view of each cost 1-3 us, a tenth of
    a 16 MB transfer's time over its 64 tensors): ``layers`` must outlive the kernel call. Not for
    CUDA layers (staged one at a time through one pinned buffer) or non-contiguous ones, nor for
    sizes whose last checksum block is too short for the kernel. The layers of a request share one size.
    """
    _, k0, v0 = layers[0]
    nbytes = k0.nbytes + v0.nbytes
    if not kernel_hashes_every_block(nbytes):
        return None
    parts = []
    for _, k, v in layers:
        if not (k.is_cpu and v.is_cpu and k.is_contiguous() and v.is_contiguous()):
            return None
        parts.append(((k.data_ptr(), k.nbytes), (v.data_ptr(), v.nbytes)))
    return parts, nbytes


class HostStager:
    """Host copies of CUDA tensors in one reused pinned buffer; CPU tensors pass through.

    The copies run on a stream of their own. Callers stage a layer once its producer's event has
    completed (``PipelinedSender`` waits for it), and on the device's default stream they would also
    wait for every later layer the model has queued there since, losing the layer-wise overlap.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None
        self._stream: torch.cuda.Stream | None = None

    def parts(self, k: torch.Tensor, v: torch.Tensor) -> tuple[memoryview, memoryview]:
        """Byte views of k and v in host memory."""
        if not k.is_cuda:
            return as_bytes(k), as_bytes(v)
        nbytes = k.numel() * k.element_size()
        if self._buffer is None or self._buffer.numel() < 2 * nbytes:
            self._buffer = torch.empty(2 * nbytes, dtype=torch.uint8, pin_memory=True)
        if self._stream is None or self._stream.device != k.device:
            self._stream = torch.cuda.Stream(k.device)
        with torch.cuda.stream(self._stream):
            self._buffer[:nbytes].copy_(k.reshape(-1).view(torch.uint8), non_blocking=True)
            self._buffer[nbytes : 2 * nbytes].copy_(v.reshape(-1).view(torch.uint8), non_blocking=True)
        self._stream.synchronize()
        view = self._buffer.numpy().data
        return view[:nbytes], view[nbytes : 2 * nbytes]


def corrupted(view: memoryview) -> memoryview:
    """A copy of ``view`` with its first byte flipped (fault injection only)."""
    damaged = bytearray(view)
    damaged[0] ^= 0xFF
    return memoryview(damaged)


def _verified_copy(payload: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A private copy of a CPU ``payload`` and the checksum of exactly the bytes copied, in one pass.

    Verifying a shared slot this way costs no read of its own (workers.kv.checksum), and a sender
    that rewrote the slot after announcing it cannot make the kept bytes differ from the verified ones.
    """
    copy = torch.empty_like(payload)
    return copy, copy_and_checksum(copy.numpy(), (payload.numpy().data,))


# K/V views of a transport buffer: (address, bytes, dtype, (2, tokens, heads, dim)) -> (k, v)
ViewCache = dict[tuple[int, int, torch.dtype, tuple[int, int, int, int]], tuple[torch.Tensor, torch.Tensor]]
_MAX_CACHED_VIEWS = 256  # more than a ring has slots (128) or a connection has staging buffers


@dataclass
class _Progress:
    layers: set[int]
    t_first: float | None = None
    t_done: float | None = None


class PendingTransfer:
    """A KVReceiver: collects verified layers of one request and reports completion or failure."""

    def __init__(
        self, descriptor: TransferDescriptor, on_layer: LayerCallback, table: PendingTable, keep: bool = False,
        stall_timeout_s: float | None = None,
    ) -> None:
        self._desc = descriptor
        # without a socket whose timeout notices a silent sender (the in-process transport), wait() does
        self._stall_s = stall_timeout_s
        self._t_progress: float | None = None  # monotonic time of the claim or the last verified layer
        self._on_layer = on_layer
        self._keep = keep
        self._table = table
        self._progress = _Progress(layers=set())
        self._done = threading.Event()
        self._error: KVTransferError | None = None
        # Held while the callback writes into the engine's blocks, and by fail(): once fail() returns,
        # no callback is running or will run, so the caller may free the reserved blocks.
        self._lock = threading.RLock()
        self._dtype = torch_dtype(descriptor.dtype)
        self._kv_shape = (2, descriptor.num_tokens, descriptor.num_kv_heads, descriptor.head_dim)
        self._view_cache: ViewCache = {}  # this transfer's, by payload address; emptied at the end

    @property
    def descriptor(self) -> TransferDescriptor:
        """What the sender needs to reach this receiver."""
        return self._desc

    @property
    def failed(self) -> bool:
        """Whether the transfer already failed (later layers are dropped)."""
        return self._error is not None

    def deliver(
        self, layer_idx: int, payload: torch.Tensor, checksum: int, actual: int | None = None,
        views: ViewCache | None = None,
    ) -> None:
        """Verify one layer held in ``payload`` (uint8, layer_nbytes) and hand it to the callback.

        ``actual`` is the payload's checksum when the transport computed it while receiving.
        ``views``: K/V views of the transport's buffers, kept by the transport across transfers for as
        long as those buffers stay mapped (a shm ring); without it they are cached for this transfer.
        """
        if self._error is not None:
            raise self._error
        rid = self._desc.request_id
        if not 0 <= layer_idx < self._desc.num_layers or layer_idx in self._progress.layers:
            raise self.fail(KVTransferError(f"request {rid!r}: unexpected layer {layer_idx}"))
        if self._progress.t_first is None:
            self._progress.t_first = time.perf_counter()
        copied = self._keep and actual is None and not payload.is_cuda  # a slot: copy and verify in one pass
        if copied:
            payload, actual = _verified_copy(payload)
            k, v = self._split(payload)
        else:
            # views before the hash: made after it, with torch's own data flushed from the cache by the
            # payload, they cost a shm receiver ~13 us a layer instead of ~9
            k, v = self._views(payload, views)
            if actual is None:
                actual = device_checksum(payload) if payload.is_cuda else checksum_buffer(payload.numpy().data)
        if actual != checksum:
            raise self.fail(KVChecksumError(rid, layer_idx, f"sender {checksum:#018x}, received {actual:#018x}"))
        if self._keep and not copied:  # verified in a buffer only this process writes (or on the device)
            k, v = k.clone(), v.clone()
            if payload.is_cuda:  # complete before the callback hands them to a thread on another stream
                torch.cuda.current_stream(payload.device).synchronize()
        with self._lock:
            if self._error is not None:  # failed (timed out, cancelled) while this layer was verified
                raise self._error
            try:
                self._on_layer(layer_idx, k, v)
                if payload.is_cuda:  # what the callback queued on this stream (a copy into the cache) is done
                    torch.cuda.current_stream(payload.device).synchronize()
            except Exception as exc:
                raise self.fail(KVTransferError(f"request {rid!r}: on_layer({layer_idx}) failed: {exc!r}")) from exc
            self._progress.layers.add(layer_idx)
            self._t_progress = time.monotonic()

    def _split(self, payload: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as views of ``payload``.

        One (2, tokens, heads, dim) view indexed twice: half the torch calls of viewing each half
        (2.9 vs 5.5 us here, and ~16 us on a shm receiver whose caches its hashing just flushed).
        """
        if payload.numel() != 2 * self._desc.tensor_nbytes:
            payload = payload[: 2 * self._desc.tensor_nbytes]
        both = payload.view(self._dtype).view(self._kv_shape)
        return both[0], both[1]

    def _views(self, payload: torch.Tensor, cache: ViewCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V views of a reused buffer; cached per buffer, since transports reuse a few (~15 us saved a layer)."""
        if cache is None:
            cache = self._view_cache
        key = (payload.data_ptr(), payload.numel(), self._dtype, self._kv_shape)
        views = cache.get(key)
        if views is None:
            if len(cache) >= _MAX_CACHED_VIEWS:  # a transport that does not reuse buffers
                cache.clear()
            views = cache[key] = self._split(payload)
        return views

    def complete(self) -> None:
        """The sender marked the end; succeed if every layer landed."""
        with self._lock:
            if self._error is not None:
                raise self._error
            got = len(self._progress.layers)
            if got != self._desc.num_layers:
                raise self.fail(
                    KVTransferError(f"request {self._desc.request_id!r}: end after {got}/{self._desc.num_layers} layers")
                )
            self._progress.t_done = time.perf_counter()
            self._done.set()
            self._view_cache.clear()  # no view of a reused buffer outlives the transfer
        self._table.remove(self)

    def fail(self, error: KVTransferError) -> KVTransferError:
        """Record the first failure, wake waiters, and return the recorded error (waits for a running callback)."""
        with self._lock:
            if self._error is None and not self._done.is_set():
                self._error = error
                self._done.set()
            self._view_cache.clear()
            recorded = self._error or error
        self._table.remove(self)
        return recorded

    def cancel(self) -> None:
        """Give up on this transfer."""
        self.fail(KVTransferError(f"request {self._desc.request_id!r}: cancelled by receiver"))

    def claimed(self) -> None:
        """A sender connected: from now on, a stall timeout counts its silence."""
        self._t_progress = time.monotonic()

    def wait(self, timeout_s: float) -> TransferStats:
        """Block until every layer landed or the transfer failed; KVTransferTimeout after ``timeout_s``.

        With a stall timeout, a sender that connected and then sent nothing for that long fails it sooner.
        """
        deadline = time.monotonic() + timeout_s
        rid = self._desc.request_id
        while not self._done.is_set():
            now = time.monotonic()
            got = len(self._progress.layers)
            if now >= deadline:
                self.fail(KVTransferTimeout(f"request {rid!r}: {got}/{self._desc.num_layers} layers after {timeout_s}s"))
                break
            step = deadline - now
            if self._stall_s is not None and self._t_progress is not None:
                silent = now - self._t_progress
                if silent >= self._stall_s:
                    self.fail(KVPeerTimeout(
                        f"request {rid!r}: sender silent for {self._stall_s}s after {got}/{self._desc.num_layers} layers"
                    ))
                    break
                step = min(step, self._stall_s - silent)
            self._done.wait(step)
        if self._error is not None:  # not set if the transfer completed just as the wait timed out
            raise self._error
        p = self._progress
        seconds = (p.t_done or 0.0) - (p.t_first or 0.0)
        return TransferStats(self._desc.request_id, self._desc.kind, self._desc.total_nbytes, self._desc.num_layers, seconds)

    def layers_received(self) -> int:
        """How many layers were verified so far."""
        return len(self._progress.layers)


class PendingTable:
    """The receivers an endpoint expects, by request id; each is claimed by exactly one sender."""

    def __init__(
        self, kind: TransportKind, address: str, device: str = "cpu", stall_timeout_s: float | None = None
    ) -> None:
        self.kind = kind
        self.address = address
        self.device = device
        self._stall_s = stall_timeout_s  # for PendingTransfer.wait, where no socket times a silent sender out
        self._lock = threading.Lock()
        self._pending: dict[str, PendingTransfer] = {}
        self._claimed: set[str] = set()
        self._closed: str | None = None  # why no transfer is taken any more (fail_all's reason)

    def register(
        self, request_id: str, num_tokens: int, spec: KVSpec, on_layer: LayerCallback, keep: bool = False
    ) -> PendingTransfer:
        """Create the receiver of a new transfer (``keep``: the callback gets private copies)."""
        desc = TransferDescriptor(
            request_id=request_id, kind=self.kind, address=self.address, num_tokens=num_tokens,
            num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
            dtype=spec.dtype, device=self.device, host_id=local_host_id(),
        )
        with self._lock:
            if self._closed is not None:
                raise KVTransferError(f"request {request_id!r}: {self._closed}")
            if request_id in self._pending:
                raise KVTransferError(f"request {request_id!r} already has a pending transfer")
            pending = PendingTransfer(desc, on_layer, self, keep, self._stall_s)
            self._pending[request_id] = pending
        return pending

    def claim(self, descriptor: TransferDescriptor) -> PendingTransfer:
        """The receiver a connecting sender addresses; raises if unknown, taken, or mismatched."""
        rid = descriptor.request_id
        with self._lock:
            pending = self._pending.get(rid)
            if pending is None:
                raise KVTransferError(f"request {rid!r}: no transfer expected here")
            if rid in self._claimed:
                raise KVTransferError(f"request {rid!r}: a sender is already connected")
            if pending.descriptor != descriptor:
                raise KVTransferError(f"request {rid!r}: sender descriptor {descriptor} != expected {pending.descriptor}")
            self._claimed.add(rid)
        pending.claimed()
        return pending

    def remove(self, pending: PendingTransfer) -> None:
        """Forget a finished or failed transfer.

        Only ``pending`` itself: its request id may name a newer transfer by now (expected again after
        this one was cancelled), which a late failure of this one must leave alone.
        """
        rid = pending.descriptor.request_id
        with self._lock:
            if self._pending.get(rid) is pending:
                del self._pending[rid]
                self._claimed.discard(rid)

    def fail_all(self, reason: str) -> None:
        """Fail every pending transfer and refuse new ones (endpoint closing)."""
        with self._lock:
            self._closed = reason
            pending = list(self._pending.values())
        for p in pending:
            p.fail(KVTransferError(f"request {p.descriptor.request_id!r}: {reason}"))


class StagingPool:
    """Reused receive buffers: allocated (and touched) once, grown only when a layer is larger."""

    def __init__(self, initial_nbytes: int, device: str = "cpu") -> None:
        self._initial = initial_nbytes
        self._device = device
        self._lock = threading.Lock()
        self._free: list[torch.Tensor] = []

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of at least ``nbytes``; give it back with ``release``."""
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None or buffer.numel() < nbytes:
            # zeros, not empty: touch every page now rather than during a transfer
            buffer = torch.zeros(max(nbytes, self._initial), dtype=torch.uint8, device=self._device)
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        """Return a buffer for reuse."""
        with self._lock:
            self._free.append(buffer)

    def clear(self) -> None:
        """Drop the cached buffers."""
        with self._lock:
            self._free.clear()
