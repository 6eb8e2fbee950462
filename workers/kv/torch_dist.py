"""The torch.distributed transport: a pairwise process group per (sender process, receiver endpoint).

No global world: the receiver hosts a TCPStore; a sender process connects
once to the receiver's control socket, sends PAIR (a pair id and its GPU), and both sides
build a 2-rank group (sender rank 0, receiver rank 1) over a PrefixStore
named by the pair id. The pair (control socket + group) is cached and
reused for later requests.

Which backend a pair uses (NCCL or gloo) is the receiver's choice at PAIR;
``workers.kv.pair_groups`` holds that choice and the groups' operations.

Requests on one pair are serialised: a sender process sends one request at a
time to a given receiver endpoint (``open`` waits for the pair's lock), so
concurrent requests between the same two processes queue behind each other.
Point-to-point ops on one group are matched in posting order, and keeping
one request per pair at a time keeps that order unambiguous.

Per request on the pair: HELLO (descriptor) -> ACK or ERROR, then per layer
a LAYER header on the control socket, ``send(k)``, ``send(v)`` on the group
into a staging buffer of the receiver, and the layer's checksum as an 8-byte
trailer on the control socket (the sender hashes while the group moves the
bytes); the receiver verifies and delivers each layer before it posts the
next one's receives into the same buffer. END -> ACK or ERROR.

Host layers that queue up behind the wire (the model computes faster than
gloo moves them) go in runs instead: up to RUN_NBYTES of them copied into one
of the pair's two run buffers (RUN_NBYTES each, kept as long as the pair),
each layer hashed as it is copied, then one
LAYERS header (the run's layer indices and checksums) and one ``send``. gloo
pays a rendezvous per message, so its speed grows with message size: here
0.28 / 0.62 / 1.27 / 1.72 / 2.27 GB/s for messages of 0.25 / 1 / 2 / 4 / 8 MiB
sent one at a time. With 16 MB of KV in 32 layers (256 KiB K and V messages)
runs of 4 MiB took torch_dist from 1.05-1.26x to 1.56-1.68x of raw gloo's
per-layer sends (pinned, 15 alternating rounds, two runs); at 64 MB (1 MiB
messages, near gloo's plateau) they gain less: 0.85-0.93x against 0.78-0.80x.
A CUDA pair sends each layer alone: NCCL moves device tensors without a copy.
Layers too big for runs (8 MiB at 256 MB) did not gain from hashing the next
queued layer while the current one was on the wire, so that gloo would read
it from cache: 0.72-0.83x against 0.74-0.80x per round (four pinned runs);
the sender's one core is busy with gloo's copy and the hash either way.

Verifying on a thread of its own, while the next layer arrived in a second
buffer, cost a thread hand-off per layer that the overlap did not repay on
a small host: 16 MB unpinned ran 0.38-0.96x raw gloo (median 0.63 over nine
runs) against 0.49-1.06x (0.94) inline, 256 MB pinned 0.74-0.80x against
0.82-0.84x (three runs); 64 MB stayed within noise (pinned median 0.79
against 0.78, unpinned 0.67 against 0.61).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import json
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from workers.kv.checksum import checksum_parts, copy_and_checksum, device_checksum, request_tag
from workers.kv.descriptor import TransferDescriptor, TransportKind
from workers.kv.errors import KVPeerError, KVPeerTimeout, KVRejected, KVTransferError, KVTransferTimeout
from workers.kv.framing import (
    HEADER_NBYTES,
    RUN_ENTRY,
    TRAILER,
    Frame,
    FrameKind,
    await_verdict,
    connect,
    connection_alive,
    explained,
    hard_close,
    next_layer_frame,
    raise_if_error,
    recv_control_payload,
    recv_frame,
    recv_into,
    send_all,
    send_error,
    send_frame,
    split_address,
    with_context,
)
from workers.kv.interface import EndpointOptions, SenderOptions
from workers.kv.pair_groups import (
    gpu_identity,
    join_group,
    make_group,
    pair_device,
    post_op,
    release_group,
    wait_op,
)
from workers.kv.pipeline import PendingTransfer, StagingPool, as_bytes
from workers.kv.receiving import ReceivingSide, SideEndpoint
from workers.kv.sending import PipelinedSender
from workers.kv.tcp import read_hello, send_hello

_SENDER_RANK, _RECEIVER_RANK = 0, 1
RUN_NBYTES = 4 << 20  # the most bytes of queued host layers one gloo message carries (see send_layers)


# endpoints not closed yet: closed at exit, before the interpreter's teardown, which otherwise destroyed a
# live pair's gloo group while its threads ran and aborted the process ("terminate called without an
# active exception"), after a transfer that failed
_OPEN_ENDPOINTS: weakref.WeakSet[TorchDistEndpoint] = weakref.WeakSet()


@atexit.register
def _close_open_endpoints() -> None:
    for endpoint in list(_OPEN_ENDPOINTS):
        endpoint.close()


@dataclass(frozen=True)
class _Link:
    """A receiving pair's group, where its layers land, and the device it moves them through."""

    group: Any
    staging: StagingPool
    device: str


class TorchDistEndpoint(SideEndpoint):
    """Receiving endpoint: control listener, a TCPStore for pair rendezvous, one thread per pair."""

    kind = TransportKind.TORCH_DIST

    def __init__(self, options: EndpointOptions | None = None) -> None:
        self._options = options or EndpointOptions()
        on_gpu = self._options.device.startswith("cuda")
        if on_gpu and not torch.cuda.is_available():
            raise KVTransferError(f"torch_dist endpoint with device={self._options.device!r} but CUDA is not available")
        # pair threads start on GPU 0: they are moved to this one ("cuda" alone: the creating thread's)
        self._cuda_index: int | None = None
        if on_gpu:
            index = torch.device(self._options.device).index
            self._cuda_index = torch.cuda.current_device() if index is None else index
        self._store = dist.TCPStore(
            self._options.host, 0, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=self._options.stall_timeout_s),
        )
        self._staging = StagingPool(self._options.staging_nbytes, device=self._options.device)
        # a pair over gloo (a sender without CUDA, or on this GPU) lands in host memory, even when staging is on CUDA
        self._host_staging = StagingPool(self._options.staging_nbytes) if on_gpu else self._staging
        self._gpu = gpu_identity(f"cuda:{self._cuda_index}") if on_gpu else ""
        # descriptors say only where the staging is, "cuda" or "cpu": the sender needs no more
        self._side = ReceivingSide(self.kind, self._options, self._serve_pair, 1 << 16, device="cuda" if on_gpu else "cpu")
        self.address = self._side.address
        _OPEN_ENDPOINTS.add(self)

    def close(self) -> None:
        """Stop accepting; pending transfers fail."""
        _OPEN_ENDPOINTS.discard(self)
        self._side.close()
        self._staging.clear()
        self._host_staging.clear()

    def _serve_pair(self, sock: socket.socket) -> None:
        if self._cuda_index is not None:
            torch.cuda.set_device(self._cuda_index)  # this thread's streams and NCCL ops, on the endpoint's GPU
        sock.settimeout(self._options.stall_timeout_s)
        scratch = bytearray(HEADER_NBYTES)
        try:
            frame = recv_frame(sock, scratch, "PAIR")
            if frame.kind != FrameKind.PAIR:
                raise KVPeerError(f"expected PAIR, got {frame.kind.name}")
            try:
                offer = json.loads(recv_control_payload(sock, frame))
                pair_id, sender_gpu = str(offer["pair_id"]), str(offer["gpu"])
            except (ValueError, KeyError, TypeError) as exc:
                raise KVPeerError(f"malformed PAIR: {exc!r}") from None
            device = pair_device(self._options.device, self._gpu, sender_gpu)
            answer = json.dumps({"device": device}).encode()
            send_frame(sock, Frame(FrameKind.PAIR, slot=self._store.port, nbytes=len(answer)), [answer])
            group = make_group(self._store, pair_id, _RECEIVER_RANK, device, self._options.stall_timeout_s)
        except (KVTransferError, OSError, RuntimeError) as exc:
            send_error(sock, exc)
            return
        staging = self._staging if device == "cuda" else self._host_staging
        # An NCCL receive starts after the posting thread's current stream. On the default stream, which
        # the decode engine's steps share, each layer would wait for the steps queued before it and the
        # steps after it for the layer: the pair's own stream keeps decoding apart from transfers.
        on_stream = torch.cuda.stream(torch.cuda.Stream()) if device == "cuda" else contextlib.nullcontext()
        try:
            with on_stream:
                while self._serve_request(sock, scratch, _Link(group, staging, device)):
                    pass
        finally:
            release_group(group, device)

    def _serve_request(self, sock: socket.socket, scratch: bytearray, link: _Link) -> bool:
        """Serve one request on the pair; False when the pair is over (closed or broken)."""
        sock.settimeout(None)  # an idle pair may wait for its next request indefinitely
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return False
        if not first:
            return False  # sender process closed the pair between requests
        sock.settimeout(self._options.stall_timeout_s)
        pending: PendingTransfer | None = None
        try:
            try:
                pending = read_hello(sock, scratch, self._side.table)
            except KVTransferError as exc:  # rejected before any tensor moved: the pair stays usable
                send_error(sock, exc)
                return True
            send_frame(sock, Frame(FrameKind.ACK))  # accepted: tensors may follow on the group
            error = self._receive_layers(sock, scratch, pending, link)
            if error is None:
                pending.complete()
                send_frame(sock, Frame(FrameKind.ACK))
            else:
                send_error(sock, error)
            return True
        except (KVTransferError, OSError, RuntimeError) as exc:  # RuntimeError: from the group, were one unwrapped
            if pending is not None:
                rid = pending.descriptor.request_id
                exc = pending.fail(with_context(exc, rid, f"after {pending.layers_received()} layers"))
            send_error(sock, exc)
            return False  # the stream position is unknown: drop the pair, the sender builds a new one

    def _receive_layers(
        self, sock: socket.socket, scratch: bytearray, pending: PendingTransfer, link: _Link
    ) -> KVTransferError | None:
        """Receive, verify and deliver every layer up to END; the first delivery error (the stream is still drained)."""
        group, staging, device = link.group, link.staging, link.device
        desc = pending.descriptor
        tag = request_tag(desc.request_id)
        half = desc.tensor_nbytes
        trailer = bytearray(TRAILER.size)
        buffer = staging.acquire(desc.layer_nbytes)
        error: KVTransferError | None = None
        # a receive that fails raises, and the buffer is not given back: the group may still write into it
        while True:
            frame = next_layer_frame(sock, scratch, tag, desc.layer_nbytes, max_run=desc.num_layers)
            if frame is None:
                staging.release(buffer)
                return error
            if frame.kind == FrameKind.LAYERS:
                entries = bytearray(frame.layer_idx * RUN_ENTRY.size)
                recv_into(sock, memoryview(entries), "the entries of a run of layers")
                if buffer.numel() < frame.nbytes:
                    staging.release(buffer)
                    buffer = staging.acquire(frame.nbytes)
                what = f"a run of {frame.layer_idx} layers"
                wait_op(post_op(group.recv, buffer[: frame.nbytes], _SENDER_RANK, what), what, device)
                for i, (layer_idx, checksum) in enumerate(RUN_ENTRY.iter_unpack(entries)):
                    error = error or _delivered(pending, layer_idx, buffer[i * 2 * half : (i + 1) * 2 * half], checksum)
                continue
            what = f"layer {frame.layer_idx}"
            works = [post_op(group.recv, buffer[:half], _SENDER_RANK, what), post_op(group.recv, buffer[half : 2 * half], _SENDER_RANK, what)]
            for work in works:  # both posted before waiting: K and V share one round trip
                wait_op(work, what, device)
            recv_into(sock, memoryview(trailer), f"the checksum of {what}")
            error = error or _delivered(pending, frame.layer_idx, buffer[: 2 * half], TRAILER.unpack(trailer)[0])


def _delivered(pending: PendingTransfer, layer_idx: int, payload: torch.Tensor, checksum: int) -> KVTransferError | None:
    """Verify and deliver one layer; its error, if it failed (the caller drains the rest, so the sender reaches END)."""
    try:
        pending.deliver(layer_idx, payload, checksum)
    except KVTransferError as exc:
        return exc
    return None


@dataclass
class _Pair:
    sock: socket.socket
    group: Any
    device: str
    lock: threading.Lock
    broken: bool = False
    # two buffers that runs of layers are copied into while the previous run is on the wire (host pairs only)
    run_buffers: list[torch.Tensor] = field(default_factory=lambda: [torch.zeros(0, dtype=torch.uint8)] * 2)
    stream: Any = None  # the CUDA stream sends (NCCL) or host copies (gloo) of CUDA layers run on
    transfers: int = 0  # completed on this pair
    # its NCCL group failed before any transfer completed (e.g. NCCL refused the two GPUs): the
    # connector pairs with that receiver over gloo from then on
    nccl_failed: bool = False

    def cuda_stream(self, device: torch.device | None) -> Any:
        """The pair's CUDA stream (made on first use, on ``device`` or the current GPU)."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        return self.stream

    def run_buffer(self, n: int, nbytes: int) -> torch.Tensor:
        """The ``n % 2``-th run buffer, of at least ``nbytes`` (allocated and touched on first use)."""
        if self.run_buffers[n % 2].numel() < nbytes:
            self.run_buffers[n % 2] = torch.zeros(nbytes, dtype=torch.uint8)
        return self.run_buffers[n % 2]


class TorchDistWire:
    """Sending half: headers on the pair's control socket, tensors through the pair's group."""

    def __init__(self, descriptor: TransferDescriptor, options: SenderOptions, pair: _Pair, connector: TorchDistConnector):
        self._desc = descriptor
        self._pair = pair
        self._connector = connector
        # where host layers go for an NCCL pair: the GPU offered at PAIR ("cuda": this thread's current one)
        self._gpu = torch.device(options.device) if options.device.startswith("cuda") else torch.device("cuda")
        self._tag = request_tag(descriptor.request_id)
        self._scratch = bytearray(HEADER_NBYTES)
        self._ended = False
        self._done = False
        self._closed = False
        pair.sock.settimeout(options.timeout_s)  # this request's, not that of the request that formed the pair
        try:
            send_hello(pair.sock, descriptor)
        except KVTransferError as exc:
            raise with_context(exc, descriptor.request_id, "HELLO") from None
        await_verdict(pair.sock, descriptor.request_id, self._scratch)  # accepted before tensors flow

    def send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        """Send one layer: header, K and V through the group, then the checksum (hashed while they move)."""
        with self._explaining():
            self._send_one(layer_idx, k, v, corrupt)

    @contextlib.contextmanager
    def _explaining(self) -> Iterator[None]:
        """Raise a broken group's or socket's error as the receiver's verdict where one came (``explained``)."""
        try:
            yield
        except KVPeerError as exc:
            raise explained(self._pair.sock, self._scratch, self._desc.request_id, exc) from None

    def _send_one(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        if self._pair.device != "cuda" and not k.is_cuda:
            self._send_layer(layer_idx, k, v, corrupt)
            return
        # NCCL orders a send after the posting thread's current stream, and a copy to the host runs on
        # it. On the device's default stream that is after every later layer the model has queued since
        # this one's event completed (the sender waits for it): a stream of the pair's own keeps the
        # transfer overlapped with that compute.
        with torch.cuda.stream(self._pair.cuda_stream(k.device if k.is_cuda else self._gpu)):
            self._send_layer(layer_idx, k, v, corrupt)

    def _send_layer(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, corrupt: bool) -> None:
        device = self._pair.device
        # a CUDA tensor stays on its own GPU (``.cuda()`` would copy it to this thread's current one)
        k_wire = (k if k.is_cuda else k.to(self._gpu)) if device == "cuda" else k.cpu()
        v_wire = (v if v.is_cuda else v.to(self._gpu)) if device == "cuda" else v.cpu()
        k_wire, v_wire = k_wire.reshape(-1).view(torch.uint8), v_wire.reshape(-1).view(torch.uint8)
        k_sent = k_wire
        if corrupt:
            k_sent = k_wire.clone()
            k_sent[0] ^= 0xFF
        send_frame(self._pair.sock, Frame(FrameKind.LAYER, layer_idx, 0, 2 * k_wire.numel(), 0, self._tag))
        what = f"request {self._desc.request_id!r} layer {layer_idx}"
        group = self._pair.group
        try:
            works = [post_op(group.send, k_sent, _RECEIVER_RANK, what), post_op(group.send, v_wire, _RECEIVER_RANK, what)]
            if device == "cuda":
                checksum = device_checksum(k_wire, v_wire)  # as the receiver hashes them, in one buffer
            else:  # gloo's own thread moves the bytes meanwhile; xxh3 releases the GIL
                checksum = checksum_parts((k_wire.numpy().data, v_wire.numpy().data))
            for work in works:
                wait_op(work, what, device)
        except KVPeerError:
            if device == "cuda" and self._pair.transfers == 0:
                self._pair.nccl_failed = True
            raise
        if device == "cuda":
            torch.cuda.current_stream(k_wire.device).synchronize()  # K/V must outlive the NCCL send
        send_all(self._pair.sock, TRAILER.pack(checksum))

    def send_layers(self, layers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Send the layers queued at once, in runs of up to RUN_NBYTES that each cross the group as one message."""
        with self._explaining():
            self._send_runs(layers)

    def _send_runs(self, layers: list[tuple[int, torch.Tensor, torch.Tensor]]) -> None:
        """Each run is copied into one of the pair's two run buffers (hashing each layer as it is copied)
        while the run before it is on the wire; its checksums travel with its header. A run of one
        layer, or a layer of more than RUN_NBYTES / 2, goes alone without a copy.
        """
        layer_nbytes = self._desc.layer_nbytes
        per_run = RUN_NBYTES // layer_nbytes
        if self._pair.device == "cuda" or per_run < 2:
            for layer_idx, k, v in layers:
                self._send_one(layer_idx, k, v, False)
            return
        in_flight: list[tuple[Any, str]] = []
        for n, start in enumerate(range(0, len(layers), per_run)):
            run = layers[start : start + per_run]
            if len(run) == 1:  # alone, it needs no copy
                self._wait_all(in_flight)
                self._send_one(*run[0], False)
                continue
            if len(in_flight) == 2:  # that run used the buffer this one is copied into
                wait_op(*in_flight.pop(0))
            nbytes = len(run) * layer_nbytes
            buffer = self._pair.run_buffer(n, nbytes)
            target = buffer.numpy()
            entries = bytearray()
            for i, (layer_idx, k, v) in enumerate(run):
                layer_target = target[i * layer_nbytes : (i + 1) * layer_nbytes]
                checksum = copy_and_checksum(layer_target, (as_bytes(k), as_bytes(v)), nontemporal=False)
                entries += RUN_ENTRY.pack(layer_idx, checksum)
            send_frame(self._pair.sock, Frame(FrameKind.LAYERS, len(run), 0, nbytes, 0, self._tag), [memoryview(entries)])
            what = f"request {self._desc.request_id!r} layers {run[0][0]}-{run[-1][0]}"
            in_flight.append((post_op(self._pair.group.send, buffer[:nbytes], _RECEIVER_RANK, what), what))
        self._wait_all(in_flight)

    @staticmethod
    def _wait_all(in_flight: list[tuple[Any, str]]) -> None:
        while in_flight:
            wait_op(*in_flight.pop(0))

    def end(self) -> None:
        """Send END (every layer is on the wire): from the sending thread, before the caller wakes in finish."""
        send_frame(self._pair.sock, Frame(FrameKind.END, tag=self._tag))
        self._ended = True

    def finish(self) -> None:
        """Send END unless ``end`` did, and wait for the receiver's verdict."""
        if not self._ended:
            self.end()
        await_verdict(self._pair.sock, self._desc.request_id, self._scratch)
        self._done = True
        self._pair.transfers += 1

    def close(self) -> None:
        """Hand the pair back; a pair left mid-request is dropped (its stream position is unknown)."""
        if self._closed:
            return
        self._closed = True
        if not self._done:
            self._connector.drop(self._desc.address, self._pair)
        self._pair.lock.release()


class TorchDistConnector:
    """Sending side: one cached pair (control socket + process group) per receiver endpoint."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the dicts and the set below, never held while a pair forms
        self._pairs: dict[str, _Pair] = {}
        # one pair forms at a time per receiver; a receiver slow to pair holds up no request to another
        self._forming: dict[str, threading.Lock] = {}
        # receivers an NCCL pair failed with before its first transfer (e.g. NCCL refused the two GPUs):
        # later pairs with them go over gloo
        self._gloo_only: set[str] = set()

    def open(self, descriptor: TransferDescriptor, options: SenderOptions) -> PipelinedSender:
        """Get (or build) the pair towards the receiver, lock it for this request, return a sender."""
        deadline = time.monotonic() + options.timeout_s
        while True:
            pair = self._pair(descriptor, options, deadline)
            if not pair.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                raise KVTransferTimeout(f"request {descriptor.request_id!r}: pair busy for {options.timeout_s}s")
            if not pair.broken:
                break
            pair.lock.release()  # dropped by the request that held it while this one waited: build a new one
        try:
            wire = TorchDistWire(descriptor, options, pair, self)
        except KVRejected:  # refused at HELLO, before any tensor moved: the receiver keeps the pair too
            pair.lock.release()
            raise
        except BaseException:
            self.drop(descriptor.address, pair)
            pair.lock.release()
            raise
        return PipelinedSender(descriptor, wire, options)

    def _pair(self, descriptor: TransferDescriptor, options: SenderOptions, deadline: float) -> _Pair:
        """The cached pair towards the receiver, unless its peer went away while it was idle; else a new one."""
        address = descriptor.address
        with self._lock:
            forming = self._forming.setdefault(address, threading.Lock())
        if not forming.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise KVPeerTimeout(f"request {descriptor.request_id!r}: no pair with {address} within {options.timeout_s}s")
        try:
            with self._lock:
                pair = self._pairs.get(address)
            if pair is not None and not pair.broken:
                if not self._gone_while_idle(pair):
                    return pair
                self.drop(address, pair)
            pair = self._form(descriptor, options, deadline)
            with self._lock:
                self._pairs[address] = pair
            return pair
        finally:
            forming.release()

    @staticmethod
    def _gone_while_idle(pair: _Pair) -> bool:
        """Whether an idle pair's receiver closed its end (restarted, say): a busy pair is its user's to judge."""
        if not pair.lock.acquire(blocking=False):
            return False
        try:
            return not connection_alive(pair.sock)
        finally:
            pair.lock.release()

    def _form(self, descriptor: TransferDescriptor, options: SenderOptions, deadline: float) -> _Pair:
        """PAIR with the receiver and join the group it chose, all within ``deadline``."""
        sock = connect(descriptor.address, options.timeout_s, options.socket_buffer_nbytes)
        try:
            pair_id = uuid.uuid4().hex
            # the receiver picks NCCL or gloo from both GPUs: a sender's only matters if the receiver's is on CUDA
            offered = descriptor.device == "cuda" and descriptor.address not in self._gloo_only
            gpu = gpu_identity(options.device) if offered else ""
            offer = json.dumps({"pair_id": pair_id, "gpu": gpu}).encode()
            send_frame(sock, Frame(FrameKind.PAIR, nbytes=len(offer)), [offer])
            scratch = bytearray(HEADER_NBYTES)
            reply = recv_frame(sock, scratch, "the PAIR reply")
            raise_if_error(sock, reply, descriptor.request_id)
            if reply.kind != FrameKind.PAIR:
                raise KVPeerError(f"expected PAIR reply, got {reply.kind.name}")
            try:
                device = str(json.loads(recv_control_payload(sock, reply))["device"])
            except (ValueError, KeyError, TypeError) as exc:
                raise KVPeerError(f"malformed PAIR reply: {exc!r}") from None
            if device not in ("cpu", "cuda"):
                raise KVPeerError(f"PAIR reply names device {device!r}")
            host, _ = split_address(descriptor.address)
            wait_s = deadline - time.monotonic()
            group = join_group(host, reply.slot, pair_id, _SENDER_RANK, device, options.timeout_s, wait_s)
        except BaseException:
            hard_close(sock)
            raise
        return _Pair(sock, group, device, threading.Lock())

    def drop(self, address: str, pair: _Pair) -> None:
        """Forget a broken pair (the next request builds a new one)."""
        pair.broken = True
        hard_close(pair.sock)
        release_group(pair.group, pair.device)
        if pair.nccl_failed:
            self._gloo_only.add(address)
        with self._lock:
            if self._pairs.get(address) is pair:
                del self._pairs[address]

    def close(self) -> None:
        """Close every cached pair."""
        with self._lock:
            pairs, self._pairs = list(self._pairs.values()), {}
        for pair in pairs:
            pair.sock.close()
            release_group(pair.group, pair.device)
